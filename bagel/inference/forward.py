"""One batched decoder forward of new query blocks against cached contexts.

Each context of the batch gets one `Query` (embeddings, RoPE ids, which rows the generation
expert owns, causal or not). The blocks are padded to a common length and run through the
decoder layers in one pass (projections and MLPs batched); in every layer each block's
keys/values are written into its context's cache row right after the cached prefix, and each
block attends over its row (cache + block) through `bagel.model.attention.row_attention`, with
the backend the model's config names and a plan made once per forward.

The layers are passed explicitly as a `DecoderStack` (the LLM's, or an MTP drafter's one-block
stack), so the same code serves both.

`commit=True` makes the block part of the context (prefill, decoding); `commit=False` leaves it
as scratch (denoising queries, which the official inferencer never caches either).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

from bagel.inference.kv_cache import Context
from bagel.model.attention import CAUSAL, FULL, RowPlan, consecutive, plan_rows, resolve_cached_backend, row_attention
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


@dataclass
class DecoderStack:
    """What a cached forward runs: layers called as `layer(x, cos, sin, route, attend)`, the RoPE
    table function, an optional final norm `(h, route) -> h`, and the attention backend name."""

    layers: Sequence[nn.Module]
    rope: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    final_norm: Callable[[torch.Tensor, Routing], torch.Tensor] | None
    backend: str
    first_layer: int = 0  # the cache layer of layers[0]


def llm_stack(model) -> DecoderStack:
    """The LLM of a Bagel: its MoT layers, RoPE, expert-wise final norm and attention backend."""
    return DecoderStack(model.llm.layers, model.llm.rope, model.llm.final_norm, model.cfg.attn_backend)


def _block_mask(q: Query, cached: int, device):
    """The cached-attention mask of one block over its cache + block keys."""
    n = len(q)
    if q.mask is not None:
        if q.mask.shape != (n, n):
            raise ValueError(f"Query.mask has shape {tuple(q.mask.shape)}, expected {(n, n)}")
        return torch.cat([torch.ones(n, cached, dtype=torch.bool, device=device), q.mask.to(device)], dim=1)
    return CAUSAL if q.causal and n > 1 else FULL


@torch.no_grad()
def forward_queries(stack: DecoderStack, contexts: list[Context], queries: list[Query],
                    commit: bool) -> list[torch.Tensor]:
    """Run `queries[b]` against `contexts[b]` for all b in one batch -> hidden states after the
    final norm, one (n_b, D) tensor per query."""
    blocks = Blocks.prepare(stack, contexts, queries)
    h = blocks.run(stack.layers, stack.first_layer, blocks.embeddings(queries), stack.final_norm)
    if commit:
        for ctx, n in zip(contexts, blocks.q_lens):
            ctx.length += n
    return blocks.unpad(h)


@torch.no_grad()
def decode_step(stack: DecoderStack, contexts: list[Context], embeds: torch.Tensor, positions: torch.Tensor,
                previous: "Blocks | None" = None) -> tuple[torch.Tensor, "Blocks"]:
    """One new token per context (embeds (B, D) at RoPE ids `positions` (B,)), committed to the
    contexts -> (hidden states (B, D) after the final norm, the blocks to hand back as `previous`
    next step, which then only advance: `Blocks.advance`)."""
    blocks = previous.advance(stack, contexts, positions) if previous is not None else None
    if blocks is None:
        no_gen = torch.zeros(1, dtype=torch.bool, device=embeds.device)
        blocks = Blocks.prepare(stack, contexts, [Query(embeds[b:b + 1], positions[b:b + 1], no_gen, causal=True)
                                                  for b in range(len(contexts))])
    h = blocks.run(stack.layers, stack.first_layer, embeds[:, None], stack.final_norm)
    for ctx in contexts:
        ctx.length += 1
    return h, blocks


@dataclass(frozen=True)
class CacheSlots:
    """Where a forward's real (not padding) query rows write their keys and values: the cache
    rows `rows` at offsets `offsets`, and which padded rows (`blocks`, `index`) those are. When
    every block is unpadded and the blocks sit in consecutive rows at one offset (decoding one
    sequence; a batch of equal contexts) `rows` and `offsets` are slices and the write is one
    copy into a view of the cache."""

    rows: torch.Tensor | slice
    offsets: torch.Tensor | slice
    blocks: torch.Tensor | None = None  # (n_real,): padded block of each real row; None: all rows
    index: torch.Tensor | None = None  # (n_real,): its row inside the block

    @classmethod
    def of(cls, rows: Sequence[int], lens: Sequence[int], q_lens: Sequence[int], q_max: int,
           valid: torch.Tensor) -> "CacheSlots":
        block_rows = consecutive(list(rows))
        if block_rows is not None and len(set(lens)) == 1 and all(n == q_max for n in q_lens):
            return cls(block_rows, slice(lens[0], lens[0] + q_max))
        device = valid.device
        b_idx, i_idx = valid.nonzero(as_tuple=True)
        return cls(torch.tensor(rows, device=device)[b_idx], torch.tensor(lens, device=device)[b_idx] + i_idx,
                   b_idx, i_idx)

    def one_slot_on(self) -> "CacheSlots":
        """The slots one further along each row (the next decoding step's)."""
        if isinstance(self.offsets, slice):
            return replace(self, offsets=slice(self.offsets.start + 1, self.offsets.stop + 1))
        return replace(self, offsets=self.offsets + 1)

    def write(self, store: torch.Tensor, new: torch.Tensor) -> None:
        """store: one layer of the cache (rows, capacity, H, hd); new: (B, q_max, H, hd)."""
        store[self.rows, self.offsets] = new if self.blocks is None else new[self.blocks, self.index]


@dataclass
class Blocks:
    """Query blocks padded into one batch against their cache rows: everything a decoder layer
    needs besides the hidden states (routing, RoPE tables, cache slots, the attention plan), built
    once per forward, or once per generation for the denoising steps, whose blocks change only in
    their embeddings (`check` makes sure a reused one still fits); `subset` keeps the rows it
    needs (the step cache's second pass). `run` takes the padded embeddings."""

    cache: object
    q_max: int  # the padded block length
    cos: torch.Tensor  # (B, q_max, head_dim) RoPE tables at each row's position
    sin: torch.Tensor
    gen: torch.Tensor  # (B, q_max) bool: generation-expert rows
    valid: torch.Tensor  # (B, q_max) bool: real (not padding) rows
    attention: RowPlan  # also holds each block's cache row, cached length and query length
    route: Routing  # the experts' rows of the flattened (B * q_max) batch
    slots: CacheSlots

    @property
    def rows(self) -> tuple[int, ...]:
        return self.attention.rows

    @property
    def lens(self) -> tuple[int, ...]:
        return self.attention.lens

    @property
    def q_lens(self) -> tuple[int, ...]:
        return self.attention.q_lens

    @property
    def B(self) -> int:
        return len(self.q_lens)

    @classmethod
    def prepare(cls, stack: DecoderStack, contexts: list[Context], queries: list[Query]) -> "Blocks":
        """The blocks of `queries` against `contexts` (their embeddings: `embeddings`)."""
        if len(contexts) != len(queries) or not contexts:
            raise ValueError(f"need one query per context, got {len(queries)} queries for {len(contexts)} contexts")
        cache = contexts[0].cache
        if any(c.cache is not cache for c in contexts):
            raise ValueError("all contexts of one forward must live in the same KVCache")
        q_lens = [len(q) for q in queries]
        q_max = max(q_lens)
        cache.reserve_forward(contexts, q_lens)
        device, dtype = queries[0].embeds.device, queries[0].embeds.dtype
        lens, rows = [c.length for c in contexts], [c.row for c in contexts]
        # Pad the blocks to (B * q_max) packed rows; padding rows use the und expert at position 0.
        positions = pad_sequence([q.positions for q in queries], batch_first=True)
        gen = pad_sequence([q.gen_rows for q in queries], batch_first=True)
        valid = torch.arange(q_max, device=device)[None] < torch.tensor(q_lens, device=device)[:, None]
        masks = [_block_mask(q, n, device) for q, n in zip(queries, lens)]
        plan = plan_rows(rows, lens, q_lens, masks, resolve_cached_backend(stack.backend, device, dtype), device, dtype)
        cos, sin = (t.view(len(queries), q_max, -1) for t in stack.rope(positions.flatten(), dtype))
        return cls(cache, q_max, cos, sin, gen, valid, plan, _routing(gen), CacheSlots.of(rows, lens, q_lens, q_max, valid))

    def advance(self, stack: DecoderStack, contexts: list[Context], positions: torch.Tensor) -> "Blocks | None":
        """The blocks of the next decoding step, derived from this one's when it decoded one token
        per context and the contexts are the same, each one token longer: only the RoPE tables (at
        `positions` (B,)), the cache slots and the key counts move, so the step does not rebuild
        its routing and attention plan. None when that does not hold (a context moved to another
        row on copy-on-write, the batch changed): then the step needs `prepare`."""
        plan = self.attention.one_key_longer()
        if plan is None or any(c.cache is not self.cache for c in contexts):
            return None  # (prepare reserves the slots then)
        self.cache.reserve_forward(contexts, [1] * len(contexts))
        now = (tuple(c.row for c in contexts), tuple(c.length for c in contexts))
        if now != (self.rows, tuple(n + 1 for n in self.lens)):
            return None
        cos, sin = (t.view(self.B, 1, -1) for t in stack.rope(positions, self.cos.dtype))
        return replace(self, cos=cos, sin=sin, attention=plan, slots=self.slots.one_slot_on())

    def check(self, contexts: list[Context], x: torch.Tensor) -> "Blocks":
        """self, after making sure it was prepared for these contexts (rows, cached lengths) and
        padded embeddings of x's shape (B, q_max, D)."""
        now = (tuple(c.row for c in contexts), tuple(c.length for c in contexts), tuple(x.shape[:2]))
        if now != (self.rows, self.lens, (self.B, self.q_max)):
            raise ValueError(f"prepared blocks (rows, cached lengths, blocks x length) "
                             f"{(self.rows, self.lens, (self.B, self.q_max))} do not fit this forward's {now}")
        return self

    def embeddings(self, queries: list[Query]) -> torch.Tensor:
        """The queries' embeddings, padded like the blocks: (B, q_max, D)."""
        return pad_sequence([q.embeds for q in queries], batch_first=True)

    def subset(self, keep: list[int]) -> "Blocks":
        """The blocks `keep` alone (their padding unchanged)."""
        q_lens, lens, rows = [self.q_lens[b] for b in keep], [self.lens[b] for b in keep], [self.rows[b] for b in keep]
        a = self.attention
        plan = plan_rows(rows, lens, q_lens, [a.masks[b] for b in keep], a.backend, self.gen.device, self.cos.dtype)
        gen, valid = self.gen[keep], self.valid[keep]
        return Blocks(self.cache, self.q_max, self.cos[keep], self.sin[keep], gen, valid, plan, _routing(gen),
                      CacheSlots.of(rows, lens, q_lens, self.q_max, valid))

    def unpad(self, h: torch.Tensor) -> list[torch.Tensor]:
        h = h.reshape(self.B, self.q_max, -1)
        return [h[b, :n] for b, n in enumerate(self.q_lens)]

    def run(self, layers, first_layer: int, x: torch.Tensor, final_norm) -> torch.Tensor:
        """`layers` (cache layers first_layer, first_layer + 1, ...) over x (B, q_max, D), then
        `final_norm` if given -> (B * q_max, D)."""
        B, q_max, d = self.B, self.q_max, x.shape[-1]
        cache, plan, slots = self.cache, self.attention, self.slots

        def attend(layer: int):
            def fn(q, k, v):  # q: (B*q_max, Hq, hd), k/v: (B*q_max, Hkv, hd)
                slots.write(cache.keys[layer], k.reshape(B, q_max, *k.shape[1:]))
                slots.write(cache.values[layer], v.reshape(B, q_max, *v.shape[1:]))
                out = row_attention(plan, q.reshape(B, q_max, *q.shape[1:]), cache.keys[layer], cache.values[layer])
                return out.reshape(B * q_max, *out.shape[2:])
            return fn

        h = x.reshape(B * q_max, d)
        cos, sin = self.cos.flatten(0, 1), self.sin.flatten(0, 1)
        for i, layer in enumerate(layers, start=first_layer):
            h = layer(h, cos, sin, self.route, attend(i))
        if final_norm is not None:
            h = final_norm(h, self.route)
        return h


def _routing(gen: torch.Tensor) -> Routing:
    """The experts' rows of padded blocks flattened to (B * q_max) rows; gen: (B, q_max) bool."""
    gen = gen.flatten()
    flat = torch.arange(gen.numel(), device=gen.device)
    return Routing(und=flat[~gen], gen=flat[gen], skip_empty=True)
