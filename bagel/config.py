"""Typed configs for every component, with named presets.

The official release reads two Hugging Face JSON files (`llm_config.json`, `vit_config.json`) and
then overwrites or adds a number of settings in Python. Those hard-coded settings live here as
explicit dataclass fields with the release's values as defaults, so nothing about the
architecture is hidden in loader code:

* LLM: `qk_norm=True`, `layer_module="Qwen2MoTDecoderLayer"`, `tie_word_embeddings=False`.
* ViT: the JSON's `num_hidden_layers` is one more than the layers in the weights (the last SigLIP
  layer is dropped), and `rope=False` (a learned absolute position table is used instead).
* Composition: `latent_patch_size=2`, `max_latent_size=64`, `vit_max_num_patch_per_side=70`,
  `connector_act="gelu_pytorch_tanh"`, `interpolate_pos=False`.
* VAE: the FLUX autoencoder (`ch=128, ch_mult=(1,2,4,4), z_channels=16`) with
  `scale_factor=0.3611`, `shift_factor=0.1159`.

Presets: `BagelConfig.tiny()` (tests), `BagelConfig.digits()` (the CPU demo),
`BagelConfig.from_official_dir(path)` (a released-layout directory), `BagelConfig.from_json` /
`to_json` (our own checkpoints). This module imports nothing else from the project: configs are
plain data at the bottom of the import graph.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The attention backends `BagelConfig.attn_backend` may name (bagel/model/attention.py runs them).
ATTENTION_BACKENDS = ("dense", "sdpa", "sdpa_loop", "flex", "flash")

# Compute / weight dtypes by the names every CLI and recipe uses (torch names them in parse_dtype,
# imported late so that a CLI's --help does not pay for importing torch).
DTYPE_NAMES = ("fp32", "bf16", "fp16")
# int8 experts (bagel/model/quant.py): torch's own ops, or the same two through torchao
QUANT_MODES = ("int8", "int8-dynamic", "torchao-int8", "torchao-int8-dynamic")


class ConfigError(ValueError):
    """A config value or key is invalid; the message names it and what was expected."""


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`; a missing file, bad JSON or another JSON type is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _from_dict(cls, data: dict[str, Any], source: str, ignore: tuple[str, ...] = ()):
    """Build dataclass `cls` from `data`; unknown keys are an error naming `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names and k not in ignore)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}"
        )
    kwargs = {k: v for k, v in data.items() if k in names}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            kwargs[f.name] = _typed(kwargs[f.name], str(f.type), f"{source}.{f.name}")
    return cls(**kwargs)


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _typed(value, annotation: str, key: str):
    """`value` checked against a field's annotation (the simple ones: int, float, bool, str,
    tuple[int, ...]); ints pass as floats, lists become tuples. Others are left to the field."""
    if annotation in _SCALARS:
        want = _SCALARS[annotation]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{key}={value!r}: expected {annotation}, got {type(value).__name__}")
        return value
    if annotation.startswith("tuple[int") and isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}={list(value)!r}: expected integers")
        return tuple(value)
    return value


@dataclass
class LLMConfig:
    """Qwen2-style decoder with BAGEL's MoT layer (values of Qwen2.5-7B by default)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    # Hard-coded by every official loader after reading llm_config.json:
    qk_norm: bool = True
    layer_module: str = "Qwen2MoTDecoderLayer"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"llm.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"llm.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (GQA needs whole groups)"
            )
        if self.layer_module != "Qwen2MoTDecoderLayer":
            raise ConfigError(
                f"llm.layer_module={self.layer_module!r}: only 'Qwen2MoTDecoderLayer' (the released "
                "BAGEL layer) is implemented"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"llm.hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported")
        if self.tie_word_embeddings:
            raise ConfigError("llm.tie_word_embeddings=True is not supported (BAGEL unties lm_head)")
        if not self.qk_norm:
            raise ConfigError("llm.qk_norm=False is not supported: the MoT layer always normalises q and k "
                              "per head (Qwen2MoTDecoderLayer, as released)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # Keys of a Hugging Face Qwen2 config.json that carry no architecture information for us.
    HF_IGNORED = (
        "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "initializer_range",
        "max_window_layers", "model_type", "rope_scaling", "sliding_window", "torch_dtype",
        "use_cache", "use_sliding_window", "transformers_version", "pad_token_id", "freeze_und",
        "is_causal", "_name_or_path", "dtype", "rope_parameters", "layer_types",
    )

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "LLMConfig":
        data = read_json_object(path)
        scaling = data.get("rope_scaling")
        if scaling not in (None, {}) and scaling.get("rope_type", scaling.get("type")) != "default":
            raise ConfigError(f"{path}: rope_scaling={scaling} is not supported (plain RoPE only)")
        # The official loaders force these three, whatever the JSON says.
        data.update(qk_norm=True, layer_module="Qwen2MoTDecoderLayer", tie_word_embeddings=False)
        return _from_dict(cls, data, str(path), ignore=cls.HF_IGNORED)


@dataclass
class ViTConfig:
    """SigLIP-style vision tower. `num_hidden_layers` counts the layers actually built."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    rope: bool = False  # forced off by the official loaders

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vit.hidden_size={self.hidden_size} not divisible by heads={self.num_attention_heads}"
            )
        if self.rope:
            raise ConfigError("vit.rope=True is not supported (the release uses a learned table)")
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vit.hidden_act={self.hidden_act!r}: only 'gelu_pytorch_tanh' is supported")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    HF_IGNORED = ("model_type", "architectures", "attention_dropout", "torch_dtype",
                  "transformers_version", "_name_or_path", "dtype", "vision_use_head")

    @classmethod
    def from_hf_json(cls, path: str | Path) -> "ViTConfig":
        data = read_json_object(path)
        if "num_hidden_layers" not in data:
            raise ConfigError(f"{path}: missing key 'num_hidden_layers'")
        # The release drops the last SigLIP layer: the JSON count is one more than the weights hold.
        data["num_hidden_layers"] = data["num_hidden_layers"] - 1
        data["rope"] = False
        return _from_dict(cls, data, str(path), ignore=cls.HF_IGNORED)


@dataclass
class VAEConfig:
    """FLUX autoencoder (BFL `AutoEncoderParams` layout); built through diffusers' AutoencoderKL."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32  # GroupNorm groups (FLUX: 32); smaller lets tiny VAEs use ch < 32

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        data = read_json_object(path)
        downsample = data.pop("downsample", None)  # derived from ch_mult; must agree if present
        cfg = _from_dict(cls, data, str(path))
        if downsample is not None and downsample != cfg.downsample:
            raise ConfigError(f"{path}: downsample={downsample} disagrees with ch_mult={list(cfg.ch_mult)} "
                              f"(which gives {cfg.downsample})")
        return cfg


HEAD_KINDS = ("medusa", "mtp", "eagle")


@dataclass
class HeadsConfig:
    """Draft heads for speculative decoding (bagel/model/heads.py)."""

    kind: str = "medusa"  # "medusa" | "mtp" | "eagle"
    num_heads: int = 4  # Medusa heads K, MTP modules D, or EAGLE's draft depth (one module, run D times)
    num_layers: int = 1  # Medusa: residual blocks per head (MTP, EAGLE: always one transformer block)
    own_lm_head: bool = False  # Medusa: a vocabulary projection per head (initialised from lm_head)
    # EAGLE: add the target's mean hidden state over the prompt's last ViT image to every draft
    # input (image-aware drafting; bagel/model/heads.py)
    image_context: bool = False

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"draft_heads.kind={self.kind!r}: expected one of {HEAD_KINDS}")
        if self.num_heads < 1 or self.num_layers < 1:
            raise ConfigError(f"draft_heads: num_heads={self.num_heads} and num_layers={self.num_layers} "
                              "must be >= 1")
        if self.kind in ("mtp", "eagle") and (self.num_layers != 1 or self.own_lm_head):
            raise ConfigError(f"draft_heads.kind={self.kind!r} has one block per module and the shared lm_head: "
                              "num_layers must be 1 and own_lm_head false")
        if self.image_context and self.kind != "eagle":
            raise ConfigError(f"draft_heads.image_context is an EAGLE option (kind={self.kind!r})")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "draft_heads") -> "HeadsConfig":
        return _from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BagelConfig:
    """The unified model: LLM (MoT) + ViT + connector + generation path (+ separate VAE)."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    visual_gen: bool = True
    visual_und: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64  # the release uses 64; the official class default of 32 is too small
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    # Shift applied to the timesteps drawn for training (flow.noise_latents); the sampler's shift
    # is ImageGenConfig.timestep_shift. The release calls this one `timestep_shift` too.
    train_timestep_shift: float = 1.0
    attn_backend: str = "sdpa_loop"  # one of ATTENTION_BACKENDS
    draft_heads: HeadsConfig | None = None  # Medusa / MTP heads for speculative decoding
    # A guidance-distilled student (bagel-distill): the latent tokens being denoised also embed the
    # guidance scales (text, image), and the samplers run one branch instead of two or three.
    guidance_input: bool = False

    def __post_init__(self):
        if isinstance(self.llm, dict):
            self.llm = _from_dict(LLMConfig, self.llm, "llm")
        if isinstance(self.vit, dict):
            self.vit = _from_dict(ViTConfig, self.vit, "vit")
        if isinstance(self.vae, dict):
            self.vae = _from_dict(VAEConfig, self.vae, "vae")
        if isinstance(self.draft_heads, dict):
            self.draft_heads = HeadsConfig.from_dict(self.draft_heads, "draft_heads")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"attn_backend={self.attn_backend!r} is unknown; expected one of {ATTENTION_BACKENDS}"
            )
        if self.interpolate_pos:
            raise ConfigError("interpolate_pos=True is not supported (the release extrapolates)")
        if self.connector_act != "gelu_pytorch_tanh":
            raise ConfigError(f"connector_act={self.connector_act!r}: only 'gelu_pytorch_tanh' is supported")
        if self.llm.head_dim % 2:
            raise ConfigError(f"llm head_dim={self.llm.head_dim} must be even for RoPE")
        if self.llm.hidden_size % 4:
            raise ConfigError("llm.hidden_size must be divisible by 4 for the 2-D sin-cos tables")

    # Derived geometry -------------------------------------------------------------------------
    @property
    def latent_downsample(self) -> int:
        """Image pixels per generation token along one side (8 * 2 = 16 for the release)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        """Features of one generation token: p * p * z_channels (64 for the release)."""
        return self.latent_patch_size**2 * self.vae.z_channels

    # Presets ----------------------------------------------------------------------------------
    @classmethod
    def bagel_7b_mot(cls, **overrides) -> "BagelConfig":
        """The released BAGEL-7B-MoT's shapes (Qwen2.5-7B with two experts per layer, SigLIP
        so400m minus its last layer, FLUX VAE): the defaults, named. For sizing without weights
        (bagel.inference.memory_plan); a real model is read from its directory."""
        cfg = cls()
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def tiny(cls, **overrides) -> "BagelConfig":
        """A few-hundred-thousand-parameter model with the fixture's geometry, for tests."""
        cfg = cls(
            llm=LLMConfig(vocab_size=322, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2),
            vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, patch_size=14, image_size=224),
            vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=4),
            max_latent_size=16,
            vit_max_num_patch_per_side=16,
            train_timestep_shift=2.0,
        )
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def digits(cls, **overrides) -> "BagelConfig":
        """The CPU demo model (~2M parameters): 32 px images, 4x4 tokens per image on both paths.

        VAE: 4x downsampling (32 px -> 8x8x4 latents -> 4x4 tokens of 16 features); ViT: 8 px
        patches (4x4 tokens); vocabulary: a 300-token BPE + Qwen2.5's 22 added tokens."""
        cfg = cls(
            llm=LLMConfig(vocab_size=322, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
            vit=ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          patch_size=8, image_size=32),
            vae=VAEConfig(ch=16, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=4, norm_groups=8),
            max_latent_size=4,
            vit_max_num_patch_per_side=4,
            train_timestep_shift=1.0,
        )
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    @classmethod
    def from_official_dir(cls, path: str | Path, **overrides) -> "BagelConfig":
        """Read a directory in the released BAGEL layout.

        `llm_config.json` and `vit_config.json` are required. The settings the official code
        hard-codes come from the defaults above unless the directory carries a
        `bagel_config.json` (our fixtures do) or `ae_config.json` (for non-FLUX-size VAEs).
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        for name in ("llm_config.json", "vit_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path}: missing {name} (expected the released BAGEL layout)")
        kwargs: dict[str, Any] = dict(
            llm=LLMConfig.from_hf_json(path / "llm_config.json"),
            vit=ViTConfig.from_hf_json(path / "vit_config.json"),
        )
        if (path / "ae_config.json").is_file():
            kwargs["vae"] = VAEConfig.from_json(path / "ae_config.json")
        if (path / "bagel_config.json").is_file():
            extra = read_json_object(path / "bagel_config.json")
            for k in ("vae_transform", "vit_transform"):  # inference transform args, not architecture
                extra.pop(k, None)
            _rename_release_keys(extra)
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(extra) - names)
            if unknown:
                raise ConfigError(f"{path / 'bagel_config.json'}: unknown key(s) {unknown}")
            kwargs.update(extra)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "BagelConfig":
        data = dict(data)
        _rename_release_keys(data)  # also reads our config.json files written before the rename
        return _from_dict(cls, data, source)

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, path: str | Path) -> "BagelConfig":
        return cls.from_dict(read_json_object(path), str(path))


def _rename_release_keys(data: dict[str, Any]) -> None:
    """The release (and our configs before 2026-11) name the training shift `timestep_shift`."""
    if "timestep_shift" in data:
        data.setdefault("train_timestep_shift", data.pop("timestep_shift"))


def parse_dtype(name: str):
    """'fp32' | 'bf16' | 'fp16' -> the torch dtype; anything else is a ConfigError naming the choices."""
    import torch

    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is unknown; expected one of {list(DTYPE_NAMES)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
