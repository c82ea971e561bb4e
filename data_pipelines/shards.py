"""Webdataset shards: writing with a manifest, and a resumable, splittable, shuffled reader.

Shards are plain tar files in the webdataset layout (members `{key}.json`, `{key}.0.png`, ...
grouped by key), so `webdataset.WebDataset` reads them too. We read them with `tarfile`
ourselves because webdataset 1.0.2 has no mid-epoch resume, seeds `resampled=True` from the pid
and clock, raises on an empty worker and needs an explicit node splitter under torchrun.
Here:

* A `ShardStream` is one source seen by one *slot* (rank * num_workers + worker). Epoch mode:
  every epoch permutes all shards with (seed, epoch), the same on every slot, and slot s takes
  shards s, s + num_slots, ...: each sample is read exactly once per epoch over all slots.
  Resampled mode: slot s draws shard d from a generator seeded by (seed, slot, d), forever.
* The shuffle buffer holds raw (undecoded) samples; its RNG is a numpy PCG64 whose state is
  saved. Decoding happens after the buffer.
* `state_dict()` = (epoch, shard cursor, offset in shard, buffer as sample references, RNG).
  Restoring re-reads the buffered samples by reference (tar headers are skipped without reading
  data), so a resumed stream yields exactly what the uninterrupted one would.
* Bad data never stops the stream: an unreadable or truncated tar, a corrupt member header
  (tarfile re-synchronises on the next valid header), or a shard shorter than its manifest is
  counted in `stats` under a reason and logged. A source whose shards all fail raises
  `DataError` after a bounded number of attempts instead of looping forever.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from data_pipelines.remote import (DEFAULT_STORAGE, RemoteUnavailable, StorageConfig, is_url, join,
                                   open_binary, parent, read_bytes, redact)
from data_pipelines.schema import Document

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "bagel-wds"
MANIFEST_VERSION = 1
_MEMBER_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's key / extension split


class DataError(ValueError):
    """The data cannot be used at all (bad manifest, a source with no readable sample)."""


# Skip accounting ----------------------------------------------------------------------------------

def count_skip(stats: Counter, reason: str, detail: str) -> None:
    """Count one skipped item under `reason`; log the first three and then every power of ten."""
    stats[reason] += 1
    n = stats[reason]
    if n <= 3 or str(n).rstrip("0") == "1":
        log.warning("skipped (%s, #%d): %s", reason, n, detail)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts; unlike hash() it is the same in every process."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# Writing ------------------------------------------------------------------------------------------

@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    num_samples: int
    num_bytes: int
    num_tokens: int  # estimate (see the manifest's token_estimate)


@dataclass
class Manifest:
    name: str
    root: str  # folder (or URL prefix) of manifest.json (not stored)
    shards: list[ShardInfo]
    token_estimate: dict[str, Any]
    tasks: dict[str, int]
    storage: StorageConfig = DEFAULT_STORAGE  # how remote shards are read (not stored)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    def shard_path(self, index: int) -> str:
        return join(self.root, self.shards[index].path)

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "name": self.name,
                "num_samples": self.num_samples, "num_tokens": self.num_tokens, "tasks": self.tasks,
                "token_estimate": self.token_estimate, "shards": [asdict(s) for s in self.shards]}


def load_manifest(path: str | Path, storage: StorageConfig = DEFAULT_STORAGE) -> Manifest:
    """Read `manifest.json` (or a folder or URL prefix holding one); errors name the file and key."""
    path = str(path)
    if is_url(path):
        if not path.endswith(".json"):
            path = path.rstrip("/") + "/manifest.json"
        try:
            text = read_bytes(path, storage).decode()
        except (OSError, UnicodeDecodeError) as e:
            detail = str(e) if isinstance(e, RemoteUnavailable) else f"{redact(path)}: {e}"
            raise DataError(f"manifest {detail}") from None
    else:
        if os.path.isdir(path):
            path = os.path.join(path, "manifest.json")
        if not os.path.isfile(path):
            raise DataError(f"manifest {path} does not exist (make shards with `bagel-data`)")
        text = Path(path).read_text()
    where = redact(path)
    try:
        data = json.loads(text)
        if data.get("format") != MANIFEST_FORMAT:
            raise DataError(f"{where}: 'format' is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        shards = [ShardInfo(**s) for s in data["shards"]]
        manifest = Manifest(name=data["name"], root=parent(path), shards=shards,
                            token_estimate=data.get("token_estimate", {}), tasks=data.get("tasks", {}),
                            storage=storage)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
    if not shards:
        raise DataError(f"{where}: the manifest lists no shards")
    return manifest


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # byte-identical shards for identical inputs
    tar.addfile(info, io.BytesIO(data))


class DatasetWriter:
    """Write documents into `{out_dir}/{name}-000000.tar, ...` and a `manifest.json`.

    A shard is closed after `max_samples` samples or once it holds `max_bytes` bytes.
    `estimate_tokens(doc, image_sizes)` gives the per-sample token estimate summed in the manifest.
    """

    def __init__(self, out_dir: str | Path, name: str, *, max_samples: int = 1000,
                 max_bytes: int | None = None,
                 estimate_tokens: Callable[[Document, dict[str, tuple[int, int]]], int] | None = None,
                 token_estimate_info: dict[str, Any] | None = None):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.estimate_tokens = estimate_tokens
        self.token_estimate_info = token_estimate_info or {}
        self.shards: list[ShardInfo] = []
        self.tasks: Counter = Counter()
        self._keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None

    def _open(self) -> None:
        path = f"{self.name}-{len(self.shards):06d}.tar"
        # written as .tmp and renamed when complete: a killed conversion leaves no half shard
        self._tar = tarfile.open(self.out_dir / (path + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
        self.shards.append(ShardInfo(path, 0, 0, 0))

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            final = self.out_dir / self.shards[-1].path
            Path(str(final) + ".tmp").replace(final)
            self.shards[-1].num_bytes = final.stat().st_size

    def write(self, key: str, doc: Document, images: dict[str, bytes]) -> None:
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} written twice in dataset {self.name!r}")
        missing = sorted(set(doc.images) - set(images))
        extra = sorted(set(images) - set(doc.images))
        if missing or extra:
            raise ValueError(f"sample {key!r}: images referenced but not given {missing}, "
                             f"given but not referenced {extra}")
        self._keys.add(key)
        if self._tar is None:
            self._open()
        shard = self.shards[-1]
        payload = [(f"{key}.json", doc.dumps())] + [(f"{key}.{n}", b) for n, b in images.items()]
        for member, data in payload:
            _tar_add(self._tar, member, data)
            shard.num_bytes += 512 + (len(data) + 511) // 512 * 512
        shard.num_samples += 1
        if self.estimate_tokens is not None:
            sizes = {n: _image_size(b) for n, b in images.items()}
            shard.num_tokens += self.estimate_tokens(doc, sizes)
        self.tasks[doc.task] += 1
        if shard.num_samples >= self.max_samples or (
                self.max_bytes is not None and shard.num_bytes >= self.max_bytes):
            self._close_shard()

    def finish(self) -> Manifest:
        """Close the last shard; the manifest is returned, not written (a part of a parallel run)."""
        self._close_shard()
        return Manifest(self.name, str(self.out_dir), self.shards, self.token_estimate_info,
                        dict(self.tasks))

    def close(self) -> Manifest:
        manifest = self.finish()
        write_manifest(manifest)
        return manifest

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_shard()


def write_manifest(manifest: Manifest) -> None:
    """`manifest.json` in the manifest's folder, atomically: a reader never sees half of one."""
    out = Path(manifest.root)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    tmp.replace(out / "manifest.json")


def _image_size(data: bytes) -> tuple[int, int]:
    from PIL import Image  # reads the header only

    with Image.open(io.BytesIO(data)) as image:
        return image.size


# Reading ------------------------------------------------------------------------------------------

def epoch_shards(seed: int, name: str, epoch: int, num_shards: int, slot: int, num_slots: int,
                 resampled: bool = False) -> list[int]:
    """The default layout: the shards slot `slot` of `num_slots` reads in `epoch` (or, resampled,
    the one shard of draw `epoch`)."""
    if resampled:  # one draw per "epoch"; stateless, so resuming needs no RNG state
        return [int(np.random.default_rng(stable_seed(seed, name, slot, epoch)).integers(num_shards))]
    order = np.random.default_rng(stable_seed(seed, name, "epoch", epoch)).permutation(num_shards)
    return [int(i) for i in order[slot::num_slots]]


class SampleRef(NamedTuple):
    """Where a raw sample lives; `visit` is the epoch (or the resampling draw) that read it."""

    source: str
    shard: int
    offset: int
    visit: int


def iter_tar(path: str, stats: Counter, start: int = 0, wanted: set[int] | None = None,
             storage: StorageConfig = DEFAULT_STORAGE) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (offset, key, {extension: bytes}) for the samples of one tar (a path, URL or `pipe:`),
    from sample `start`. Member data is read only for yielded samples, so skipping to an offset
    costs header reads (remote objects seek past the rest; a pipe reads through it).
    """
    stream = None
    try:
        if is_url(path):
            stream = open_binary(path, storage)
            mode = "r|" if path.startswith("pipe:") else "r:"
            tar = tarfile.open(fileobj=stream, mode=mode, ignore_zeros=True)
        else:
            tar = tarfile.open(path, "r:", ignore_zeros=True)  # ignore_zeros: resync past bad headers
    except (tarfile.TarError, OSError) as e:
        if stream is not None:
            stream.close()
        where = "" if isinstance(e, RemoteUnavailable) else f"{redact(path)}: "  # it names the URL
        count_skip(stats, "unreadable_shard", f"{where}{e}")
        return
    try:
        yield from _tar_samples(tar, redact(path), stats, start, wanted)
    finally:
        tar.close()
        if stream is not None:
            stream.close()


def _tar_samples(tar: tarfile.TarFile, path: str, stats: Counter, start: int, wanted: set[int] | None,
                 ) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    offset, key, members, expected_next = -1, None, {}, 0
    seen_member = False
    try:
        for member in tar:
            seen_member = True
            if member.offset != expected_next:
                count_skip(stats, "corrupt_tar_member", f"{path}: bad bytes at {expected_next}")
            expected_next = member.offset_data + (member.size + 511) // 512 * 512
            if not member.isfile():
                continue
            match = _MEMBER_RE.match(member.name)
            if match is None:
                count_skip(stats, "bad_member_name", f"{path}: {member.name!r}")
                continue
            member_key, ext = match.groups()
            if member_key != key:
                if key is not None and offset >= start and (wanted is None or offset in wanted):
                    yield offset, key, members
                offset, key, members = offset + 1, member_key, {}
            if offset >= start and (wanted is None or offset in wanted):
                members[ext] = tar.extractfile(member).read()
        if key is not None and offset >= start and (wanted is None or offset in wanted):
            yield offset, key, members
    except (tarfile.TarError, OSError, EOFError) as e:
        if seen_member:
            count_skip(stats, "truncated_shard", f"{path}: {e}")
        else:
            count_skip(stats, "unreadable_shard", f"{path}: not a tar archive ({e})")
        return
    if not seen_member:  # tarfile finds no header at all in a file that is not a tar
        count_skip(stats, "unreadable_shard", f"{path}: not a tar archive (no member header)")


class ShardStream:
    """One source's raw samples for one slot: splitting, epochs or resampling, shuffle buffer.

    Yields dicts {"__key__", "__ref__": SampleRef, extension: bytes, ...}.
    """

    def __init__(self, name: str, manifest: Manifest, *, seed: int, slot: int, num_slots: int,
                 resampled: bool = False, epochs: int | None = 1, shuffle_buffer: int = 1000,
                 stats: Counter | None = None):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} not in [0, {num_slots})")
        self.name, self.manifest, self.seed = name, manifest, seed
        self.slot, self.num_slots = slot, num_slots
        self.resampled, self.epochs = resampled, (None if resampled else epochs)
        self.buffer_size = max(1, shuffle_buffer)
        self.stats = stats if stats is not None else Counter()
        self._shard_cache: tuple[int, list[int]] | None = None
        self._unreadable_before = 0  # unreadable-shard count when the current shard was opened
        self.load_state_dict(None)

    # position bookkeeping --------------------------------------------------------------------
    def _items_of_epoch(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, first sample) pairs this slot reads in `epoch`: the elastic plan if a resume
        with another slot count left one for this epoch, else the default layout."""
        if epoch in self.plan:
            return self.plan[epoch]
        if self._shard_cache is None or self._shard_cache[0] != epoch:
            shards = epoch_shards(self.seed, self.name, epoch, len(self.manifest.shards), self.slot,
                                  self.num_slots, self.resampled)
            self._shard_cache = (epoch, [(s, 0) for s in shards])
        return self._shard_cache[1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset,
                "exhausted": self.exhausted, "failed_shards": self.failed_shards,
                "buffer": [tuple(s["__ref__"]) for s in self.buffer],
                "rng": self.rng.bit_generator.state,
                "plan": {e: [list(i) for i in items] for e, items in self.plan.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._tar_iter: Iterator | None = None
        self.rng = np.random.default_rng(stable_seed(self.seed, self.name, "buffer", self.slot))
        if state is None:
            self.epoch = self.cursor = self.offset = self.failed_shards = 0
            self.exhausted, self.buffer, self.plan = False, [], {}
            return
        self.epoch, self.cursor, self.offset = state["epoch"], state["cursor"], state["offset"]
        self.exhausted, self.failed_shards = state["exhausted"], state["failed_shards"]
        self.plan = {int(e): [tuple(i) for i in items] for e, items in state.get("plan", {}).items()}
        if state["rng"] is not None:  # None: an elastic resume dealt this state (fresh seed)
            self.rng.bit_generator.state = state["rng"]
        self.buffer = self.read_refs([SampleRef(*r) for r in state["buffer"]])

    def read_refs(self, refs: list[SampleRef]) -> list[dict[str, Any]]:
        """Re-read raw samples by reference, in the order given (missing ones are dropped)."""
        by_shard: dict[int, set[int]] = {}
        for ref in refs:
            by_shard.setdefault(ref.shard, set()).add(ref.offset)
        found: dict[tuple[int, int], tuple[str, dict]] = {}
        scratch: Counter = Counter()  # these samples were counted when first read
        for shard, offsets in by_shard.items():
            for offset, key, members in iter_tar(self.manifest.shard_path(shard), scratch,
                                                 start=min(offsets), wanted=offsets,
                                                 storage=self.manifest.storage):
                found[shard, offset] = key, members
        out = []
        for ref in refs:
            if (ref.shard, ref.offset) not in found:
                count_skip(self.stats, "resume_sample_missing", f"{self.name}: {ref}")
                continue
            key, members = found[ref.shard, ref.offset]
            out.append({"__key__": key, "__ref__": ref, **members})
        return out

    # iteration --------------------------------------------------------------------------------
    def _read_next(self) -> dict[str, Any] | None:
        """The next raw sample in shard order, or None when this slot has no more."""
        while not self.exhausted:
            if self._tar_iter is None:
                if self.epochs is not None and self.epoch >= self.epochs:
                    self.exhausted = True
                    break
                items = self._items_of_epoch(self.epoch)
                if not items and self.epoch not in self.plan:
                    count_skip(self.stats, "empty_shard_list",
                               f"{self.name}: slot {self.slot} of {self.num_slots} gets no shard of "
                               f"{len(self.manifest.shards)}; it yields nothing")
                    self.exhausted = True
                    break
                if self.cursor >= len(items):
                    self.plan.pop(self.epoch, None)
                    self.epoch, self.cursor, self.offset = self.epoch + 1, 0, 0
                    continue
                self._shard, first = items[self.cursor]
                self.offset = max(self.offset, first)
                self._read_in_shard = 0
                self._unreadable_before = self.stats["unreadable_shard"]
                self._tar_iter = iter_tar(self.manifest.shard_path(self._shard), self.stats,
                                          start=self.offset, storage=self.manifest.storage)
            item = next(self._tar_iter, None)
            if item is None:
                self._finish_shard()
                continue
            offset, key, members = item
            self.offset, self._read_in_shard = offset + 1, self._read_in_shard + 1
            return {"__key__": key, "__ref__": SampleRef(self.name, self._shard, offset, self.epoch),
                    **members}
        return None

    def _finish_shard(self) -> None:
        expected = self.manifest.shards[self._shard].num_samples
        unreadable = self.stats["unreadable_shard"] > self._unreadable_before
        if self.offset < expected and not unreadable:
            count_skip(self.stats, "shard_shorter_than_manifest",
                       f"{self.manifest.shard_path(self._shard)}: ended at sample {self.offset}, "
                       f"manifest says {expected}")
        self.failed_shards = 0 if self._read_in_shard else self.failed_shards + 1
        limit = max(16, 2 * len(self.manifest.shards))
        if self.failed_shards >= limit:
            raise DataError(f"source {self.name!r}: {self.failed_shards} shards in a row gave no "
                            f"readable sample (see the skip counts: {dict(self.stats)})")
        self._tar_iter = None
        self.cursor, self.offset = self.cursor + 1, 0

    def __iter__(self) -> "ShardStream":
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            if self.buffer and (len(self.buffer) >= self.buffer_size or self.exhausted):
                j = int(self.rng.integers(len(self.buffer)))
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                return self.buffer.pop()
            raw = self._read_next()
            if raw is None:
                if not self.buffer:
                    raise StopIteration
                continue
            self.buffer.append(raw)
