"""Attention over one packed training sequence: one `prepare_attention` per batch (masks, index
tensors, BlockMask, cu_seqlens), one `packed_attention` per layer.

Backends (`BagelConfig.attn_backend`):

- `dense`:     float math with an (L, L) mask; the reference for tests.
- `sdpa`:      one SDPA call with the (L, L) bool mask.
- `sdpa_loop`: one SDPA call per split (bagel/model/attention/split.py); the CPU default.
- `flex`:      flex_attention with a BlockMask. No backward on CPU in torch 2.13, and eager
               flex is 10-20x slower than SDPA there: use it compiled, on GPU.
- `flash`:     flash-attn varlen (CUDA, fp16/bf16 only; split.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bagel.model.attention import kernels, split
from bagel.model.attention.layout import AttentionLayout, dense_mask, mask_rule, token_info


@dataclass
class AttentionPlan:
    """Everything a backend needs per batch, built once by `prepare_attention`."""

    backend: str
    length: int
    mask: torch.Tensor | None = None  # dense, sdpa: (L, L) bool
    loop: split.LoopPlan | None = None  # sdpa_loop
    block_mask: object | None = None  # flex: a BlockMask
    compile_flex: bool = False
    flash_parts: list[split.FlashPart] = field(default_factory=list)  # flash
    flash_inverse: torch.Tensor | None = None  # flash: (L,) output order


def prepare_attention(layout: AttentionLayout, backend: str, device=None, *, compile_flex: bool = False,
                      merge_max_wasted_pairs: int = split.MERGE_MAX_WASTED_PAIRS) -> AttentionPlan:
    """Build the per-batch attention plan.

    compile_flex: run flex through torch.compile (meant for GPU; on CPU the first compile takes
    ~16 s). merge_max_wasted_pairs: sdpa_loop merges neighbouring calls while the merge adds
    at most this many masked-out query-key pairs (0: no merging; equal images still batch).
    """
    kernels.check_backend(backend)
    device = torch.device(device) if device is not None else torch.device("cpu")
    plan = AttentionPlan(backend=backend, length=layout.length, compile_flex=compile_flex)
    if layout.length == 0:
        return plan
    if backend in ("dense", "sdpa"):
        plan.mask = dense_mask(layout, device)
    elif backend == "sdpa_loop":
        plan.loop = split.plan_loop(layout, token_info(layout, device), device, merge_max_wasted_pairs)
    elif backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        info = token_info(layout, device)

        def mask_mod(b, h, q_idx, kv_idx):
            return mask_rule(info, q_idx, kv_idx)

        plan.block_mask = create_block_mask(mask_mod, None, None, layout.length, layout.length, device=device)
    else:  # flash
        kernels.flash_varlen_func(device)  # fail here, once, rather than in every layer
        plan.flash_parts, plan.flash_inverse = split.plan_flash(layout, device)
    return plan


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Attention over a packed sequence. q: (L, Hq, D); k, v: (L, Hkv, D) -> (L, Hq, D).

    Scale 1/sqrt(D). GQA: query head h reads kv head h // (Hq // Hkv).
    """
    kernels.check_qkv(q, k, v)
    if q.shape[0] != plan.length or k.shape[0] != plan.length:
        raise ValueError(
            f"packed_attention: q has {q.shape[0]} and k {k.shape[0]} tokens but the "
            f"{plan.backend!r} plan was prepared for L={plan.length}"
        )
    if plan.length == 0:  # keep k and v in the graph: FSDP needs every parameter in every step
        return q.clone() + (k.sum() + v.sum()) * 0
    if plan.backend == "dense":
        return kernels.dense_attention(q, k, v, plan.mask)
    if plan.backend == "sdpa_loop":
        return split.run_loop(q, k, v, plan.loop)
    if plan.backend == "flash":
        return split.run_flash(q, k, v, plan.flash_parts, plan.flash_inverse)
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
    if plan.backend == "sdpa":
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=plan.mask, enable_gqa=True)
    else:  # flex
        from torch.nn.attention.flex_attention import flex_attention

        flex = kernels.compiled_flex() if plan.compile_flex else flex_attention
        out = flex(qh, kh, vh, block_mask=plan.block_mask, enable_gqa=True)
    return out[0].transpose(0, 1)  # (L, Hq, D)
