"""Attention for query blocks that sit at the end of their keys: inference over a KV cache.

Each block b has queries q_b (n_b, Hq, D) that are the LAST n_b positions of its keys k_b, v_b
(S_b, Hkv, D) (a context's cached prefix followed by the block itself), and one of three masks:

- `FULL`:   every query sees every key (image blocks, single-token decoding);
- `CAUSAL`: bottom-right causal, query i sees key j iff j <= i + S - n (a text block prefilled
            on top of a cache; flash-attn >= 2.1's `causal=True`, while SDPA's `is_causal` is
            top-left aligned, so SDPA gets an explicit mask);
- a (n, S) bool tensor (tree attention for speculative decoding).

Two entry points. `cached_attention` takes the blocks as lists of tensors. `row_attention`
takes them where inference keeps them: padded query blocks (B, q_max, Hq, D) and one layer of a
KV cache whose row r holds a block's cached prefix followed by the block's own keys. Its plan
(`plan_rows`) is made once per forward, not per layer: blocks with one query length, one key
length and one mask kind form a group, and a group is ONE SDPA call (the guidance branches and
images of a denoising step, or of a batched prefill or decoding step). Where the group's blocks
and rows are consecutive (a denoising step's contexts, copied into consecutive rows) the call
reads views of the cache, with no copies; no per-block Python runs per layer.

Backends follow `BagelConfig.attn_backend` (`resolve_cached_backend`): `dense` is the float
reference; `flash` runs the FULL blocks in one flash-attn varlen call and the CAUSAL blocks in
another (keys gathered into one packed tensor), tensor masks through SDPA; every other backend
runs SDPA on views of the cache (no copies).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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
        _check_mask(b, m, q.shape[0], k.shape[0])
    if backend == "dense":
        return [kernels.dense_attention(q, k, v, _explicit(m, q, k)) for q, k, v, m in zip(qs, ks, vs, masks)]
    if backend == "flash":
        return _flash_blocks(qs, ks, vs, masks)
    return [_sdpa_block(q, k, v, m) for q, k, v, m in zip(qs, ks, vs, masks)]


def _check_mask(b: int, m: Mask, n: int, keys: int) -> None:
    """Block b's mask must be FULL, CAUSAL or an (n, keys) bool tensor."""
    if isinstance(m, torch.Tensor):
        if tuple(m.shape) != (n, keys):
            raise ValueError(f"cached_attention: block {b}'s mask has shape {tuple(m.shape)}, expected {(n, keys)}")
    elif m not in (FULL, CAUSAL):
        raise ValueError(f"cached_attention: mask {m!r}; expected {FULL!r}, {CAUSAL!r} or a bool tensor")


def consecutive(ids: list[int]) -> slice | None:
    """ids as a slice when they are consecutive and ascending (index with a view, no copy)."""
    return slice(ids[0], ids[0] + len(ids)) if ids and ids == list(range(ids[0], ids[0] + len(ids))) else None


@dataclass(frozen=True)
class RowGroup:
    """Query blocks of one shape (n queries, `keys` keys each) and one mask: `blocks` of the padded
    queries, their cache `rows` in the same order. Slices where they are consecutive (views, no
    copies), index tensors otherwise."""

    blocks: slice | torch.Tensor
    rows: slice | torch.Tensor
    n: int
    keys: int
    # the group's mask as SDPA adds it to the scores (n, keys): 0 where a query may look, -inf
    # elsewhere (what SDPA makes of a bool mask on every call), made once per plan, not per layer;
    # None: FULL, or a backend that runs block by block (`dense`, `flash`: RowPlan.masks)
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class RowPlan:
    """`row_attention`'s plan for one forward: the groups, or for `dense` / `flash` the blocks."""

    backend: str
    groups: tuple[RowGroup, ...]
    rows: tuple[int, ...]
    lens: tuple[int, ...]  # cached keys before each block
    q_lens: tuple[int, ...]
    masks: tuple

    def one_key_longer(self) -> "RowPlan | None":
        """The plan of the next decoding step: the same single-query blocks, each row holding the
        token decoded last as one more cached key (a single query sees every key, so no mask
        moves). None unless every block is one query without a mask of its own."""
        if any(n != 1 for n in self.q_lens) or any(isinstance(m, torch.Tensor) for m in self.masks):
            return None
        groups = tuple(replace(g, keys=g.keys + 1) for g in self.groups)
        return replace(self, groups=groups, lens=tuple(n + 1 for n in self.lens))


def plan_rows(rows: list[int], lens: list[int], q_lens: list[int], masks: list[Mask], backend: str,
              device=None, dtype: torch.dtype = torch.float32) -> RowPlan:
    """Block b: cache row rows[b], lens[b] cached keys, q_lens[b] queries, mask masks[b]; `dtype`:
    the queries' (SDPA's masks are made in it)."""
    kernels.check_backend(backend)
    members: dict[tuple, list[int]] = {}
    for b, (cached, n, m) in enumerate(zip(lens, q_lens, masks)):
        _check_mask(b, m, n, cached + n)
        if isinstance(m, torch.Tensor):
            members[("tensor", b)] = [b]
            continue
        kind = FULL if n == 1 else m  # one query at the end sees every key
        members.setdefault((kind, n, cached + n), []).append(b)

    def index(ids: list[int]) -> slice | torch.Tensor:
        return consecutive(ids) or torch.tensor(ids, device=device)

    groups = []
    for key, bs in members.items():
        n, keys = q_lens[bs[0]], lens[bs[0]] + q_lens[bs[0]]
        mask = masks[bs[0]] if key[0] == "tensor" else key[0]
        groups.append(RowGroup(index(bs), index([rows[b] for b in bs]), n, keys,
                               _scores_mask(mask, n, keys, device, dtype) if backend == "sdpa" else None))
    return RowPlan(backend, tuple(groups), tuple(rows), tuple(lens), tuple(q_lens), tuple(masks))


def _scores_mask(mask: Mask, n: int, keys: int, device, dtype: torch.dtype) -> torch.Tensor | None:
    """A group's mask as SDPA adds it to the scores (see RowGroup.mask); None for FULL."""
    if isinstance(mask, str) and mask == FULL:
        return None
    allowed = mask.to(device) if isinstance(mask, torch.Tensor) else bottom_right_causal_mask(n, keys, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def row_attention(plan: RowPlan, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q (B, q_max, Hq, D): padded query blocks; keys/values (rows, capacity, Hkv, D): one layer
    of the KV cache, each block's own keys already written after its prefix -> (B, q_max, Hq, D),
    zero on padding. `sdpa`: one call per group, the same numbers as block by block (blocks of
    one query: to the last bit; SDPA's CPU kernel is not batch-invariant there)."""
    if plan.backend in ("dense", "flash"):
        out = torch.zeros_like(q)
        outs = cached_attention([q[b, :n] for b, n in enumerate(plan.q_lens)],
                                [keys[r, : c + n] for r, c, n in zip(plan.rows, plan.lens, plan.q_lens)],
                                [values[r, : c + n] for r, c, n in zip(plan.rows, plan.lens, plan.q_lens)],
                                list(plan.masks), plan.backend)
        for b, (o, n) in enumerate(zip(outs, plan.q_lens)):
            out[b, :n] = o
        return out
    kernels.check_qkv(q[0], keys[0], values[0])
    # One group of every block at full length (decoding; a denoising step's blocks of one shape):
    # that call's output is the whole output, with no zero-filled copy.
    out = None if len(plan.groups) == 1 and _covers(plan.groups[0], q) else torch.zeros_like(q)
    for g in plan.groups:
        if g.n == 0:
            continue
        qh = q[g.blocks, : g.n].transpose(1, 2)  # (G, Hq, n, D)
        kh, vh = (t[g.rows, : g.keys].transpose(1, 2) for t in (keys, values))  # (G, Hkv, S, D)
        if torch.is_grad_enabled() and keys.requires_grad:  # autograd keeps SDPA's inputs, and later
            kh, vh = kh.clone(), vh.clone()  # layers' writes into the cache would change these views
        mask = g.mask
        if mask is not None and mask.dtype != q.dtype:  # a plan made for another dtype
            mask = mask.to(q.dtype)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True).transpose(1, 2)
        if out is None:
            return o
        out[g.blocks, : g.n] = o
    return out


def _covers(g: RowGroup, q: torch.Tensor) -> bool:
    """Whether group g is every block of q (B, q_max, ...) at full length."""
    return isinstance(g.blocks, slice) and g.blocks == slice(0, q.shape[0]) and g.n == q.shape[1] > 0


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
