"""A self-contained draft-head training loop (one process, CPU or one GPU).

    python -m bagel.train.heads --config configs/train/heads_pydoc.yaml [--train.steps=200 ...]

Modes (`train.mode`):
- `frozen` (Medusa-1): the LLM runs under no_grad, only the heads learn (lr `train.lr`).
- `joint` (Medusa-2 / DeepSeek-V3 MTP): loss = CE + `train.weight` * heads loss; the heads' lr is
  `train.heads_lr_mult` x the LLM's (Medusa-2 uses 4x), the LLM trains too.
Medusa's heads loss is sum_k decay^k CE_k; MTP's is mean_k CE_k (V3: lambda 0.3 then 0.1).

The YAML has four sections (`model`, `heads`, `data`, `train`), unknown keys are errors, and
`--section.key=value` overrides (YAML scalars) are applied on top. Output in `run_dir`: the model
(`save_pretrained`, with heads inside once `BagelConfig.draft_heads` exists) and the heads alone
(`save_draft_heads`, loadable with `load_draft_heads`), plus `log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bagel.model.heads import HeadsConfig, attach_draft_heads, save_draft_heads
from bagel.train.heads.losses import draft_heads_loss


@dataclass
class ModelSpec:
    preset: str = "tiny"  # "tiny" | "small" (a text-only LLM sized for CPU benchmarks) | "pretrained"
    path: str | None = None  # pretrained: our layout or the released one
    heads_path: str | None = None  # continue from heads saved by `save_draft_heads`
    tokenizer: str = "tests/assets/bagel_official_tiny"
    llm: dict[str, Any] = field(default_factory=dict)  # LLMConfig overrides for the presets
    init_std: float = 0.02


@dataclass
class DataSpec:
    corpus: str = "pydoc"  # "pydoc" | "digits"
    holdout_every: int = 5
    max_tokens: int = 256
    samples_per_batch: int = 8


@dataclass
class TrainSpec:
    mode: str = "frozen"  # "frozen" | "joint"
    steps: int = 200
    lr: float = 1e-3
    heads_lr_mult: float = 4.0  # joint mode
    weight: float = 0.2  # heads loss weight in joint mode
    decay: float = 0.8  # Medusa per-head weight decay
    warmup_steps: int = 20
    seed: int = 0
    log_every: int = 20
    eval_batches: int = 4


@dataclass
class HeadTrainConfig:
    run_dir: str = "runs/heads"
    model: ModelSpec = field(default_factory=ModelSpec)
    heads: dict[str, Any] = field(default_factory=dict)  # HeadsConfig fields
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)


def load_config(path: str | None, overrides: list[str] = ()) -> HeadTrainConfig:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    for o in overrides:
        key, _, value = o.removeprefix("--").partition("=")
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    sections = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec}
    kwargs = {}
    for k, v in data.items():
        if k in sections:
            names = {f.name for f in dataclasses.fields(sections[k])}
            bad = sorted(set(v) - names)
            if bad:
                raise ValueError(f"{path}: unknown key(s) {bad} in section {k!r}; valid: {sorted(names)}")
            floats = {f.name for f in dataclasses.fields(sections[k]) if f.type == "float"}
            # YAML 1.1 reads 1e-3 (no dot) as a string
            kwargs[k] = sections[k](**{n: float(x) if n in floats else x for n, x in v.items()})
        elif k in ("run_dir", "heads"):
            kwargs[k] = v
        else:
            raise ValueError(f"{path}: unknown section {k!r}; valid: run_dir, model, heads, data, train")
    cfg = HeadTrainConfig(**kwargs)
    HeadsConfig.from_dict(cfg.heads, f"{path}: heads")
    return cfg


def build_model(spec: ModelSpec):
    from bagel.config import BagelConfig, LLMConfig
    from bagel.model.bagel import Bagel

    if spec.preset == "pretrained":
        from bagel.checkpoint.io import from_pretrained

        return from_pretrained(spec.path)
    cfg = BagelConfig.tiny(visual_gen=False, visual_und=False)
    llm = dataclasses.asdict(cfg.llm)
    if spec.preset == "small":
        llm.update(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)
    elif spec.preset != "tiny":
        raise ValueError(f"model.preset={spec.preset!r}: expected tiny, small or pretrained")
    llm.update(spec.llm)
    cfg = dataclasses.replace(cfg, llm=LLMConfig(**llm))
    model = Bagel(cfg)
    model.init_weights(std=spec.init_std, generator=torch.Generator().manual_seed(0))
    return model


def build_samples(cfg: HeadTrainConfig, tokenizer) -> tuple[list, list]:
    from bagel.train.heads import corpus

    encode = lambda s: tokenizer.encode(s)  # noqa: E731
    if cfg.data.corpus == "pydoc":
        train, held = corpus.pydoc_topics(cfg.data.holdout_every)
        return (corpus.topic_samples(train, encode, cfg.data.max_tokens),
                corpus.topic_samples(held, encode, cfg.data.max_tokens))
    if cfg.data.corpus == "digits":
        s = corpus.digits_samples(encode)
        return s, s[:2]
    raise ValueError(f"data.corpus={cfg.data.corpus!r}: expected pydoc or digits")


def train_heads(cfg: HeadTrainConfig, model=None, log=print):
    """-> (model with `model.draft_heads`, final eval accuracies per head)."""
    from bagel.packing import pack_samples
    from bagel.tokenizer import SpecialTokens, load_tokenizer

    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    model = model or build_model(cfg.model)
    if cfg.model.heads_path:
        from bagel.model.heads import load_draft_heads

        w = model.llm.embed_tokens.weight
        model.draft_heads = load_draft_heads(cfg.model.heads_path, model.cfg.llm, w.dtype, w.device)
    heads = getattr(model, "draft_heads", None) or attach_draft_heads(model, HeadsConfig.from_dict(cfg.heads))
    train, held = build_samples(cfg, tokenizer)
    joint = cfg.train.mode == "joint"
    if cfg.train.mode not in ("frozen", "joint"):
        raise ValueError(f"train.mode={cfg.train.mode!r}: expected frozen or joint")
    head_params = list(heads.parameters())
    head_ids = {id(p) for p in head_params}
    llm_params = [p for p in model.parameters() if id(p) not in head_ids]
    for p in llm_params:
        p.requires_grad_(joint)
    groups = [{"params": head_params, "lr": cfg.train.lr * (cfg.train.heads_lr_mult if joint else 1.0)}]
    if joint:
        groups.append({"params": llm_params, "lr": cfg.train.lr})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(cfg.train.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logf = (run_dir / "log.jsonl").open("w")

    def step_loss(samples, train_mode: bool):
        batch = pack_samples(samples, model.cfg, tokens)
        if joint and train_mode:
            out = model(batch)
            hl, acc = draft_heads_loss(model, heads, batch, out.hidden, cfg.train.decay)
            return out.loss_ce + cfg.train.weight * hl, out.loss_ce, hl, acc
        with torch.no_grad():
            out = model(batch)
        with torch.set_grad_enabled(train_mode):
            hl, acc = draft_heads_loss(model, heads, batch, out.hidden, cfg.train.decay)
        return hl, out.loss_ce, hl, acc

    model.train()
    t0 = time.time()
    for step in range(1, cfg.train.steps + 1):
        scale = min(1.0, step / max(cfg.train.warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * step / cfg.train.steps))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * max(scale, 0.02)
        samples = rng.sample(train, min(cfg.data.samples_per_batch, len(train)))
        loss, ce, hl, acc = step_loss(samples, True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rec = dict(step=step, loss=float(loss.detach()), ce=float(ce.detach()), heads=float(hl.detach()),
                       acc=[round(a, 3) for a in acc], s=round(time.time() - t0, 1))
            log(json.dumps(rec))
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
    model.eval()
    accs = []
    for i in range(0, min(len(held), cfg.train.eval_batches * cfg.data.samples_per_batch), cfg.data.samples_per_batch):
        _, ce, _, acc = step_loss(held[i:i + cfg.data.samples_per_batch], False)
        accs.append(acc)
    eval_acc = [sum(a[k] for a in accs) / len(accs) for k in range(len(accs[0]))] if accs else []
    rec = dict(eval_ce=float(ce) if accs else None, eval_acc=[round(a, 3) for a in eval_acc])
    log(json.dumps(rec))
    logf.write(json.dumps(rec) + "\n")
    logf.close()
    save_draft_heads(heads, run_dir / "heads")
    from bagel.checkpoint.io import save_pretrained

    if hasattr(model.cfg, "draft_heads"):
        save_pretrained(model, run_dir / "model")
    else:  # until BagelConfig knows draft_heads: the LLM alone, heads beside it
        delattr(model, "draft_heads")
        save_pretrained(model, run_dir / "model")
        model.draft_heads = heads
    return model, eval_acc
