"""Attention for queries that sit at the end of their keys (inference with a KV cache), and a
convenience for the ViT. The packed training attention lives in bagel/model/attention.py.

`cached_attention`: sequences of a batch concatenated; sequence b's queries are the LAST q_lens[b]
positions of its kv_lens[b] keys. `causal=True` is bottom-right aligned (flash-attn >= 2.1
semantics): query i of a chunk of Lq sees key j iff j <= i + Lk - Lq, which is what makes a
cached causal prefill work (SDPA's `is_causal` is top-left aligned, so an explicit mask is used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel.model import attention
from bagel.model.attention import (_check_backend, _check_qkv, _cu_seqlens, _dense_attention, block_diagonal_layout,
                                   bottom_right_causal_mask, packed_attention, prepare_attention)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: list[int],
    kv_lens: list[int],
    causal: bool = True,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention for a batch of sequences whose queries are the LAST q_lens[b] of kv_lens[b].

    q: (sum q_lens, Hq, D); k, v: (sum kv_lens, Hkv, D), sequences concatenated -> like q.
    causal=True is bottom-right aligned (query i sees key j iff j <= i + kv_len - q_len), so a
    chunk prefilled on top of a cache matches the uncached run; causal=False sees every key.
    Backends: `flash` (varlen, CUDA); `dense` (float math reference); `sdpa`, and `sdpa_loop` /
    `flex` as its aliases (a per-sequence SDPA call, or one batched call when all the sequences
    have equal lengths: the per-sequence masks are tiny, a BlockMask would not pay off).
    """
    _check_backend(backend)
    _check_qkv(q, k, v)
    q_lens, kv_lens = [int(n) for n in q_lens], [int(n) for n in kv_lens]
    if len(q_lens) != len(kv_lens):
        raise ValueError(f"cached_attention: {len(q_lens)} q_lens but {len(kv_lens)} kv_lens")
    bad = [(b, lq, lk) for b, (lq, lk) in enumerate(zip(q_lens, kv_lens)) if not 0 <= lq <= lk]
    if bad:
        raise ValueError(f"cached_attention: need 0 <= q_len <= kv_len, got (seq, q, kv) {bad}")
    if sum(q_lens) != q.shape[0] or sum(kv_lens) != k.shape[0]:
        raise ValueError(
            f"cached_attention: q has {q.shape[0]} tokens and k {k.shape[0]}, but q_lens sum "
            f"to {sum(q_lens)} and kv_lens to {sum(kv_lens)}"
        )
    if backend == "flash":
        flash_varlen = attention._flash_varlen_func(q.device)  # looked up late: tests stub it
        return flash_varlen(
            q, k, v, _cu_seqlens(q_lens, q.device), _cu_seqlens(kv_lens, q.device),
            max(q_lens), max(kv_lens), causal=causal,
        )
    if backend == "dense":
        outs, q_at, k_at = [], 0, 0
        for lq, lk in zip(q_lens, kv_lens):
            mask = (bottom_right_causal_mask(lq, lk, q.device) if causal
                    else torch.ones(lq, lk, dtype=torch.bool, device=q.device))
            outs.append(_dense_attention(q[q_at:q_at + lq], k[k_at:k_at + lk], v[k_at:k_at + lk], mask))
            q_at, k_at = q_at + lq, k_at + lk
        return torch.cat(outs) if outs else q.clone()
    if len(set(q_lens)) == 1 and len(set(kv_lens)) == 1:  # equal lengths (e.g. CFG branches)
        b, lq, lk = len(q_lens), q_lens[0], kv_lens[0]
        if lq == 0:
            return q.clone()
        out = _sdpa_chunk(
            q.unflatten(0, (b, lq)).transpose(1, 2),  # (B, Hq, Lq, D)
            k.unflatten(0, (b, lk)).transpose(1, 2),  # (B, Hkv, Lk, D)
            v.unflatten(0, (b, lk)).transpose(1, 2), causal,
        )
        return out.transpose(1, 2).flatten(0, 1)  # (B * Lq, Hq, D)
    outs, q_at, k_at = [], 0, 0
    for lq, lk in zip(q_lens, kv_lens):
        if lq:
            out = _sdpa_chunk(
                q[q_at:q_at + lq].transpose(0, 1)[None],  # (1, Hq, Lq, D)
                k[k_at:k_at + lk].transpose(0, 1)[None], v[k_at:k_at + lk].transpose(0, 1)[None],
                causal,
            )
            outs.append(out[0].transpose(0, 1))  # (Lq, Hq, D)
        q_at, k_at = q_at + lq, k_at + lk
    return torch.cat(outs) if outs else q.clone()


def _sdpa_chunk(q, k, v, causal: bool) -> torch.Tensor:
    """SDPA for queries that are the last positions of the keys. q: (B, Hq, Lq, D)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if not causal or lq == 1:  # one query at the end sees every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if lq == lk:  # no cache: bottom-right == top-left, and SDPA skips the masked blocks
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    mask = bottom_right_causal_mask(lq, lk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def block_diagonal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqlens: list[int], backend: str = "sdpa_loop"
) -> torch.Tensor:
    """Bidirectional attention within each packed sequence (ViT images). q, k, v: (L, H*, D).

    Prepares a plan on every call; a ViT with many layers should prepare
    `block_diagonal_layout(seqlens)` once and call `packed_attention` per layer instead.
    With sdpa_loop, equal-length images run as one batched SDPA call.
    """
    plan = prepare_attention(block_diagonal_layout(seqlens), backend, q.device)
    return packed_attention(q, k, v, plan)


