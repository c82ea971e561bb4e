"""The packed attention layout and its mask rule (the one definition every backend follows).

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

It is written once, in `mask_rule`, and shared by the dense mask, the per-split masks and flex.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel.batch import ATTN_MODES

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
        sample_ends = set(cumsum(self.sample_lens))
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


def cumsum(lens: list[int]) -> list[int]:
    ends, total = [], 0
    for n in lens:
        total += n
        ends.append(total)
    return ends


# ----------------------------------------------------------------------------------------------
# The mask rule


@dataclass
class TokenInfo:
    """Per-token ids that the mask rule reads; each (L,)."""

    doc: torch.Tensor  # sample index, int64
    split: torch.Tensor  # global split index, int64
    bidir: torch.Tensor  # bool: the token's split is full or noise
    noise: torch.Tensor  # bool: the token's split is noise


def token_info(layout: AttentionLayout, device) -> TokenInfo:
    sample_lens = torch.tensor(layout.sample_lens, dtype=torch.long, device=device)
    split_lens = torch.tensor(layout.split_lens, dtype=torch.long, device=device)
    doc = torch.repeat_interleave(torch.arange(len(layout.sample_lens), device=device), sample_lens)
    split = torch.repeat_interleave(torch.arange(len(layout.split_lens), device=device), split_lens)
    bidir = torch.tensor([m != "causal" for m in layout.attn_modes], dtype=torch.bool, device=device)
    noise = torch.tensor([m == "noise" for m in layout.attn_modes], dtype=torch.bool, device=device)
    return TokenInfo(doc=doc, split=split, bidir=bidir[split], noise=noise[split])


def mask_rule(info: TokenInfo, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
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
    info = token_info(layout, device)
    pos = torch.arange(layout.length, device=device)
    return mask_rule(info, pos[:, None], pos[None, :])  # (L, L)


def bottom_right_causal_mask(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """(q_len, kv_len) bool: query i sees key j iff j <= i + kv_len - q_len.

    The queries are the last q_len of the kv_len positions (a KV-cached chunk). This is
    flash-attn >= 2.1's `causal=True`; SDPA's `is_causal` is top-left aligned instead.
    """
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return k <= q + (kv_len - q_len)
