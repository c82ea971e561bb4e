"""Key/value cache for inference: rows of per-layer keys and values, and context handles.

Storage is one tensor per keys/values for all layers, `(layers, rows, capacity, kv_heads,
head_dim)`, grown by doubling (rows or capacity) only when full, so appending never reallocates
the whole cache per call. A `Context` is a light handle `(cache, row, length, rope)`: the first
`length` slots of `row` are its keys/values and `rope` is its next RoPE position.

Forking is free: `ctx.fork()` returns a handle on the same row and length. Rows are
copy-on-write: before a context writes past its length, `reserve` checks whether another live
handle on the row is longer; if so, the context's prefix is first copied to a fresh row. So a CFG
context taken as a fork of the full context before its last text costs nothing, and parent and
child never see each other's appends. A row is free again once its last handle is gone.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, rows: int = 4, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, rows, capacity, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Live handles per row; a row whose handles are all gone is free again.
        self.handles: list[weakref.WeakSet] = [weakref.WeakSet() for _ in range(rows)]

    @classmethod
    def for_model(cls, model, rows: int = 4, capacity: int = 256) -> "KVCache":
        c = model.cfg.llm
        w = model.llm.embed_tokens.weight
        return cls(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, rows, capacity, w.dtype, w.device)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def num_rows(self) -> int:
        return self.keys.shape[1]

    def new_context(self) -> "Context":
        ctx = Context(self, self._free_row())
        self.handles[ctx.row].add(ctx)
        return ctx

    def _free_row(self) -> int:
        for r, live in enumerate(self.handles):
            if not len(live):
                return r
        self._grow(rows=2 * self.num_rows)
        return self._free_row()

    def _grow(self, rows: int | None = None, capacity: int | None = None) -> None:
        rows, capacity = rows or self.num_rows, capacity or self.capacity
        old_r, old_c = self.num_rows, self.capacity
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], rows, capacity, *old.shape[3:])
            new[:, :old_r, :old_c] = old
            setattr(self, name, new)
        self.handles += [weakref.WeakSet() for _ in range(rows - old_r)]

    def reserve(self, ctx: "Context", n: int, taken_rows: set[int] = frozenset()) -> None:
        """Make slots [ctx.length, ctx.length + n) of ctx's row safe for ctx to write.

        `taken_rows`: rows that other contexts of the same forward call write into."""
        others = max((h.length for h in self.handles[ctx.row] if h is not ctx), default=0)
        if others > ctx.length or ctx.row in taken_rows:  # copy-on-write
            row = self._free_row()
            self.keys[:, row, : ctx.length] = self.keys[:, ctx.row, : ctx.length]
            self.values[:, row, : ctx.length] = self.values[:, ctx.row, : ctx.length]
            self.handles[ctx.row].discard(ctx)
            self.handles[row].add(ctx)
            ctx.row = row
        if ctx.length + n > self.capacity:
            cap = self.capacity
            while cap < ctx.length + n:
                cap *= 2
            self._grow(capacity=cap)

    def reserve_forward(self, contexts: list["Context"], lens: list[int]) -> None:
        """`reserve` for the contexts of one forward, contexts[b] writing lens[b] slots: no two of
        them write into the same row."""
        taken: set[int] = set()
        for ctx, n in zip(contexts, lens):
            self.reserve(ctx, n, taken)
            taken.add(ctx.row)


@dataclass(eq=False)  # identity semantics: handles live in weak sets
class Context:
    """A handle on one cached sequence: its row, cached length, and next RoPE position."""

    cache: KVCache
    row: int
    length: int = 0
    rope: int = 0

    def fork(self) -> "Context":
        """A context sharing this one's prefix, without copying it (copy-on-write on append)."""
        child = Context(self.cache, self.row, self.length, self.rope)
        self.cache.handles[self.row].add(child)
        return child

    def trim(self, length: int, rope: int | None = None) -> None:
        """Forget everything after the first `length` cached tokens (e.g. rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot trim a context of length {self.length} to {length}")
        self.length = length
        if rope is not None:
            self.rope = rope
