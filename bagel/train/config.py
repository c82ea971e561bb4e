"""Training configuration: YAML recipe -> dataclasses -> dotted command-line overrides.

    cfg = load_config("configs/train/tiny_cpu.yaml", ["--optim.lr=3e-4", "--train.steps=50"])

Every section is a dataclass; an unknown key (in the YAML or an override) is an error that names
the key, its section and the valid keys. Override values are parsed as YAML scalars, so
`--parallel.mode=fsdp`, `--optim.lr=1e-4`, `--train.freeze_vit=true` and
`--data.image_sizes=[32,48]` all do what they say. The resolved config is printed at start and
saved as `config.yaml` in the run directory and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bagel.config import ConfigError
from bagel.sampling import GenerationDefaults


@dataclass
class ModelSection:
    preset: str = "tiny"  # "tiny" / "digits" (BagelConfig presets) or "pretrained" (weights from `path`)
    path: str | None = None  # our from_pretrained layout or the released layout
    overrides: dict[str, Any] = field(default_factory=dict)  # BagelConfig fields, e.g. attn_backend
    init_std: float = 0.02
    vae_path: str | None = None  # ae.safetensors; None: `path`/ae.safetensors if present, else random
    vit_path: str | None = None  # a first-stage ViT (vit.* tensors) to start a scratch run from


@dataclass
class DataSection:
    # "synthetic" (random tensors, tests/benchmarks) | "pipeline" (webdataset shards, data_pipelines)
    # | "corpus" (text-only samples: the standard library's documentation or the digits texts)
    kind: str = "synthetic"
    # synthetic: every global batch holds `samples_per_batch` samples, deterministic per index.
    samples_per_batch: int = 4
    text_len: list[int] = field(default_factory=lambda: [8, 24])  # [min, max] text tokens
    image_size: int = 32  # VAE images (multiple of 16) and ViT images (rounded to the patch size)
    vocab_low: int = 8  # draw text ids in [vocab_low, vocab_size - 8)
    seed: int = 1234
    num_batches: int = 0  # > 0: cycle over this many distinct global batches (overfitting tests)
    # pipeline: a data YAML (configs/data/*.yaml)
    config: str | None = None
    num_workers: int = 2
    # corpus: which text, its tokenizer, and the training side of its held-out split
    corpus: str = "pydoc"  # "pydoc" | "pydoc_prose" | "digits" (data_pipelines/text_corpus.py)
    tokenizer: str | None = None  # a tokenizer directory
    holdout_every: int = 5  # pydoc: every n-th topic is held out (never trained on)
    max_tokens: int = 256  # tokens per corpus sample


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 1e-7
    schedule: str = "constant"  # "constant" | "cosine" (to min_lr at train.steps)
    warmup_steps: int = 0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-15
    weight_decay: float = 0.0  # not applied to norms, biases, embeddings
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still computed and logged)
    grad_accum: int = 1


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 4396
    ce_weight: float = 1.0
    mse_weight: float = 1.0
    ce_reweighting: bool = False
    ema: float = 0.9999  # 0 disables the EMA
    freeze_llm: bool = False
    freeze_vit: bool = False
    freeze_und: bool = False  # the understanding expert (und weights, text embedding, lm_head)
    vae_sample: bool = True  # sample the VAE posterior (official) or take its mean
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    # Draft heads (model.overrides.draft_heads): extra loss weight, Medusa per-head decay, and
    # heads_only = Medusa-1 style (backbone frozen, only the heads train).
    heads_weight: float = 0.0
    heads_decay: float = 0.8
    heads_only: bool = False
    heads_lr_mult: float = 1.0  # the heads' learning rate over the backbone's (Medusa-2: 4)


@dataclass
class ParallelSection:
    mode: str = "none"  # "none" | "fsdp" | "ddp"
    param_dtype: str = "fp32"  # "fp32" | "bf16" | "fp16" (compute dtype; master weights stay fp32)
    reduce_dtype: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    loss_scale: float = 65536.0  # fp16 only: initial dynamic loss scale
    loss_scale_growth_interval: int = 200


@dataclass
class CheckpointSection:
    every: int = 0  # steps between checkpoints; 0: only at the end (and on SIGTERM)
    keep: int = 3
    resume: str = "auto"  # "auto" (newest intact one in run_dir, if any) | "none" | a path
    # a run starting at step 0 in a run_dir that holds an earlier run: false refuses, true moves
    # the earlier run aside to RUN_DIR.old-<time> (bagel/train/run_dir.py)
    overwrite: bool = False
    # a resumed run must keep the settings its checkpoint was trained with (TRAIN_RESUME_MAY_CHANGE
    # lists what may change); true continues under the changed ones, naming them in the log
    allow_changes: bool = False
    export: bool = True  # at the end: run_dir/export (from_pretrained) + run_dir/export_official


@dataclass
class LogSection:
    every: int = 1
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "bagel"
    peak_tflops: float = 0.0  # 0: known-GPU table, or a GEMM measured at start on CPU
    plot: bool = True  # loss curves PNG at the end


@dataclass
class LoraSection:
    """Low-rank adapters instead of full training (bagel/model/lora.py): rank 0 trains the model
    itself; rank >= 1 freezes it and trains adapters on the layers `experts` x `kinds` select."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    experts: str = "und,gen"  # und, gen or both
    kinds: str = "attn,mlp"  # attn, mlp, connector, vit, latent, or single projections (q_proj, ...)
    layers: str = "all"  # decoder layers for the LLM kinds: all, or indices such as -1 (the last)
    dora: bool = False
    rslora: bool = False

    def spec(self):
        """The LoraSpec of this section (None when rank is 0); bad values are ConfigErrors."""
        if self.rank == 0:
            return None
        from bagel.model.lora import LoraError, LoraSpec  # imports torch: only for LoRA runs

        try:
            return LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout, experts=self.experts,
                            kinds=self.kinds, layers=self.layers, dora=self.dora, rslora=self.rslora)
        except LoraError as e:
            raise ConfigError(str(e)) from None


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    lora: LoraSection = field(default_factory=LoraSection)
    # The sampler settings the exported model recommends (its generation.json), on top of the
    # presets: {text_to_image: {num_timesteps: 20, ...}, edit: {...}} (bagel.sampling)
    generation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        choices = {
            ("model", "preset"): ("tiny", "digits", "pretrained"),
            ("data", "kind"): ("synthetic", "pipeline", "corpus"),
            ("data", "corpus"): ("pydoc", "pydoc_prose", "digits"),
            ("optim", "schedule"): ("constant", "cosine"),
            ("parallel", "mode"): ("none", "fsdp", "ddp"),
            ("parallel", "param_dtype"): ("fp32", "bf16", "fp16"),
            ("parallel", "reduce_dtype"): ("fp32", "bf16", "fp16"),
        }
        for (section, key), allowed in choices.items():
            value = getattr(getattr(self, section), key)
            if value not in allowed:
                raise ConfigError(f"{section}.{key}={value!r}; expected one of {allowed}")
        if self.model.preset == "pretrained" and not self.model.path:
            raise ConfigError("model.preset='pretrained' needs model.path")
        if self.data.kind == "pipeline" and not self.data.config:
            raise ConfigError("data.kind='pipeline' needs data.config (a configs/data/*.yaml)")
        if self.data.kind == "corpus" and not self.data.tokenizer:
            raise ConfigError("data.kind='corpus' needs data.tokenizer (a tokenizer directory)")
        if (self.train.heads_weight > 0 or self.train.heads_only) and self.parallel.mode == "fsdp":
            raise ConfigError("training draft heads is supported with parallel.mode none or ddp (not fsdp yet)")
        if self.lora.rank < 0:
            raise ConfigError(f"lora.rank={self.lora.rank!r}: must be >= 1 (or 0: no adapters)")
        if self.lora.rank and (self.train.heads_weight > 0 or self.train.heads_only):
            raise ConfigError("lora.rank > 0 trains adapters only: it does not combine with draft-head training")
        self.lora.spec()  # bad LoRA values fail now
        self._check_ranges()
        GenerationDefaults.from_overrides(self.generation, "generation")  # unknown keys or bad values fail now

    def _check_ranges(self) -> None:
        """Values the types allow but the run cannot use: one message naming the key and the range."""
        t, o, d, c = self.train, self.optim, self.data, self.checkpoint
        rules = [
            ("train.steps", t.steps, t.steps >= 1, ">= 1"),
            ("train.ema", t.ema, 0.0 <= t.ema < 1.0, "in [0, 1) (0 disables the EMA)"),
            ("train.max_bad_steps", t.max_bad_steps, t.max_bad_steps >= 0, ">= 0 (0: stop at the first bad step)"),
            ("train.heads_lr_mult", t.heads_lr_mult, t.heads_lr_mult > 0, "> 0"),
            ("optim.grad_accum", o.grad_accum, o.grad_accum >= 1, ">= 1"),
            ("optim.lr", o.lr, o.lr > 0, "> 0"),
            ("optim.min_lr", o.min_lr, o.min_lr >= 0, ">= 0"),
            ("optim.warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
            ("optim.max_grad_norm", o.max_grad_norm, o.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
            ("optim.betas", o.betas, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
            ("data.samples_per_batch", d.samples_per_batch, d.samples_per_batch >= 1, ">= 1"),
            ("data.text_len", d.text_len, len(d.text_len) == 2 and 1 <= d.text_len[0] <= d.text_len[1],
             "[min, max] with 1 <= min <= max"),
            ("data.image_size", d.image_size, d.image_size >= 1, ">= 1"),
            ("data.num_batches", d.num_batches, d.num_batches >= 0, ">= 0 (0: no cycling)"),
            ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
            ("data.max_tokens", d.max_tokens, d.max_tokens >= 3, ">= 3"),
            ("checkpoint.every", c.every, c.every >= 0, ">= 0 (0: only at the end)"),
            ("checkpoint.keep", c.keep, c.keep >= 1, ">= 1"),
            ("log.every", self.log.every, self.log.every >= 1, ">= 1"),
            ("log.peak_tflops", self.log.peak_tflops, self.log.peak_tflops >= 0, ">= 0 (0: measured)"),
        ]
        for key, value, ok, expected in rules:
            if not ok:
                raise ConfigError(f"{key}={value!r}: must be {expected}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------------
def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {names}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value, hint, key: str):
    """Light type checking: ints are accepted for floats and strings; everything else must match."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    base = origin or hint
    if base is typing.Union or str(base) == "types.UnionType":
        base = next(a for a in args if a is not type(None))
        base = typing.get_origin(base) or base
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, int) and not isinstance(value, bool):  # --lora.layers=-1 reads as a number
        return str(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base in (int, float, str, bool, list, dict) and not isinstance(value, base):
        raise ConfigError(f"{key}={value!r}: expected {getattr(base, '__name__', base)}, got "
                          f"{type(value).__name__}")
    if base is int and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected int, got bool")
    if base is list and typing.get_args(hint):
        item = typing.get_args(hint)[0]
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["--optim.lr=1e-4", "--train.steps", "5"] -> {"optim": {"lr": 1e-4}, "train": {"steps": 5}}."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value")
            key, raw = arg[2:], args[i + 1]
            i += 1
        i += 1
        value = _yaml_value(raw, f"--{key}") if raw != "" else ""
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key}: {part} is not a section")
        node[parts[-1]] = value
    return nested


def _yaml_value(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML{at} ({problem})") from None


def deep_merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, dicts merged key by key (recipes, overrides, preset model configs)."""
    out = dict(base)
    for k, v in extra.items():
        # `model.overrides` is a free-form dict: merge it key by key as well.
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    return load_recipe(TrainConfig, path, overrides, "train config")


# What a resumed bagel-train run may set differently from its checkpoint: how long it runs, how it
# saves and reports, how it is spread over processes (DCP reshards, the data state is elastic).
# Anything else (model, data, optimiser, loss, adapters, seeds, dtype) would continue one run under
# another's settings.
TRAIN_RESUME_MAY_CHANGE = ("run_dir", "train.steps", "train.max_bad_steps", "checkpoint", "log", "generation",
                           "data.num_workers", "parallel.mode", "parallel.activation_checkpointing",
                           "parallel.compile")


def changed_settings(old, new, may_change: tuple[str, ...] = (), where: str = "") -> list[str]:
    """`key: old -> new` for each setting of config dataclass `new` that differs from `old`,
    sections compared key by key (dotted names), skipping the keys and sections in `may_change`."""
    out = []
    for f in dataclasses.fields(new):
        key = f"{where}{f.name}"
        if key in may_change:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(b):
            out += changed_settings(a, b, may_change, f"{key}.")
        elif a != b:
            out.append(f"{key}: {a} -> {b}")
    return out


def resume_changes(saved: Path, cfg, may_change: tuple[str, ...]) -> list[str]:
    """The settings of config dataclass `cfg` outside `may_change` that differ from the config.yaml
    of the run it continues, read as a recipe of cfg's type (a key an older one lacks counts as its
    default; no file: nothing to compare)."""
    if not saved.is_file():
        return []
    return changed_settings(load_recipe(type(cfg), saved, None, "the run's saved config"), cfg, may_change)


def load_recipe(cls, path: str | Path | None, overrides: list[str] | None, what: str):
    """A YAML recipe (optional) with dotted overrides on top, built into dataclass `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
        data = _yaml_value(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at top level")
    return _build(cls, deep_merge(data, parse_overrides(overrides or [])), "")


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data, "")
