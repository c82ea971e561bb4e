"""Model weights for training: the model config, shard-wise materialisation, full-weight export.

The model is built on the meta device; after `parallelize` shards it, `materialize` allocates
each parameter's local shard and fills it from a per-parameter `TensorSource`
(bagel/checkpoint/sources.py), one tensor at a time: the initialisation policy
(bagel/model/init.py) for a scratch run, or a checkpoint read tensor by tensor (memory-mapped).
Because a tensor's value depends only on its name, a single process, FSDP on any world size and
DDP all start from the same weights, and peak host memory per rank is its shard plus the largest
single tensor, not the whole model (the official trainer builds the full fp32 model and its EMA
on every rank).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from bagel.checkpoint.pretrained import read_model_config
from bagel.checkpoint.sources import TensorSource
from bagel.config import BagelConfig
from bagel.train.config import deep_merge
from bagel.train.parallelize import canonical_name


def model_config(section) -> BagelConfig:
    """The BagelConfig a `ModelSection` describes."""
    if section.preset in ("tiny", "digits"):
        # Nested overrides reach into sub-configs: {"llm": {"num_hidden_layers": 6}}.
        base = getattr(BagelConfig, section.preset)()
        return BagelConfig.from_dict(deep_merge(base.to_dict(), section.overrides), f"preset {section.preset}")
    return read_model_config(section.path, **section.overrides)


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
           overrides: dict[str, torch.Tensor] | None, is_main: bool, vae=None, generation=None,
           lora_spec=None, adapter_dir: str | Path | None = None, base: str | None = None) -> None:
    """Write the weights (EMA when `overrides` holds it) as our `from_pretrained` layout in
    `out_dir` (draft heads also alone in `out_dir/draft_heads`) and, if given, the released layout
    (`ema.safetensors` + configs) in `official_dir`; both with `generation` (a GenerationDefaults)
    as their generation.json. A LoRA run (`lora_spec`) also writes its adapter alone, in peft's
    format, to `adapter_dir`, and the two model layouts hold the base with the adapter merged in
    (and say so in merged_adapters.json). A fine-tune of the model directory `base` also gets its
    tokenizer, image transforms and VAE (files the export did not write itself)."""
    from bagel.checkpoint.files import write_text
    from bagel.checkpoint.heads import save_draft_heads
    from bagel.checkpoint.pretrained import save_pretrained, save_released
    from bagel.model.bagel import Bagel
    from bagel.sampling import GENERATION_FILE

    state = full_state_dict(model, overrides)  # collective: all ranks
    if not is_main:
        return
    with torch.device("meta"):
        plain = Bagel(cfg)
    merged = []
    if lora_spec is not None:
        merged = [_merge_adapter(plain, lora_spec, state, adapter_dir, base)]
    else:
        plain.load_state_dict(state, strict=True, assign=True)
    save_pretrained(plain, out_dir, vae=vae)
    for folder in (out_dir, official_dir):
        if generation is not None and folder is not None:
            write_text(Path(folder) / GENERATION_FILE, generation.to_json_text())
    if plain.draft_heads is not None:
        save_draft_heads(plain.draft_heads, Path(out_dir) / "draft_heads", llm=plain.llm)
    if official_dir is not None:
        save_released(plain, official_dir, vae=vae)
    if base is not None and Path(base).is_dir():  # a fine-tune: its tokenizer and transforms come along
        from bagel.checkpoint.merge import write_companions

        for folder in (out_dir, official_dir):
            if folder is not None:
                write_companions(Path(base), Path(folder))
    if merged:
        from bagel.checkpoint.adapters import write_merged_record

        for folder in (out_dir, official_dir):
            if folder is not None:
                write_merged_record(folder, merged)


def _merge_adapter(plain: nn.Module, spec, state: dict[str, torch.Tensor], adapter_dir, base) -> dict:
    """Fill the meta model `plain` from a LoRA run's `state` (base + adapter), write the adapter
    alone to `adapter_dir`, then merge it into the base in place; returns the merge record."""
    import dataclasses

    from bagel.checkpoint.adapters import adapter_state, fingerprint, save_adapter
    from bagel.model import lora

    spec = dataclasses.replace(spec, modules=list(spec.modules))
    lora.attach(plain, spec)
    plain.load_state_dict(state, strict=True, assign=True)
    if adapter_dir is not None:
        save_adapter(plain, "default", spec, adapter_dir, base=base)
    record = {"adapter": str(adapter_dir) if adapter_dir else None, "fingerprint": fingerprint(adapter_state(plain, "default"))}
    lora.merge_all(plain)
    return record
