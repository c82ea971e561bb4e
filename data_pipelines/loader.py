"""The training-side loader: shards -> decoded samples -> packs, over DataLoader workers, resumable.

Every (rank, worker) pair is a *slot* with its own deterministic pipeline (`SlotPipeline`: source
streams, mixer, packer). Each pack carries the state of its slot right after it was made, so the
main process knows, for every slot, the state matching the last pack it *consumed*, whatever the
workers have prefetched.

The order of packs is fixed by us, not by DataLoader scheduling: round-robin over the workers of
this rank, skipping those that have finished (a worker sends an explicit end marker, so the end is
seen in-stream). `PackLoader.state_dict()` = per-worker slot states + the round-robin cursor; a
loader restored from it yields exactly the packs the uninterrupted one would have yielded next,
with any number of workers. A state saved with another world size or worker count resumes
elastically (data_pipelines/elastic.py): 0 samples lost or repeated within the epoch.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bagel.packing import CfgDropout
from bagel.tokenizer import SpecialTokens, load_tokenizer
from data_pipelines.decode import SampleDecoder
from data_pipelines.elastic import reshard_slots
from data_pipelines.mixing import DataConfig, Mixer
from data_pipelines.packer import Pack, PackBuilder, TokenBudgetPacker
from data_pipelines.shards import DataError, Manifest
from bagel.transforms import VAE_DEFAULT, VIT_DEFAULT

STATE_VERSION = 1


@dataclass
class _WorkerDone:
    worker: int
    stats: dict | None = None  # the worker's skip counts at its end


def special_tokens_of(tokenizer) -> SpecialTokens:
    if hasattr(tokenizer, "convert_tokens_to_ids"):
        return SpecialTokens.from_tokenizer(tokenizer)
    from bagel.tokenizer import SPECIAL_TOKENS  # a bare `tokenizers.Tokenizer`

    ids = {k: tokenizer.token_to_id(v) for k, v in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise DataError(f"tokenizer has no {missing} token(s)")
    return SpecialTokens(**ids)


class SlotPipeline:
    """Streams -> mixer -> packer for one slot; iterating yields `Pack`s with `state` set."""

    def __init__(self, config: DataConfig, manifests: dict[str, Manifest], tokenizer, tokens,
                 model_cfg, *, slot: int, num_slots: int):
        self.stats: Counter = Counter()
        vae, vit = config.transforms.get("vae", VAE_DEFAULT), config.transforms.get("vit", VIT_DEFAULT)
        d = config.packing.dropout
        dropout = CfgDropout(text=d.get("text", 0.0), vit=d.get("vit", 0.0), vae=d.get("vae", 0.0))
        decoder = SampleDecoder(tokenizer, tokens, vae=vae, vit=vit, seed=config.seed, dropout=dropout)
        self.mixer = Mixer(config, manifests, decoder, slot=slot, num_slots=num_slots, stats=self.stats)
        self.packer = TokenBudgetPacker(self.mixer, config.packing, self.stats)
        self.builder = PackBuilder(self.packer, model_cfg, tokens, seed=config.seed, slot=slot)
        self.slot = slot

    def state_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer.state_dict(), "packer": self.packer.state_dict(),
                "index": self.builder.index, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.clear()
        self.stats.update(state["stats"])
        self.mixer.load_state_dict(state["mixer"])
        self.packer.load_state_dict(state["packer"], self.mixer.fetch)
        self.builder.index = state["index"]

    def __iter__(self) -> Iterator[Pack]:
        for pack in self.builder:
            pack.state = self.state_dict()
            pack.stats = dict(self.stats)
            yield pack


class _PackedDataset(IterableDataset):
    def __init__(self, loader: "PackLoader", states: dict[int, Any], done: set[int]):
        self.loader, self.states, self.done = loader, states, done

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        lo = self.loader
        if worker not in self.done:
            slot = lo.rank * lo.workers + worker
            pipeline = SlotPipeline(lo.config, lo.manifests, lo.tokenizer, lo.tokens, lo.model_cfg,
                                    slot=slot, num_slots=lo.world_size * lo.workers)
            if self.states.get(worker) is not None:
                pipeline.load_state_dict(self.states[worker])
            yield from pipeline
            yield _WorkerDone(worker, dict(pipeline.stats))
            return
        yield _WorkerDone(worker)


def _dist_rank_world() -> tuple[int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PackLoader:
    """Iterable of `Pack`s for this rank. `state_dict()` after any pack; `load_state_dict()` before
    iterating. `stats` sums the skip counts of all workers (cumulative, survives resume)."""

    def __init__(self, config: DataConfig, model_cfg, *, tokenizer=None, num_workers: int = 2,
                 rank: int | None = None, world_size: int | None = None, prefetch_factor: int = 2):
        self.config, self.model_cfg = config, model_cfg
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.workers = num_workers, max(1, num_workers)
        self.prefetch_factor = prefetch_factor
        self.manifests = config.load_manifests()  # wrong paths fail here, not in a worker
        if tokenizer is None:
            if config.tokenizer is None:
                raise DataError("data config has no 'tokenizer' and none was passed")
            tokenizer = load_tokenizer(config.resolve(config.tokenizer))
        self.tokenizer, self.tokens = tokenizer, special_tokens_of(tokenizer)
        self._check_geometry()
        self._states: dict[int, Any] = {}
        self._done: set[int] = set()
        self._cursor = 0

    def _check_geometry(self) -> None:
        vae = self.config.transforms.get("vae", VAE_DEFAULT)
        vit = self.config.transforms.get("vit", VIT_DEFAULT)
        cfg = self.model_cfg
        checks = [("vae", vae, cfg.latent_downsample, cfg.max_latent_size, "max_latent_size"),
                  ("vit", vit, cfg.vit.patch_size, cfg.vit_max_num_patch_per_side,
                   "vit_max_num_patch_per_side")]
        for name, spec, stride, per_side, setting in checks:
            if spec.stride != stride:
                raise DataError(f"transforms.{name}.stride={spec.stride} but the model uses {stride}")
            if spec.max_size > stride * per_side:
                raise DataError(f"transforms.{name}.max_size={spec.max_size} exceeds the model's "
                                f"{setting}={per_side} x {stride} = {stride * per_side} px")

    # resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "workers": self.workers, "seed": self.config.seed, "cursor": self._cursor,
                "done": sorted(self._done), "slots": dict(self._states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's state, or `{"ranks": [every rank's state]}` when the world size
        changed. Another worker count or world size is an elastic resume (data_pipelines/elastic.py):
        what the old slots still owed is dealt to the new ones, each sample still once per epoch."""
        states = state["ranks"] if "ranks" in state else [state]
        for st in states:
            for key, mine in (("version", STATE_VERSION), ("seed", self.config.seed)):
                if st.get(key) != mine:
                    raise DataError(f"loader state has {key}={st.get(key)!r} but this loader has {mine!r}; "
                                    f"a data state only resumes with the same {key}")
        old_world, old_workers = states[0]["world_size"], states[0]["workers"]
        if len(states) == 1 and (old_world, old_workers, states[0]["rank"]) == (
                self.world_size, self.workers, self.rank):
            self._states = dict(states[0]["slots"])
            self._done = set(states[0]["done"])
            self._cursor = states[0]["cursor"]
            return
        ranks = sorted(st["rank"] for st in states)
        if old_world != self.world_size and ranks != list(range(old_world)):
            raise DataError(f"the data state was saved by {old_world} ranks; resuming on {self.world_size} "
                            f"needs all {old_world} ranks' states, got ranks {ranks}")
        if old_world == self.world_size:  # another worker count: this rank deals its own slots
            states = [st for st in states if st["rank"] == self.rank]
        old = {st["rank"] * old_workers + w: st["slots"].get(w) for st in states for w in range(old_workers)}
        mine = [self.rank * self.workers + w for w in range(self.workers)]
        # what is owed is dealt over all new slots, or over this rank's when only workers changed
        group = mine if old_world == self.world_size else list(range(self.world_size * self.workers))
        new = reshard_slots(old, old_world * old_workers, group, self.world_size * self.workers,
                            config=self.config, manifests=self.manifests)
        self._states = {w: new[slot] for w, slot in enumerate(mine)}
        self._done, self._cursor = set(), 0

    @property
    def stats(self) -> Counter:
        total: Counter = Counter()
        for state in self._states.values():
            if state is not None:
                total.update(state["stats"])
        return total

    # iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Pack]:
        dataset = _PackedDataset(self, dict(self._states), set(self._done))
        if self.num_workers == 0:
            source = iter(dataset)
            loader_iter = None
        else:
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                prefetch_factor=self.prefetch_factor, collate_fn=_identity)
            source = loader_iter = iter(loader)
        pending: dict[int, list] = {w: [] for w in range(self.workers)}
        fresh, yielded, skipped = not self._done and not self._states, 0, Counter()
        try:
            while len(self._done) < self.workers:
                w = self._cursor
                if w in self._done:
                    self._cursor = (w + 1) % self.workers
                    continue
                while not pending[w]:
                    item = _next_from(source)  # every worker ends with a marker, so this never runs dry
                    pending[item.worker if isinstance(item, _WorkerDone) else
                            item.slot - self.rank * self.workers].append(item)
                item = pending[w].pop(0)
                self._cursor = (w + 1) % self.workers
                if isinstance(item, _WorkerDone):
                    self._done.add(w)
                    skipped.update(item.stats or {})
                    continue
                self._states[w] = item.state
                yielded += 1
                yield item
        finally:
            if loader_iter is not None:
                loader_iter._shutdown_workers()
        if fresh and not yielded:
            raise DataError(f"the data gave no readable sample on rank {self.rank} (skipped: "
                            f"{dict(skipped) or 'nothing: the sources are empty'})")


def _identity(x):
    return x


def _next_from(source):
    """next() of the DataLoader, with a worker's DataError as one line: DataLoader re-raises it
    with the worker's whole traceback pasted into the message."""
    try:
        return next(source)
    except DataError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise DataError(last.split("DataError: ", 1)[-1]) from None
