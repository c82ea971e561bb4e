"""Attention for the MoT decoder and the ViT, behind one small namespace.

- `layout`: the packed layout (samples, splits, modes) and the one mask rule;
- `packed`: training attention over a packed sequence, one plan per batch (`dense`, `sdpa`,
  `sdpa_loop`, `flex`, `flash`);
- `cached`: inference attention for query blocks at the end of a KV cache (as lists, or in
  place in the cache's rows with a plan per forward), with the same backend choice
  (`BagelConfig.attn_backend`);
- `split`: the per-split plans behind `sdpa_loop` and `flash`; `kernels`: the float reference and
  the optional kernels.
"""

from bagel.model.attention import kernels
from bagel.model.attention.cached import (CAUSAL, FULL, RowPlan, cached_attention, consecutive, plan_rows,
                                          resolve_cached_backend, row_attention)
from bagel.model.attention.kernels import dense_attention
from bagel.model.attention.layout import AttentionLayout, block_diagonal_layout, bottom_right_causal_mask, dense_mask
from bagel.model.attention.packed import AttentionPlan, packed_attention, prepare_attention

__all__ = ["AttentionLayout", "AttentionPlan", "CAUSAL", "FULL", "RowPlan", "block_diagonal_layout",
           "bottom_right_causal_mask", "cached_attention", "consecutive", "dense_attention", "dense_mask", "kernels",
           "packed_attention", "plan_rows", "prepare_attention", "resolve_cached_backend", "row_attention"]
