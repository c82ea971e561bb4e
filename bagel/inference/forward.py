"""One batched LLM forward of new query blocks against cached contexts.

Each context of the batch gets one `Query` (embeddings, RoPE ids, which rows the generation
expert owns, causal or not). The blocks are padded to a common length and run through the MoT
layers in one pass; in every layer the block's keys/values are written into its context's cache
row right after the cached prefix, then one SDPA call attends over (batch, cache + block) with
a mask that encodes each row's cached length, the block length, and bottom-right causality
(a cached text query i sees every cached key plus block keys 0..i).

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

    def __len__(self) -> int:
        return self.embeds.shape[0]


def _attention_mask(lens: list[int], q_lens: list[int], causal: list[bool], q_max: int, device) -> torch.Tensor:
    """(B, 1, q_max, S) bool: query i of row b sees cached keys j < len_b and block keys up to
    len_b + i (causal) or len_b + q_b (bidirectional). Padded query rows see key 0 (no NaNs)."""
    S = max(l + q for l, q in zip(lens, q_lens))
    i = torch.arange(q_max, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    masks = []
    for l, q, c in zip(lens, q_lens, causal):
        limit = (l + i + 1) if c else torch.full_like(i, l + q)
        m = j < limit
        m = torch.where(i < q, m, j == 0)  # padding rows
        masks.append(m)
    return torch.stack(masks)[:, None]


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
    rows_t = torch.tensor([c.row for c in contexts], device=device)
    row_idx = rows_t[b_idx]
    slot_idx = torch.tensor(lens, device=device)[b_idx] + i_idx
    S = max(l + q for l, q in zip(lens, q_lens))
    mask = _attention_mask(lens, q_lens, [q.causal for q in queries], q_max, device)
    rows = [c.row for c in contexts]
    contiguous = rows == list(range(rows[0], rows[0] + B))

    def attend(layer: int):
        def fn(q, k, v):  # q: (B*q_max, Hq, hd), k/v: (B*q_max, Hkv, hd)
            cache.keys[layer, row_idx, slot_idx] = k.reshape(B, q_max, *k.shape[1:])[b_idx, i_idx]
            cache.values[layer, row_idx, slot_idx] = v.reshape(B, q_max, *v.shape[1:])[b_idx, i_idx]
            if contiguous:
                keys, values = cache.keys[layer, rows[0]:rows[0] + B, :S], cache.values[layer, rows[0]:rows[0] + B, :S]
            else:
                keys, values = cache.keys[layer, rows_t, :S], cache.values[layer, rows_t, :S]
            out = F.scaled_dot_product_attention(
                q.reshape(B, q_max, *q.shape[1:]).transpose(1, 2),  # (B, Hq, q_max, hd)
                keys.transpose(1, 2), values.transpose(1, 2),  # (B, Hkv, S, hd)
                attn_mask=mask, enable_gqa=True)
            return out.transpose(1, 2).reshape(B * q_max, *q.shape[1:])
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
