"""One batched LLM forward of new query blocks against cached contexts.

Each context of the batch gets one `Query` (embeddings, RoPE ids, which rows the generation
expert owns, causal or not). The blocks are padded to a common length and run through the MoT
layers in one pass (projections and MLPs batched); in every layer each block's keys/values are
written into its context's cache row right after the cached prefix, and each block attends over
a view of its row (cache + block; bottom-right causal for text: query i sees every cached key
plus block keys 0..i).

`commit=True` makes the block part of the context (prefill, decoding); `commit=False` leaves it
as scratch (denoising queries, which the official inferencer never caches either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bagel.inference.kv_cache import Context
from bagel.model.mot import Routing


@dataclass
class Query:
    embeds: torch.Tensor  # (n, D) input embeddings
    positions: torch.Tensor  # (n,) long RoPE ids
    gen_rows: torch.Tensor  # (n,) bool: rows owned by the generation expert (VAE latents)
    causal: bool  # text: causal (bottom-right); images: bidirectional within the block
    # (n, n) bool: query i sees block key j. Replaces the causal/bidirectional block mask (the
    # cached prefix stays fully visible); tree attention for speculative decoding.
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]


def _row_mask(q: Query, cached: int, device) -> torch.Tensor | None:
    """(n, cached + n) bool over one context's keys, or None when everything is visible.

    Causal text: block query i sees every cached key and block keys 0..i (bottom-right aligned).
    A custom block mask (tree attention) keeps the cached prefix fully visible."""
    n = len(q)
    if q.mask is not None:
        if q.mask.shape != (n, n):
            raise ValueError(f"Query.mask has shape {tuple(q.mask.shape)}, expected {(n, n)}")
        return torch.cat([torch.ones(n, cached, dtype=torch.bool, device=device), q.mask.to(device)], dim=1)
    if not q.causal or n == 1:
        return None
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(cached + n, device=device)[None, :]
    return j <= cached + i


@torch.no_grad()
def forward_queries(model, contexts: list[Context], queries: list[Query], commit: bool) -> list[torch.Tensor]:
    """Run `queries[b]` against `contexts[b]` for all b in one batch -> hidden states after the
    expert-wise final norm, one (n_b, D) tensor per query."""
    if len(contexts) != len(queries) or not contexts:
        raise ValueError(f"need one query per context, got {len(queries)} queries for {len(contexts)} contexts")
    cache = contexts[0].cache
    if any(c.cache is not cache for c in contexts):
        raise ValueError("all contexts of one forward must live in the same KVCache")
    B, q_lens = len(contexts), [len(q) for q in queries]
    q_max, d = max(q_lens), queries[0].embeds.shape[-1]
    taken: set[int] = set()
    for ctx, n in zip(contexts, q_lens):
        cache.reserve(ctx, n, taken)
        taken.add(ctx.row)
    device = queries[0].embeds.device
    lens = [c.length for c in contexts]

    # Pad the blocks to (B * q_max) packed rows; padding rows use the und expert at position 0.
    x = queries[0].embeds.new_zeros(B, q_max, d)
    positions = torch.zeros(B, q_max, dtype=torch.long, device=device)
    gen = torch.zeros(B, q_max, dtype=torch.bool, device=device)
    valid = torch.zeros(B, q_max, dtype=torch.bool, device=device)
    for b, q in enumerate(queries):
        n = len(q)
        x[b, :n], positions[b, :n], gen[b, :n], valid[b, :n] = q.embeds, q.positions, q.gen_rows, True
    flat = torch.arange(B * q_max, device=device)
    route = Routing(und=flat[~gen.flatten()], gen=flat[gen.flatten()])
    # Where each valid query token's key/value goes in the cache.
    b_idx, i_idx = valid.nonzero(as_tuple=True)
    rows = [c.row for c in contexts]
    row_idx = torch.tensor(rows, device=device)[b_idx]
    slot_idx = torch.tensor(lens, device=device)[b_idx] + i_idx
    # Attention runs per context on views of its cache row: no padding, and no mask at all for
    # bidirectional blocks and single-token steps (SDPA's fast kernels need mask=None).
    row_masks = [_row_mask(q, l, device) for q, l in zip(queries, lens)]

    def attend(layer: int):
        def fn(q, k, v):  # q: (B*q_max, Hq, hd), k/v: (B*q_max, Hkv, hd)
            cache.keys[layer, row_idx, slot_idx] = k.reshape(B, q_max, *k.shape[1:])[b_idx, i_idx]
            cache.values[layer, row_idx, slot_idx] = v.reshape(B, q_max, *v.shape[1:])[b_idx, i_idx]
            q = q.reshape(B, q_max, *q.shape[1:])
            out = torch.zeros_like(q)
            for b, (row, l, n) in enumerate(zip(rows, lens, q_lens)):
                keys = cache.keys[layer, row, : l + n].transpose(0, 1)[None]  # (1, Hkv, l+n, hd)
                values = cache.values[layer, row, : l + n].transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(q[b, :n].transpose(0, 1)[None], keys, values,
                                                   attn_mask=row_masks[b], enable_gqa=True)  # (1, Hq, n, hd)
                out[b, :n] = o[0].transpose(0, 1)
            return out.reshape(B * q_max, *out.shape[2:])
        return fn

    llm = model.llm
    h = x.reshape(B * q_max, d)
    cos, sin = llm.rope(positions.flatten(), h.dtype)
    for i, layer in enumerate(llm.layers):
        h = layer(h, cos, sin, route, attend(i))
    h = llm.final_norm(h, route).reshape(B, q_max, d)
    if commit:
        for ctx, n in zip(contexts, q_lens):
            ctx.length += n
    return [h[b, :n] for b, n in enumerate(q_lens)]
