"""The one weight-initialisation policy, per tensor name.

Every tensor's starting value is a function of its name alone (and of other tensors it copies),
so a model built in one process, sharded over N ranks (each rank fills its own shards,
bagel/train/weights.py), or given new draft heads on a pretrained backbone starts from the same
numbers:

- matrices and embeddings: normal(0, std) from a generator seeded by (seed, crc32(name));
- biases 0, 1-D weights (RMSNorm / LayerNorm) 1;
- the fixed 2-D sin-cos position tables (`vit_pos_table`, `latent_pos_table`);
- `llm2vae` 0, so generation starts from a zero velocity (as the release initialises it);
- the guidance embedder's output layer 0, so a fresh guidance-distillation student is its teacher;
- Medusa residual blocks 0 (x + SiLU(0) = x: a fresh head predicts what `lm_head` predicts) and a
  head's own vocabulary projection a copy of `lm_head`; MTP and EAGLE blocks copies of the last
  LLM layer's und expert; EAGLE's image projection 0 (Medusa, arXiv 2401.10774; DeepSeek-V3, arXiv 2412.19437).

`base(name)` supplies the tensors a head copies: the model's own (from scratch), or a checkpoint
reader (new heads on a pretrained backbone).
"""

from __future__ import annotations

import re
import zlib
from typing import Callable

import torch
import torch.nn as nn

from bagel.model.layers import sincos_2d_table

Base = Callable[[str], torch.Tensor]

_MEDUSA_BLOCK = re.compile(r"draft_heads\.heads\.\d+\.blocks\.\d+\.linear\.(weight|bias)")
_MEDUSA_LM_HEAD = re.compile(r"draft_heads\.heads\.\d+\.lm_head\.weight")
_DRAFT_BLOCK_EXPERT = re.compile(r"draft_heads\.(stack\.\d+\.)?block\.expert\.(?P<rest>.+)")  # MTP, EAGLE


def initial_tensor(name: str, shape: tuple[int, ...], cfg, std: float, seed: int, base: Base) -> torch.Tensor:
    """The float32 starting value of tensor `name` (a `Bagel.state_dict()` name) of `shape`."""
    d = cfg.llm.hidden_size
    if name == "vit_pos_table":
        return sincos_2d_table(cfg.vit_max_num_patch_per_side, d)
    if name == "latent_pos_table":
        return sincos_2d_table(cfg.max_latent_size, d)
    if name.startswith(("llm2vae.", "guidance_embedder.fc2.")) or _MEDUSA_BLOCK.fullmatch(name) or name == "draft_heads.image_proj.weight":
        return torch.zeros(shape)
    if _MEDUSA_LM_HEAD.fullmatch(name):
        return base("llm.lm_head.weight").float().clone()
    m = _DRAFT_BLOCK_EXPERT.fullmatch(name)
    if m:
        return base(f"llm.layers.{cfg.llm.num_hidden_layers - 1}.und.{m['rest']}").float().clone()
    if name.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape).normal_(0.0, std, generator=g)


def scratch_base(cfg, std: float, seed: int, shapes: dict[str, tuple[int, ...]]) -> Base:
    """`base` for a model built from scratch: the policy itself, applied to the named tensor."""

    def base(name: str) -> torch.Tensor:
        return initial_tensor(name, shapes[name], cfg, std, seed, base)

    return base


@torch.no_grad()
def init_module(module: nn.Module, prefix: str, cfg, std: float, seed: int, base: Base) -> None:
    """Fill every parameter and buffer of `module` (named `prefix + name` in the model) in place."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        t.copy_(initial_tensor(prefix + name, tuple(t.shape), cfg, std, seed, base).to(t.dtype))
