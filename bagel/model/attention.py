"""Packed attention for the Mixture-of-Transformers decoder: masks and backends.

The decoder sees one flat sequence (no batch dimension) holding several samples. Each sample is
a list of consecutive *splits*, each with an attention mode:

- `causal`: lower-triangular within the split (text);
- `full`:   bidirectional within the split (ViT tokens, clean VAE latents);
- `noise`:  bidirectional within the split, and invisible to every other split of the sample
            (noisy VAE latents: later text must not read the noise, only the clean copy).

Every split also sees all of the earlier splits of its own sample (except their `noise` ones);
no token sees another sample. The rule, for query i and key j of one sample:

    allowed = (j <= i  or  (same split and that split is full/noise))
              and not (j in a noise split and i outside that split)

It is written once, in `_mask_rule`, and shared by the dense mask, the per-split masks and flex.

Backends (one `prepare_attention` per batch, one `packed_attention` per layer):

- `dense`:     float math with an (L, L) mask; the reference for tests.
- `sdpa`:      one SDPA call with the (L, L) bool mask.
- `sdpa_loop`: one SDPA call per split (consecutive causal splits fused, tiny neighbours merged,
               equal whole-sample images batched); each call sees only its sample's visible
               prefix. 2-3x faster than `sdpa` at 4k tokens on our CPU
               (shared/reference/cpu-machine-facts.md section 2): the CPU training default.
- `flex`:      flex_attention with a BlockMask. No backward on CPU in torch 2.13, and eager
               flex is 10-20x slower than SDPA there: use it compiled, on GPU.
- `flash`:     flash-attn varlen (CUDA, fp16/bf16 only): one varlen call for the causal runs
               (bottom-right causal over their visible prefix) and one for the full/noise
               splits, each over gathered visible keys. Untested on hardware here; its plan is
               tested on CPU through a stand-in kernel with flash-attn's contract.

`bagel/model/cached_attention.py` holds the variants for queries at the end of a KV cache
(bottom-right causal) and a one-call block-diagonal attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

ATTN_MODES = ("causal", "full", "noise")
BACKENDS = ("dense", "sdpa", "sdpa_loop", "flex", "flash")

# sdpa_loop merges two neighbouring calls when the masked-out (wasted) query-key pairs the merge
# adds are at most this many: a tiny SDPA call alone costs ~15 us on our CPU, plus the loop's
# slicing and its backward. Measured on 330 splits of 2-24 tokens at L=4096 (H=8, D=64):
# fwd+bwd 97 ms unmerged (241 calls), 59 ms at 1024 or 4096 (67 / 34 calls), 87 ms at 16384.
MERGE_MAX_WASTED_PAIRS = 4096


# ----------------------------------------------------------------------------------------------
# Layout


@dataclass
class AttentionLayout:
    """Segment structure of one packed sequence.

    sample_lens: tokens per sample; split_lens / attn_modes: one entry per split, in sequence
    order, the splits of each sample consecutive. An empty layout (no samples, L = 0) is allowed:
    every backend then returns an empty output.
    """

    sample_lens: list[int]
    split_lens: list[int]
    attn_modes: list[str]

    def __post_init__(self):
        self.sample_lens = [int(n) for n in self.sample_lens]
        self.split_lens = [int(n) for n in self.split_lens]
        self.attn_modes = list(self.attn_modes)
        if len(self.split_lens) != len(self.attn_modes):
            raise ValueError(
                f"AttentionLayout: {len(self.split_lens)} split_lens but "
                f"{len(self.attn_modes)} attn_modes; expected one mode per split"
            )
        for name, lens in (("sample_lens", self.sample_lens), ("split_lens", self.split_lens)):
            bad = [(i, n) for i, n in enumerate(lens) if n <= 0]
            if bad:
                raise ValueError(f"AttentionLayout: {name} must be positive, got (index, len) {bad}")
        for i, mode in enumerate(self.attn_modes):
            if mode not in ATTN_MODES:
                raise ValueError(
                    f"AttentionLayout: split {i} has unknown attention mode {mode!r}; "
                    f"expected one of {ATTN_MODES}"
                )
        if sum(self.split_lens) != sum(self.sample_lens):
            raise ValueError(
                f"AttentionLayout: split_lens sum to {sum(self.split_lens)} but sample_lens sum to "
                f"{sum(self.sample_lens)}"
            )
        sample_ends = set(_cumsum(self.sample_lens))
        pos = 0
        for i, n in enumerate(self.split_lens):
            crossed = [end for end in sample_ends if pos < end < pos + n]
            if crossed:
                raise ValueError(
                    f"AttentionLayout: split {i} (tokens {pos}..{pos + n}) crosses the sample "
                    f"boundary at token {min(crossed)}; a split must lie inside one sample"
                )
            pos += n

    @property
    def length(self) -> int:
        return sum(self.sample_lens)


def block_diagonal_layout(seqlens: list[int]) -> AttentionLayout:
    """One bidirectional sample per sequence: the ViT layout (each image attends to itself)."""
    seqlens = [int(n) for n in seqlens]
    return AttentionLayout(seqlens, seqlens, ["full"] * len(seqlens))


def _cumsum(lens: list[int]) -> list[int]:
    ends, total = [], 0
    for n in lens:
        total += n
        ends.append(total)
    return ends


# ----------------------------------------------------------------------------------------------
# The mask rule


@dataclass
class _TokenInfo:
    """Per-token ids that the mask rule reads; each (L,)."""

    doc: torch.Tensor  # sample index, int64
    split: torch.Tensor  # global split index, int64
    bidir: torch.Tensor  # bool: the token's split is full or noise
    noise: torch.Tensor  # bool: the token's split is noise


def _token_info(layout: AttentionLayout, device) -> _TokenInfo:
    sample_lens = torch.tensor(layout.sample_lens, dtype=torch.long, device=device)
    split_lens = torch.tensor(layout.split_lens, dtype=torch.long, device=device)
    doc = torch.repeat_interleave(torch.arange(len(layout.sample_lens), device=device), sample_lens)
    split = torch.repeat_interleave(torch.arange(len(layout.split_lens), device=device), split_lens)
    bidir = torch.tensor([m != "causal" for m in layout.attn_modes], dtype=torch.bool, device=device)
    noise = torch.tensor([m == "noise" for m in layout.attn_modes], dtype=torch.bool, device=device)
    return _TokenInfo(doc=doc, split=split, bidir=bidir[split], noise=noise[split])


def _mask_rule(info: _TokenInfo, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """True where query position q_idx may attend key position kv_idx (broadcasting).

    Works on index grids (dense and per-split masks) and on the scalars flex's mask_mod gets.
    """
    same_doc = info.doc[q_idx] == info.doc[kv_idx]
    same_split = info.split[q_idx] == info.split[kv_idx]
    visible = (kv_idx <= q_idx) | (same_split & info.bidir[q_idx])
    hidden_noise = info.noise[kv_idx] & ~same_split
    return same_doc & visible & ~hidden_noise


def dense_mask(layout: AttentionLayout, device=None) -> torch.Tensor:
    """The reference (L, L) bool mask, True = query row may attend key column."""
    info = _token_info(layout, device)
    pos = torch.arange(layout.length, device=device)
    return _mask_rule(info, pos[:, None], pos[None, :])  # (L, L)


def bottom_right_causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """(q_len, kv_len) bool: query i sees key j iff j <= i + kv_len - q_len.

    The queries are the last q_len of the kv_len positions (a KV-cached chunk). This is
    flash-attn >= 2.1's `causal=True`; SDPA's `is_causal` is top-left aligned instead.
    """
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return k <= q + (kv_len - q_len)


# ----------------------------------------------------------------------------------------------
# Work units for the per-split backends (sdpa_loop, flash)


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
class _LoopPlan:
    """sdpa_loop's calls, and the key blocks that k, v are split into before slicing.

    Slicing k straight from the (L, ...) tensor costs a zero-filled (L, Hkv, D) gradient per
    call in backward (241 calls at L=4096: fwd+bwd 370 ms, against 97 ms with blocks).
    Splitting k first into blocks (samples, unless a call spans several) bounds each fill to
    its block.
    """

    calls: list[_Call]
    block_lens: list[int]


def _plan_calls(layout: AttentionLayout, info: _TokenInfo, device, max_waste: int) -> _LoopPlan:
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
    cuts = set(_cumsum(layout.sample_lens))
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
        mask = _mask_rule(info, q_pos[:, None], keys[None, :])  # (n_q, n_k)
        is_causal = False
        if bool(mask.all()):
            mask = None
        elif ranges == [(first.q_lo, q_hi)] and torch.equal(mask, torch.ones_like(mask).tril()):
            mask, is_causal = None, True  # a causal run at its sample's start: plain causal
        key_slice = (ranges[0][0] - at, ranges[0][1] - at) if len(ranges) == 1 else None
        key_index = None if key_slice is not None else keys - at
        calls.append(_Call(q_hi - first.q_lo, block, key_slice, key_index, mask, is_causal, 1))
    return _LoopPlan(calls, [e - s for s, e in zip(block_starts, block_ends)])


def _is_image_batch(group: list[_Span]) -> bool:
    return all(
        not s.causal and s.q_lo == s.key_lo and s.q_hi == s.sample_hi and s.n == group[0].n
        for s in group
    )


@dataclass
class _FlashPart:
    """One flash_attn_varlen_func call: all causal runs, or all full/noise splits."""

    causal: bool
    q_index: torch.Tensor  # (Tq,) query positions, span after span
    k_index: torch.Tensor  # (Tk,) visible key positions, span after span
    cu_seqlens_q: torch.Tensor  # (n_spans + 1,) int32
    cu_seqlens_k: torch.Tensor  # (n_spans + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int


def _plan_flash(layout: AttentionLayout, device) -> tuple[list[_FlashPart], torch.Tensor]:
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
        parts.append(_FlashPart(
            causal=causal,
            q_index=q_index.to(device),
            k_index=torch.cat(k_idx).to(device),
            cu_seqlens_q=_cu_seqlens(q_lens, device),
            cu_seqlens_k=_cu_seqlens(k_lens, device),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(k_lens),
        ))
    inverse = torch.argsort(torch.cat(order)) if order else torch.zeros(0, dtype=torch.long)
    return parts, inverse.to(device)


def _cu_seqlens(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0] + _cumsum(lens), dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------
# Plans and the packed attention entry point


@dataclass
class AttentionPlan:
    """Everything a backend needs per batch, built once by `prepare_attention`."""

    backend: str
    length: int
    mask: torch.Tensor | None = None  # dense, sdpa: (L, L) bool
    loop: _LoopPlan | None = None  # sdpa_loop
    block_mask: BlockMask | None = None  # flex
    compile_flex: bool = False
    flash_parts: list[_FlashPart] = field(default_factory=list)  # flash
    flash_inverse: torch.Tensor | None = None  # flash: (L,) output order


def prepare_attention(
    layout: AttentionLayout,
    backend: str,
    device=None,
    *,
    compile_flex: bool = False,
    merge_max_wasted_pairs: int = MERGE_MAX_WASTED_PAIRS,
) -> AttentionPlan:
    """Build the per-batch attention plan (masks, index tensors, BlockMask, cu_seqlens).

    compile_flex: run flex through torch.compile (meant for GPU; on CPU the first compile takes
    ~16 s). merge_max_wasted_pairs: sdpa_loop merges neighbouring calls while the merge adds
    at most this many masked-out query-key pairs (0: no merging; equal images still batch).
    """
    _check_backend(backend)
    device = torch.device(device) if device is not None else torch.device("cpu")
    plan = AttentionPlan(backend=backend, length=layout.length, compile_flex=compile_flex)
    if layout.length == 0:
        return plan
    if backend in ("dense", "sdpa"):
        plan.mask = dense_mask(layout, device)
    elif backend == "sdpa_loop":
        info = _token_info(layout, device)
        plan.loop = _plan_calls(layout, info, device, merge_max_wasted_pairs)
    elif backend == "flex":
        info = _token_info(layout, device)

        def mask_mod(b, h, q_idx, kv_idx):
            return _mask_rule(info, q_idx, kv_idx)

        plan.block_mask = create_block_mask(
            mask_mod, None, None, layout.length, layout.length, device=device
        )
    else:  # flash
        _flash_varlen_func(device)  # fail here, once, rather than in every layer
        plan.flash_parts, plan.flash_inverse = _plan_flash(layout, device)
    return plan


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan
) -> torch.Tensor:
    """Attention over a packed sequence. q: (L, Hq, D); k, v: (L, Hkv, D) -> (L, Hq, D).

    Scale 1/sqrt(D). GQA: query head h reads kv head h // (Hq // Hkv).
    """
    _check_qkv(q, k, v)
    if q.shape[0] != plan.length or k.shape[0] != plan.length:
        raise ValueError(
            f"packed_attention: q has {q.shape[0]} and k {k.shape[0]} tokens but the "
            f"{plan.backend!r} plan was prepared for L={plan.length}"
        )
    if plan.length == 0:  # keep k and v in the graph: FSDP needs every parameter in every step
        return q.clone() + (k.sum() + v.sum()) * 0
    if plan.backend == "dense":
        return _dense_attention(q, k, v, plan.mask)
    if plan.backend == "sdpa":
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # (1, H, L, D)
            attn_mask=plan.mask, enable_gqa=True,
        )
        return out[0].transpose(0, 1)  # (L, Hq, D)
    if plan.backend == "sdpa_loop":
        return _sdpa_loop(q, k, v, plan.loop)
    if plan.backend == "flex":
        flex = _compiled_flex() if plan.compile_flex else flex_attention
        out = flex(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],  # (1, H, L, D)
            block_mask=plan.block_mask, enable_gqa=True,
        )
        return out[0].transpose(0, 1)  # (L, Hq, D)
    return _flash_packed(q, k, v, plan)


def _dense_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in plain float math. q: (L, Hq, D), k/v: (S, Hkv, D)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (S, Hq, D)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])  # (Hq, L, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)  # (L, Hq, D)


def _sdpa_loop(q, k, v, loop: _LoopPlan) -> torch.Tensor:
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


def _flash_packed(q, k, v, plan: AttentionPlan) -> torch.Tensor:
    flash_varlen = _flash_varlen_func(q.device)
    outs = []
    for p in plan.flash_parts:
        outs.append(flash_varlen(
            q[p.q_index], k[p.k_index], v[p.k_index], p.cu_seqlens_q, p.cu_seqlens_k,
            p.max_seqlen_q, p.max_seqlen_k, causal=p.causal,
        ))  # (Tq, Hq, D)
    return torch.cat(outs)[plan.flash_inverse]  # (L, Hq, D)


# ----------------------------------------------------------------------------------------------
# Checks and optional kernels


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")


def _check_qkv(q, k, v) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"attention expects q (L, Hq, D) and k, v (S, Hkv, D) of equal shapes; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"attention: head dims must match and Hq must be a multiple of Hkv; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}"
        )


def _flash_varlen_func(device):
    """flash_attn_varlen_func, or a RuntimeError saying what is missing and what to use."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is None or torch.device(device).type != "cuda":
        missing = "flash-attn is not installed" if flash_attn_varlen_func is None else (
            f"flash-attn needs CUDA tensors, got device {torch.device(device)}"
        )
        raise RuntimeError(
            f"attention backend 'flash': {missing}. Use backend='sdpa_loop' (CPU training, the "
            f"default), 'sdpa', or 'flex' (GPU, compile_flex=True) instead."
        )
    return flash_attn_varlen_func


_COMPILED_FLEX = None


def _compiled_flex():
    # Compiled once per process: each torch.compile wrapper has its own cache.
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX
