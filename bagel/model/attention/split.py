"""The per-split backends: `sdpa_loop` (one SDPA call per split) and `flash` (flash-attn varlen).

Both cut the packed layout into *spans*: queries that share their visible keys (a split, or a run
of consecutive causal splits of a sample, which is one bottom-right causal block over its visible
prefix). `sdpa_loop` merges tiny neighbouring spans into one masked call and batches equal
whole-sample images; it is 2-3x faster than one dense-mask SDPA call at 4k tokens on our CPU
(scripts/bench/bench_attention.py), hence the CPU training default. `flash` runs one
varlen call for the causal runs and one for the full/noise splits, each over gathered visible keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bagel.model.attention import kernels
from bagel.model.attention.layout import AttentionLayout, TokenInfo, cumsum, mask_rule

# sdpa_loop merges two neighbouring calls when the masked-out (wasted) query-key pairs the merge
# adds are at most this many: a tiny SDPA call alone costs ~15 us on our CPU, plus the loop's
# slicing and its backward. Measured on 330 splits of 2-24 tokens at L=4096 (H=8, D=64):
# fwd+bwd 97 ms unmerged (241 calls), 59 ms at 1024 or 4096 (67 / 34 calls), 87 ms at 16384.
MERGE_MAX_WASTED_PAIRS = 4096

@dataclass
class _Span:
    """Queries [q_lo, q_hi) that share their keys: [key_lo, q_hi) minus `hidden` ranges."""

    q_lo: int
    q_hi: int
    key_lo: int  # start of the sample of q_lo
    sample_hi: int  # end of that sample
    hidden: list[tuple[int, int]]  # earlier noise splits of the sample, invisible to these queries
    causal: bool  # a run of causal splits; otherwise a single full/noise split

    @property
    def n(self) -> int:
        return self.q_hi - self.q_lo


def _split_spans(layout: AttentionLayout) -> list[_Span]:
    """One span per split, consecutive causal splits of a sample fused into one.

    Fusing is exact: a run of causal splits with the same visible prefix is one causal block
    (query i of the run sees the prefix and run keys up to i), i.e. bottom-right causal.
    """
    spans: list[_Span] = []
    splits = iter(zip(layout.split_lens, layout.attn_modes))
    pos = 0
    for sample_len in layout.sample_lens:
        s_lo, s_hi, hidden = pos, pos + sample_len, []
        while pos < s_hi:
            n, mode = next(splits)
            last = spans[-1] if spans else None
            if mode == "causal" and last is not None and last.causal and last.key_lo == s_lo:
                last.q_hi = pos + n
            else:
                spans.append(_Span(pos, pos + n, s_lo, s_hi, list(hidden), mode == "causal"))
            if mode == "noise":
                hidden.append((pos, pos + n))
            pos += n
    return spans


def _key_positions(key_lo: int, key_hi: int, hidden: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[key_lo, key_hi) minus the hidden ranges (sorted, inside it), as contiguous ranges."""
    ranges, lo = [], key_lo
    for a, b in hidden:
        if a > lo:
            ranges.append((lo, a))
        lo = b
    ranges.append((lo, key_hi))
    return ranges


@dataclass
class _Call:
    """One SDPA call of the sdpa_loop plan; key positions are relative to its key block."""

    n_q: int  # queries: the next n_q positions (calls tile the sequence in order)
    block: int  # index of the key block holding all of this call's keys
    key_slice: tuple[int, int] | None  # contiguous keys [lo, hi) of the block, or
    key_index: torch.Tensor | None  # gathered key positions (earlier noise splits dropped)
    mask: torch.Tensor | None  # (n_q, n_k) bool; None: all visible, or is_causal
    is_causal: bool  # square top-left causal: let SDPA skip the upper blocks
    n_batch: int  # > 1: n_batch equal whole-sample images stacked as a batch, no mask


@dataclass
class LoopPlan:
    """sdpa_loop's calls, and the key blocks that k, v are split into before slicing.

    Slicing k straight from the (L, ...) tensor costs a zero-filled (L, Hkv, D) gradient per
    call in backward (241 calls at L=4096: fwd+bwd 370 ms, against 97 ms with blocks).
    Splitting k first into blocks (samples, unless a call spans several) bounds each fill to
    its block.
    """

    calls: list[_Call]
    block_lens: list[int]


def plan_loop(layout: AttentionLayout, info: TokenInfo, device, max_waste: int) -> LoopPlan:
    """Group split spans into SDPA calls and precompute their key ranges and masks."""
    groups: list[list[_Span]] = []
    for span in _split_spans(layout):
        prev = groups[-1] if groups else None
        whole = not span.causal and span.q_lo == span.key_lo and span.q_hi == span.sample_hi
        if prev is not None and whole and _is_image_batch(prev) and prev[0].n == span.n:
            prev.append(span)  # ViT-style equal images: one batched call, no mask
            continue
        if prev is not None and not (len(prev) > 1 and _is_image_batch(prev)):
            n_prev = prev[-1].q_hi - prev[0].q_lo
            same_sample = span.key_lo == prev[0].key_lo
            # Across samples only when the group started at its sample's start, so the only
            # extra keys the new span's queries get (masked out) are the group's own.
            starts_clean = prev[0].q_lo == prev[0].key_lo
            if (same_sample or starts_clean) and n_prev * span.n <= max_waste:
                prev.append(span)
                continue
        groups.append([span])

    # Key blocks: the samples, fused where one call's keys cross a sample boundary.
    cuts = set(cumsum(layout.sample_lens))
    for group in groups:
        lo, hi = group[0].key_lo, group[-1].q_hi
        cuts = {c for c in cuts if not lo < c < hi}
    block_ends = sorted(cuts)
    block_starts = [0] + block_ends[:-1]

    calls, block = [], 0
    for group in groups:
        first, q_hi = group[0], group[-1].q_hi
        while block_ends[block] < q_hi:
            block += 1
        at = block_starts[block]
        if len(group) > 1 and _is_image_batch(group):
            key_slice = (first.q_lo - at, q_hi - at)
            calls.append(_Call(q_hi - first.q_lo, block, key_slice, None, None, False, len(group)))
            continue
        ranges = _key_positions(first.key_lo, q_hi, first.hidden)
        keys = torch.cat([torch.arange(lo, hi, device=device) for lo, hi in ranges])
        q_pos = torch.arange(first.q_lo, q_hi, device=device)
        mask = mask_rule(info, q_pos[:, None], keys[None, :])  # (n_q, n_k)
        is_causal = False
        if bool(mask.all()):
            mask = None
        elif ranges == [(first.q_lo, q_hi)] and torch.equal(mask, torch.ones_like(mask).tril()):
            mask, is_causal = None, True  # a causal run at its sample's start: plain causal
        key_slice = (ranges[0][0] - at, ranges[0][1] - at) if len(ranges) == 1 else None
        key_index = None if key_slice is not None else keys - at
        calls.append(_Call(q_hi - first.q_lo, block, key_slice, key_index, mask, is_causal, 1))
    return LoopPlan(calls, [e - s for s, e in zip(block_starts, block_ends)])


def _is_image_batch(group: list[_Span]) -> bool:
    return all(
        not s.causal and s.q_lo == s.key_lo and s.q_hi == s.sample_hi and s.n == group[0].n
        for s in group
    )


@dataclass
class FlashPart:
    """One flash_attn_varlen_func call: all causal runs, or all full/noise splits."""

    causal: bool
    q_index: torch.Tensor  # (Tq,) query positions, span after span
    k_index: torch.Tensor  # (Tk,) visible key positions, span after span
    cu_seqlens_q: torch.Tensor  # (n_spans + 1,) int32
    cu_seqlens_k: torch.Tensor  # (n_spans + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int


def plan_flash(layout: AttentionLayout, device) -> tuple[list[FlashPart], torch.Tensor]:
    """Varlen calls over the split spans; their keys are the span's visible prefix + itself.

    The full/noise spans need causal=False and the causal runs bottom-right causal=True, hence
    two calls. Returns the parts and the permutation that puts their outputs back in order.
    """
    parts, order = [], []
    for causal in (True, False):
        spans = [s for s in _split_spans(layout) if s.causal == causal]
        if not spans:
            continue
        q_idx, k_idx, q_lens, k_lens = [], [], [], []
        for s in spans:
            keys = [torch.arange(a, b) for a, b in _key_positions(s.key_lo, s.q_hi, s.hidden)]
            q_idx.append(torch.arange(s.q_lo, s.q_hi))
            k_idx.extend(keys)
            q_lens.append(s.n)
            k_lens.append(sum(len(k) for k in keys))
        q_index = torch.cat(q_idx)
        order.append(q_index)
        parts.append(FlashPart(
            causal=causal,
            q_index=q_index.to(device),
            k_index=torch.cat(k_idx).to(device),
            cu_seqlens_q=cu_seqlens(q_lens, device),
            cu_seqlens_k=cu_seqlens(k_lens, device),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(k_lens),
        ))
    inverse = torch.argsort(torch.cat(order)) if order else torch.zeros(0, dtype=torch.long)
    return parts, inverse.to(device)


def cu_seqlens(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + cumsum(lens), dtype=torch.int32, device=device)



def run_loop(q, k, v, loop: LoopPlan) -> torch.Tensor:
    # 4-D views: with 3-D (H, L, D) inputs SDPA on CPU leaves its flash kernel and runs ~3x
    # slower (measured at L=4096, H=8, D=64); strided views cost nothing extra.
    qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, D)
    q_parts = qh.split([c.n_q for c in loop.calls], dim=2)  # disjoint: one cheap backward
    k_blocks, v_blocks = kh.split(loop.block_lens, dim=2), vh.split(loop.block_lens, dim=2)
    outs = []
    for c, qc in zip(loop.calls, q_parts):  # qc: (1, Hq, n, D)
        kb, vb = k_blocks[c.block], v_blocks[c.block]
        if c.key_slice is not None:
            lo, hi = c.key_slice
            kc, vc = kb[:, :, lo:hi], vb[:, :, lo:hi]  # (1, Hkv, S, D)
        else:
            kc, vc = kb.index_select(2, c.key_index), vb.index_select(2, c.key_index)
        if c.n_batch > 1:
            qc, kc, vc = (t[0].unflatten(1, (c.n_batch, -1)).transpose(0, 1) for t in (qc, kc, vc))
            out = F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=True)  # (N, Hq, n, D)
            outs.append(out.transpose(0, 1).flatten(1, 2))  # (Hq, N * n, D)
            continue
        out = F.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=c.mask, is_causal=c.is_causal, enable_gqa=True
        )
        outs.append(out[0])  # (Hq, n, D)
    return torch.cat(outs, dim=1).transpose(0, 1)  # (L, Hq, D)


def run_flash(q, k, v, parts: list[FlashPart], inverse: torch.Tensor) -> torch.Tensor:
    flash_varlen = kernels.flash_varlen_func(q.device)  # looked up late: tests stub it
    outs = []
    for p in parts:
        outs.append(flash_varlen(
            q[p.q_index], k[p.k_index], v[p.k_index], p.cu_seqlens_q, p.cu_seqlens_k,
            p.max_seqlen_q, p.max_seqlen_k, causal=p.causal,
        ))  # (Tq, Hq, D)
    return torch.cat(outs)[inverse]  # (L, Hq, D)
