"""Attention for query blocks that sit at the end of their keys: inference over a KV cache.

Each block b has queries q_b (n_b, Hq, D) that are the LAST n_b positions of its keys k_b, v_b
(S_b, Hkv, D) (a context's cached prefix followed by the block itself), and one of three masks:

- `FULL`:   every query sees every key (image blocks, single-token decoding);
- `CAUSAL`: bottom-right causal, query i sees key j iff j <= i + S - n (a text block prefilled
            on top of a cache; flash-attn >= 2.1's `causal=True`, while SDPA's `is_causal` is
            top-left aligned, so SDPA gets an explicit mask);
- a (n, S) bool tensor (tree attention for speculative decoding).

Backends follow `BagelConfig.attn_backend` (`resolve_cached_backend`): `dense` is the float
reference; `flash` runs the FULL blocks in one flash-attn varlen call and the CAUSAL blocks in
another (keys gathered into one packed tensor), tensor masks through SDPA; every other backend
runs SDPA per block on views of the cache (no copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel.model.attention import kernels
from bagel.model.attention.layout import bottom_right_causal_mask, cumsum

FULL, CAUSAL = "full", "causal"
Mask = str | torch.Tensor  # FULL | CAUSAL | (n, S) bool


def resolve_cached_backend(backend: str, device, dtype: torch.dtype) -> str:
    """The backend inference uses for `BagelConfig.attn_backend` on this device: `dense` and
    `flash` as asked; the default `sdpa_loop` becomes `flash` on CUDA in fp16/bf16 when flash-attn
    is importable, SDPA otherwise (`sdpa` and `flex` are SDPA per block here)."""
    kernels.check_backend(backend)
    if backend in ("dense", "flash"):
        return backend
    if backend == "sdpa_loop" and dtype in (torch.float16, torch.bfloat16) and kernels.flash_available(device):
        return "flash"
    return "sdpa"


def cached_attention(qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor], masks: list[Mask],
                     backend: str = "sdpa") -> list[torch.Tensor]:
    """One output (n_b, Hq, D) per block; see the module docstring for the blocks and masks."""
    kernels.check_backend(backend)
    if not len(qs) == len(ks) == len(vs) == len(masks):
        raise ValueError(f"cached_attention: {len(qs)} query blocks, {len(ks)} keys, {len(vs)} values, "
                         f"{len(masks)} masks")
    for b, (q, k, v, m) in enumerate(zip(qs, ks, vs, masks)):
        kernels.check_qkv(q, k, v)
        if q.shape[0] > k.shape[0]:
            raise ValueError(f"cached_attention: block {b} has {q.shape[0]} queries but only {k.shape[0]} keys "
                             "(need q_len <= kv_len)")
        if isinstance(m, torch.Tensor) and tuple(m.shape) != (q.shape[0], k.shape[0]):
            raise ValueError(f"cached_attention: block {b}'s mask has shape {tuple(m.shape)}, expected "
                             f"{(q.shape[0], k.shape[0])}")
        if not isinstance(m, torch.Tensor) and m not in (FULL, CAUSAL):
            raise ValueError(f"cached_attention: mask {m!r}; expected {FULL!r}, {CAUSAL!r} or a bool tensor")
    if backend == "dense":
        return [kernels.dense_attention(q, k, v, _explicit(m, q, k)) for q, k, v, m in zip(qs, ks, vs, masks)]
    if backend == "flash":
        return _flash_blocks(qs, ks, vs, masks)
    return _sdpa_blocks(qs, ks, vs, masks)


def _sdpa_blocks(qs, ks, vs, masks) -> list:
    """SDPA per group of blocks that share query length, key length and mask kind (FULL or
    CAUSAL): one call over the stacked group instead of one per block (the CFG branches and images
    of a batch; the same numbers, bit for bit, as block by block). Tensor masks run alone."""
    groups: dict[tuple, list[int]] = {}
    for b, (q, k, m) in enumerate(zip(qs, ks, masks)):
        kind = "tensor" if isinstance(m, torch.Tensor) else (FULL if m == FULL or q.shape[0] == 1 else CAUSAL)
        groups.setdefault((kind, q.shape[0], k.shape[0]) if kind != "tensor" else ("tensor", b), []).append(b)
    outs: list = [None] * len(qs)
    for key, members in groups.items():
        if len(members) == 1 or key[0] == "tensor" or key[1] == 0:
            for b in members:
                outs[b] = _sdpa_block(qs[b], ks[b], vs[b], masks[b])
            continue
        kind, n, s = key
        q, k, v = (torch.stack([t[b] for b in members]).transpose(1, 2) for t in (qs, ks, vs))  # (G, H, n|S, D)
        mask = None if kind == FULL else bottom_right_causal_mask(n, s, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)  # (G, n, H, D)
        for i, b in enumerate(members):
            outs[b] = out[i]
    return outs


def _explicit(m: Mask, q, k) -> torch.Tensor:
    if isinstance(m, torch.Tensor):
        return m.to(q.device)
    if m == CAUSAL:
        return bottom_right_causal_mask(q.shape[0], k.shape[0], q.device)
    return torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)


def _sdpa_block(q, k, v, m: Mask) -> torch.Tensor:
    """SDPA for one block. 4-D (1, H, n, D) views: 3-D inputs leave SDPA's fast CPU kernel."""
    n, s = q.shape[0], k.shape[0]
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n|S, D)
    if n == 0:
        return q.clone()
    if isinstance(m, torch.Tensor):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=m.to(q.device), enable_gqa=True)
    elif m == FULL or n == 1:  # one query at the end sees every key
        out = F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bottom_right_causal_mask(n, s, q.device),
                                             enable_gqa=True)
    return out[0].transpose(0, 1)  # (n, Hq, D)


def _flash_blocks(qs, ks, vs, masks) -> list:
    """FULL blocks in one varlen call, CAUSAL blocks in another; tensor masks through SDPA."""
    flash_varlen = kernels.flash_varlen_func(qs[0].device)  # looked up late: tests stub it
    outs: list = [None] * len(qs)
    for kind, causal in ((FULL, False), (CAUSAL, True)):
        group = [b for b, m in enumerate(masks) if isinstance(m, str) and m == kind and qs[b].shape[0]]
        if not group:
            continue
        q_lens, k_lens = [qs[b].shape[0] for b in group], [ks[b].shape[0] for b in group]
        device = qs[group[0]].device
        cu = lambda lens: torch.tensor([0] + cumsum(lens), dtype=torch.int32, device=device)  # noqa: E731
        out = flash_varlen(torch.cat([qs[b] for b in group]), torch.cat([ks[b] for b in group]),
                           torch.cat([vs[b] for b in group]), cu(q_lens), cu(k_lens), max(q_lens), max(k_lens),
                           causal=causal)  # (sum n, Hq, D)
        for b, o in zip(group, out.split(q_lens)):
            outs[b] = o
    for b, o in enumerate(outs):
        if o is None:
            outs[b] = _sdpa_block(qs[b], ks[b], vs[b], masks[b])
    return outs
