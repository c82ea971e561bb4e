"""Data config (YAML) and weighted mixing of sources.

A data config names the sources (a manifest each, a weight, epoch or resampled mode), the image
transforms, the shuffle buffer and the packing budget:

    seed: 0
    shuffle_buffer: 500
    tokenizer: tests/assets/bagel_official_tiny
    transforms:
      vae: {max_size: 64, min_size: 64, stride: 16}
      vit: {max_size: 56, min_size: 56, stride: 14}
    packing: {max_tokens: 4096, expected_tokens: 4096, max_tokens_per_sample: 2048,
              max_buffer: 64, dropout: {text: 0.1, vit: 0.3, vae: 0.3}}
    sources:
      - {name: t2i, manifest: data/digits/train/t2i, weight: 2.0, resampled: true}
      - {name: vqa, manifest: data/digits/train/vqa, weight: 1.0, epochs: 1}

Relative paths are resolved against `data_root` (default: the current directory). Unknown keys,
missing manifests and non-positive weights are errors at start, naming the key.

`Mixer` draws the source of every sample with a saved numpy generator (probability proportional
to the weights of the sources that are not exhausted), decodes it, and counts and skips bad ones.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from data_pipelines.remote import StorageConfig, is_url
from data_pipelines.decode import DecodedSample, SampleDecoder, SkipSample
from data_pipelines.shards import DataError, Manifest, SampleRef, ShardStream, count_skip, load_manifest, stable_seed
from bagel.transforms import ResizeSpec

# Consecutive undecodable samples after which a run stops: far above any real bad-data rate,
# and it turns "every sample is broken" into an error instead of an endless loop.
MAX_CONSECUTIVE_SKIPS = 10_000


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise DataError(f"{where}: {e}") from e


@dataclass
class SourceConfig:
    name: str
    manifest: str
    weight: float = 1.0
    resampled: bool = False  # True: draw shards with replacement forever
    epochs: int | None = None  # epoch mode: number of passes, None = repeat forever


@dataclass
class PackingConfig:
    max_tokens: int = 16384  # hard cap per pack (flex attention pads to it)
    expected_tokens: int | None = None  # close a pack once it holds this many; None = max_tokens
    max_tokens_per_sample: int = 8192  # longer samples are skipped and counted
    max_buffer: int = 64  # overflow buffer (samples that did not fit the current pack)
    dropout: dict[str, float] = field(default_factory=lambda: {"text": 0.1, "vit": 0.3, "vae": 0.3})

    def __post_init__(self):
        if self.expected_tokens is None:
            self.expected_tokens = self.max_tokens
        if not 0 < self.expected_tokens <= self.max_tokens:
            raise DataError(f"packing: need 0 < expected_tokens <= max_tokens, got "
                            f"{self.expected_tokens} / {self.max_tokens}")
        if self.max_tokens_per_sample > self.max_tokens:
            raise DataError(f"packing: max_tokens_per_sample={self.max_tokens_per_sample} exceeds "
                            f"max_tokens={self.max_tokens}")
        bad = sorted(set(self.dropout) - {"text", "vit", "vae"})
        if bad or any(not 0 <= p <= 1 for p in self.dropout.values()):
            raise DataError(f"packing.dropout: keys must be text/vit/vae with probabilities in "
                            f"[0, 1], got {self.dropout}")


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    seed: int = 0
    shuffle_buffer: int = 1000
    tokenizer: str | None = None
    data_root: str | None = None
    transforms: dict[str, ResizeSpec] = field(default_factory=dict)
    packing: PackingConfig = field(default_factory=PackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)  # remote reading (data_pipelines/remote.py)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "data config") -> "DataConfig":
        data = dict(data)
        if not data.get("sources"):
            raise DataError(f"{where}: 'sources' is missing or empty")
        data["sources"] = [_build(SourceConfig, s, f"{where}: sources[{i}]")
                           for i, s in enumerate(data["sources"])]
        data["packing"] = _build(PackingConfig, data.get("packing", {}), f"{where}: packing")
        try:
            data["storage"] = _build(StorageConfig, data.get("storage", {}), f"{where}: storage")
        except ValueError as e:
            raise DataError(f"{where}: {e}") from e
        transforms = data.get("transforms", {})
        unknown = sorted(set(transforms) - {"vae", "vit"})
        if unknown:
            raise DataError(f"{where}: transforms: unknown key(s) {unknown}; expected vae, vit")
        try:
            data["transforms"] = {k: ResizeSpec.from_dict(v, f"{where}: transforms.{k}")
                                  for k, v in transforms.items()}
        except (TypeError, ValueError) as e:
            raise DataError(str(e)) from e
        config = _build(cls, data, where)
        names = [s.name for s in config.sources]
        if len(set(names)) != len(names):
            raise DataError(f"{where}: source names must be unique, got {names}")
        for s in config.sources:
            if not s.weight > 0:
                raise DataError(f"{where}: source {s.name!r} has weight {s.weight}; expected > 0")
            if s.resampled and s.epochs is not None:
                raise DataError(f"{where}: source {s.name!r} sets both resampled and epochs")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DataConfig":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data config {path} does not exist")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {}, str(path))

    def resolve(self, path: str) -> str:
        if is_url(path) or os.path.isabs(path):
            return path
        root = self.data_root or "."
        return root.rstrip("/") + "/" + path if is_url(root) else os.path.join(root, path)

    def load_manifests(self) -> dict[str, Manifest]:
        """Read every source's manifest now, so a wrong path fails at start, not in a worker."""
        return {s.name: load_manifest(self.resolve(s.manifest), self.storage) for s in self.sources}

    @property
    def finite(self) -> bool:
        return all(not s.resampled and s.epochs is not None for s in self.sources)


class Mixer:
    """Weighted interleaving of one slot's source streams, decoded; resumable."""

    def __init__(self, config: DataConfig, manifests: dict[str, Manifest], decoder: SampleDecoder,
                 *, slot: int, num_slots: int, stats: Counter):
        self.config, self.decoder, self.stats = config, decoder, stats
        self.weights = np.array([s.weight for s in config.sources], dtype=np.float64)
        self.streams = {
            s.name: ShardStream(s.name, manifests[s.name], seed=config.seed, slot=slot,
                                num_slots=num_slots, resampled=s.resampled, epochs=s.epochs,
                                shuffle_buffer=config.shuffle_buffer, stats=stats)
            for s in config.sources}
        self.names = [s.name for s in config.sources]
        self.rng = np.random.default_rng(stable_seed(config.seed, "mix", slot))
        self.active = [True] * len(self.names)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "active": list(self.active),
                "streams": {n: s.state_dict() for n, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rng"] is None:  # dealt by an elastic resume (data_pipelines/elastic.py)
            self.rng = np.random.default_rng(state["seed"])
        else:
            self.rng.bit_generator.state = state["rng"]
        self.active = list(state["active"])
        for name, stream in self.streams.items():
            stream.load_state_dict(state["streams"][name])

    def fetch(self, refs: list[SampleRef]) -> list[DecodedSample]:
        """Decode samples again by reference (restoring the packer's buffer)."""
        out = []
        for name in self.names:
            mine = [r for r in refs if r.source == name]
            for raw in self.streams[name].read_refs(mine):
                out.append(self.decoder(raw))
        order = {tuple(r): i for i, r in enumerate(refs)}
        return sorted(out, key=lambda s: order[tuple(s.ref)])

    def __iter__(self) -> "Mixer":
        return self

    def __next__(self) -> DecodedSample:
        skips = 0
        while any(self.active):
            p = self.weights * np.array(self.active)
            i = int(self.rng.choice(len(self.names), p=p / p.sum()))
            try:
                raw = next(self.streams[self.names[i]])
            except StopIteration:
                self.active[i] = False
                continue
            try:
                return self.decoder(raw)
            except SkipSample as e:
                count_skip(self.stats, e.reason, f"{self.names[i]}: {e.detail}")
                skips += 1
                if skips >= MAX_CONSECUTIVE_SKIPS:
                    raise DataError(f"{skips} samples in a row could not be decoded; last: {e}")
        raise StopIteration
