"""Token-budget packing: a stream of decoded samples -> `PackedBatch`es of about a fixed size.

Greedy first-fit with an overflow buffer (the official `PackedDataset` idea, data/dataset_base.py in the release,
without its two silent drops):

1. A pack first takes, in FIFO order, every buffered sample that still fits.
2. Then it takes samples from the stream. One that does not fit goes to the overflow buffer.
3. The pack is closed once it holds `expected_tokens`, or when a sample does not fit while the
   buffer is full; that sample is still buffered (the buffer may hold max_buffer + 1), never
   dropped. The release discards it there.
4. A sample longer than `max_tokens_per_sample` cannot be packed: it is skipped and counted
   (`too_long`). The release skips these without counting.
5. At the end of a finite stream the buffer is flushed into final packs.

Counting uses the exact packed length (text + 2, image grid + 2) after CFG dropout, which the
decoder decides per sample from (seed, key, visit); the per-pack layout and timestep draws are
`bagel.packing.pack_samples`' job, with a generator seeded per pack from (seed, slot, pack
index), so resuming needs no RNG state.
The buffer is saved as sample references and re-decoded on restore.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import get_worker_info

from bagel.batch import PackedBatch
from bagel.packing import pack_samples
from data_pipelines.decode import DecodedSample
from data_pipelines.mixing import PackingConfig
from data_pipelines.shards import SampleRef, count_skip, stable_seed


@dataclass
class Pack:
    batch: PackedBatch
    keys: list[str]  # sample keys in pack order
    num_tokens: int  # budgeted tokens (before CFG dropout); batch.sequence_length is after
    max_tokens: int  # the budget
    slot: int = 0
    index: int = 0  # pack number within its slot
    state: dict[str, Any] | None = None  # the producing slot's state right after this pack
    stats: dict[str, int] = field(default_factory=dict)  # the slot's cumulative skip counts


class TokenBudgetPacker:
    """Groups samples under a token budget; `next_group()` is the pure selection logic."""

    def __init__(self, samples: Iterator[DecodedSample], config: PackingConfig, stats: Counter):
        self.samples, self.config, self.stats = samples, config, stats
        self.buffer: list[DecodedSample] = []
        self.stream_done = False

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [tuple(s.ref) for s in self.buffer], "stream_done": self.stream_done}

    def load_state_dict(self, state: dict[str, Any],
                        fetch: Callable[[list[SampleRef]], list[DecodedSample]]) -> None:
        self.buffer = fetch([SampleRef(*r) for r in state["buffer"]])
        self.stream_done = state["stream_done"]

    def _next_sample(self) -> DecodedSample | None:
        while not self.stream_done:
            sample = next(self.samples, None)
            if sample is None:
                self.stream_done = True
                break
            if sample.num_tokens > self.config.max_tokens_per_sample:
                count_skip(self.stats, "too_long", f"{sample.key}: {sample.num_tokens} tokens > "
                           f"max_tokens_per_sample={self.config.max_tokens_per_sample}")
                continue
            return sample
        return None

    def next_group(self) -> list[DecodedSample] | None:
        """The samples of the next pack, or None when stream and buffer are both empty."""
        cap, expected = self.config.max_tokens, self.config.expected_tokens
        group: list[DecodedSample] = []
        total = 0
        kept = []
        for sample in self.buffer:  # FIFO first fit
            if total < expected and total + sample.num_tokens <= cap:
                group.append(sample)
                total += sample.num_tokens
            else:
                kept.append(sample)
        self.buffer = kept
        while total < expected:
            sample = self._next_sample()
            if sample is None:
                break
            if total + sample.num_tokens <= cap:
                group.append(sample)
                total += sample.num_tokens
                continue
            full = len(self.buffer) >= self.config.max_buffer
            self.buffer.append(sample)
            if full:
                break
        # An empty group means stream and buffer are both empty: any buffered sample fits an
        # empty pack (admission checked num_tokens <= max_tokens_per_sample <= max_tokens).
        return group or None


class PackBuilder:
    """TokenBudgetPacker + `pack_samples`: yields `Pack`s for one slot."""

    def __init__(self, packer: TokenBudgetPacker, model_cfg, tokens, *, seed: int, slot: int):
        self.packer, self.model_cfg, self.tokens = packer, model_cfg, tokens
        self.seed, self.slot = seed, slot
        self.index = 0

    def __iter__(self) -> "PackBuilder":
        return self

    def __next__(self) -> Pack:
        group = self.packer.next_group()
        if group is None:
            raise StopIteration
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "pack", self.slot, self.index))
        # CFG dropout was decided at decode time (SampleDecoder), so num_tokens are real tokens.
        batch = pack_samples([s.plan for s in group], self.model_cfg, self.tokens, generator=generator,
                             shared_memory=get_worker_info() is not None)
        pack = Pack(batch=batch, keys=[s.key for s in group],
                    num_tokens=sum(s.num_tokens for s in group),
                    max_tokens=self.packer.config.max_tokens, slot=self.slot, index=self.index)
        self.index += 1
        return pack
