"""Model weights for training: meta-device build, shard-wise materialisation, full-weight export.

The model is built on the meta device; after `parallelize` shards it, `materialize` allocates
each parameter's local shard and fills it from a *per-parameter* source, one tensor at a time:

- from scratch: each tensor is drawn from its own generator seeded by (seed, parameter name),
  following `Bagel.init_weights`' rules (normal(0, std) matrices and embeddings, zero biases,
  unit norm weights, zero `llm2vae` so generation starts from a zero velocity). Because the
  values depend only on the name, a single process, FSDP on any world size and DDP all start
  from the same weights;
- from a checkpoint (our `from_pretrained` layout or the released one): tensors are read one at a
  time from the safetensors file (memory-mapped), never a full state dict.

So peak host memory per rank is its shard plus the largest single tensor, not the whole model
(the official trainer builds the full fp32 model and its EMA on every rank).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from bagel.config import BagelConfig
from bagel.model.layers import sincos_2d_table
from bagel.train.config import deep_merge
from bagel.train.parallelize import canonical_name

TensorSource = Callable[[str, tuple[int, ...]], torch.Tensor]


def model_config(section) -> BagelConfig:
    """The BagelConfig a `ModelSection` describes."""
    if section.preset in ("tiny", "digits"):
        # Nested overrides reach into sub-configs: {"llm": {"num_hidden_layers": 6}}.
        base = getattr(BagelConfig, section.preset)()
        return BagelConfig.from_dict(deep_merge(base.to_dict(), section.overrides), f"preset {section.preset}")
    path = Path(section.path)
    if (path / "config.json").is_file():
        cfg = BagelConfig.from_json(path / "config.json")
        return BagelConfig.from_dict({**cfg.to_dict(), **section.overrides}, str(path / "config.json"))
    return BagelConfig.from_official_dir(path, **section.overrides)


def scratch_source(cfg: BagelConfig, std: float, seed: int) -> TensorSource:
    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        d = cfg.llm.hidden_size
        if name == "vit_pos_table":
            return sincos_2d_table(cfg.vit_max_num_patch_per_side, d)
        if name == "latent_pos_table":
            return sincos_2d_table(cfg.max_latent_size, d)
        if name.startswith("llm2vae.") or name.endswith(".bias"):
            return torch.zeros(shape)
        if len(shape) == 1:  # RMSNorm / LayerNorm weights
            return torch.ones(shape)
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        return torch.empty(shape).normal_(0.0, std, generator=g)

    return make


def pretrained_source(path: str | Path, fallback: TensorSource | None = None) -> TensorSource:
    """Per-tensor reader over `model.safetensors` (ours) or `ema.safetensors` (released layout).
    Draft heads the checkpoint lacks (new heads on a pretrained backbone) come from `fallback`."""
    from safetensors import safe_open

    from bagel.checkpoint.official import convert_key

    path = Path(path)
    ours = path / "model.safetensors"
    file = ours if ours.is_file() else path / "ema.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor ema.safetensors found")
    handle = safe_open(str(file), framework="pt")
    names = {}
    for key in handle.keys():
        name = key if file == ours else convert_key(key, "to_ours")
        if name is not None:
            names[name] = key

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in names and fallback is not None and name.startswith("draft_heads."):
            return fallback(name, shape)
        if name not in names:
            raise KeyError(f"{file}: no tensor for parameter {name!r} (shape {list(shape)})")
        t = handle.get_tensor(names[name])
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{file}: {names[name]} has shape {list(t.shape)}, the model expects {list(shape)}")
        return t.float()

    return read


def with_tensors_from(source: TensorSource, path: str | Path, prefix: str, names: set[str]) -> TensorSource:
    """`source`, except that parameters named `prefix*` come from the safetensors file `path`
    (a first-stage encoder, e.g. `vit.*` from `bagel.train.vision_encoder`). `names`: the model's
    parameter names; the file must hold exactly those under `prefix`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a safetensors file of {prefix}* tensors)")
    handle = safe_open(str(path), framework="pt")
    have = {k for k in handle.keys() if k.startswith(prefix)}
    want = {n for n in names if n.startswith(prefix)}
    if have != want:
        raise ValueError(f"{path}: the {prefix}* tensors do not match the model: missing {sorted(want - have)[:3]}, "
                         f"unexpected {sorted(have - want)[:3]} (was it trained for another model config?)")

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not name.startswith(prefix):
            return source(name, shape)
        t = handle.get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{path}: {name} has shape {list(t.shape)}, the model expects {list(shape)} "
                             "(was it trained for another model config?)")
        return t.float()

    return read


@torch.no_grad()
def materialize(model: nn.Module, source: TensorSource, device: torch.device) -> None:
    """Allocate `model`'s (possibly sharded) storage on `device` and fill it from `source`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        full = source(canonical_name(name), tuple(t.shape)).to(device=device, dtype=t.dtype)
        if isinstance(t, DTensor):
            # Every rank computes the same full tensor: take the local shard, no communication.
            local = distribute_tensor(full, t.device_mesh, t.placements, src_data_rank=None).to_local()
            t.to_local().copy_(local)
        else:
            t.copy_(full)


def full_state_dict(model: nn.Module, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict under `Bagel.state_dict()` names (collective under FSDP: every rank
    must call it). `overrides` (e.g. the EMA weights, possibly DTensors) replace matching entries."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in model.state_dict().items():
        name = canonical_name(name)
        if overrides and name in overrides:
            t = overrides[name]
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.detach().float().cpu().clone()
    return out


def export(model: nn.Module, cfg: BagelConfig, out_dir: str | Path, official_dir: str | Path | None,
           overrides: dict[str, torch.Tensor] | None, is_main: bool, vae=None) -> None:
    """Write the weights (EMA when `overrides` holds it) as our `from_pretrained` layout in
    `out_dir` and, if given, the released layout (`ema.safetensors` + configs) in `official_dir`."""
    from bagel.checkpoint.io import save_pretrained, save_safetensors
    from bagel.checkpoint.official import export_official_state_dict
    from bagel.model.bagel import Bagel

    state = full_state_dict(model, overrides)  # collective: all ranks
    if not is_main:
        return
    with torch.device("meta"):
        plain = Bagel(cfg)
    plain.load_state_dict(state, strict=True, assign=True)
    save_pretrained(plain, out_dir, vae=vae)
    if official_dir is not None:
        _write_official_configs(cfg, Path(official_dir))
        save_safetensors(export_official_state_dict(plain), Path(official_dir) / "ema.safetensors",
                         metadata={"format": "pt"})
        if vae is not None:
            from bagel.model.vae import save_vae_bfl

            save_vae_bfl(vae, Path(official_dir) / "ae.safetensors")


def _write_official_configs(cfg: BagelConfig, path: Path) -> None:
    """`llm_config.json`, `vit_config.json`, `bagel_config.json`, `ae_config.json` as
    `BagelConfig.from_official_dir` reads them back (the ViT count is stored +1, as released)."""
    import dataclasses
    import json

    from bagel.checkpoint.io import atomic_write

    llm = dataclasses.asdict(cfg.llm)
    llm.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    vit = dataclasses.asdict(cfg.vit)
    vit.update(num_hidden_layers=cfg.vit.num_hidden_layers + 1, model_type="siglip_vision_model")
    vae = dataclasses.asdict(cfg.vae)
    top = {k: v for k, v in cfg.to_dict().items() if k not in ("llm", "vit", "vae")}
    for name, data in (("llm_config.json", llm), ("vit_config.json", vit), ("ae_config.json", vae),
                       ("bagel_config.json", top)):
        text = json.dumps(data, indent=2) + "\n"
        atomic_write(path / name, lambda tmp, text=text: Path(tmp).write_text(text))
