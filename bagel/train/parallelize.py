"""The one place that knows about activation checkpointing, torch.compile, FSDP2 and DDP.

`parallelize(model, cfg, dist, materialize)` applies, in this order (the torchtitan order):

1. activation checkpointing (non-reentrant) around every MoT layer and ViT block;
2. `torch.compile` of each of those blocks (optional; ~1.2x on CPU for ~30 s of compile, so off
   in tests);
3. FSDP2: `fully_shard` per MoT layer and per ViT block, then the root (embeddings, connector,
   heads and everything else); parameters become DTensors sharded on dim 0;
   or DDP for small models;
4. `materialize(model)`: the model was built on the meta device; its storage is allocated only
   now, after sharding, and filled shard by shard (see `weights.py`), so no rank ever holds a
   full copy of the model.

Mixed precision: FSDP2's `MixedPrecisionPolicy(param_dtype, reduce_dtype)` keeps fp32 sharded
master weights and computes in `param_dtype`; without FSDP, `autocast()` runs the forward under
`torch.autocast` over fp32 parameters (the same fp32-master contract).

Every expert must take part in every step on every rank (FSDP2 hangs or aborts, DDP crashes,
when a block runs on some ranks only). The MoT layer runs both experts on zero-length slices,
and `Bagel.forward` runs every idle modality path (ViT, timestep/latent projections, lm_head,
llm2vae) on zero-length inputs, returned as its exact-zero `participation` loss term.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from bagel.config import parse_dtype
from bagel.train.config import ParallelSection
from bagel.train.distributed import DistInfo

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every MoT layer and ViT block: the checkpointing / sharding units."""
    units = [(model.llm.layers, i) for i in range(len(model.llm.layers))]
    if getattr(model, "vit", None) is not None:
        units += [(model.vit.layers, i) for i in range(len(model.vit.layers))]
    return units


def parallelize(model: nn.Module, cfg: ParallelSection, dist: DistInfo,
                materialize: Callable[[nn.Module], None]) -> nn.Module:
    """Wrap `model` (a meta-device Bagel) for training; returns the module to call."""
    if cfg.mode != "none" and not dist.distributed:
        if dist.world_size > 1:
            raise RuntimeError(f"parallel.mode={cfg.mode!r} with WORLD_SIZE={dist.world_size} but no process group")
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for container, i in blocks(model):
            container[i] = checkpoint_wrapper(container[i])
    if cfg.compile:
        for container, i in blocks(model):
            container[i].compile()

    if cfg.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        # CPUOffloadPolicy is not passed: it needs an accelerator (fails on CPU in torch 2.13).
        policy = MixedPrecisionPolicy(param_dtype=parse_dtype(cfg.param_dtype), reduce_dtype=parse_dtype(cfg.reduce_dtype))
        for container, i in blocks(model):
            fully_shard(container[i], mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        materialize(model)
        return model

    materialize(model)
    if cfg.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if cfg.param_dtype != "fp32" and cfg.reduce_dtype != "fp32":
            raise ValueError("parallel.mode=ddp reduces gradients in fp32 (reduce_dtype must be fp32)")
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        # The buffers (sin-cos tables) are equal on every rank: no sync per forward. torch >= 2.13
        # renames the switch (and syncs once at init, which is harmless here).
        import inspect

        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=device_ids, **sync)
    return model


def canonical_name(name: str) -> str:
    """A parameter name as `Bagel.state_dict()` spells it (without wrapper prefixes)."""
    if name.startswith("module."):
        name = name[len("module."):]
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def autocast(cfg: ParallelSection, device: torch.device):
    """The forward's precision context: FSDP2 casts parameters itself; otherwise torch.autocast."""
    if cfg.param_dtype == "fp32" or cfg.mode == "fsdp":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=parse_dtype(cfg.param_dtype))


def no_sync(model: nn.Module, cfg: ParallelSection, last_micro_step: bool):
    """Skip the gradient reduction on all but the last micro-batch of an accumulation step."""
    if cfg.mode == "fsdp":
        model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()
    if cfg.mode == "ddp" and not last_micro_step:
        return model.no_sync()
    return contextlib.nullcontext()
