"""`bagel-data inspect`: check a dataset against its manifest, shard by shard.

For every shard (local or by URL): the samples it really holds vs the manifest's count, the tar
structure (bad bytes, truncation), every document against the schema and its image members,
every image decoded, and the token estimate recomputed vs the manifest's. Problems are reported
per shard; shards are checked in parallel processes.
"""

from __future__ import annotations

import io
import multiprocessing as mp
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from bagel.transforms import VAE_DEFAULT, VIT_DEFAULT, ResizeSpec
from data_pipelines.converters.common import estimate_tokens
from data_pipelines.remote import redact
from data_pipelines.schema import SchemaError, loads_document
from data_pipelines.shards import Manifest, iter_tar


@dataclass
class ShardReport:
    path: str
    expected_samples: int
    samples: int = 0
    expected_tokens: int = 0
    tokens: int = 0
    problems: Counter = field(default_factory=Counter)  # reason -> count
    examples: list[str] = field(default_factory=list)  # the first few problems, spelled out

    def problem(self, reason: str, detail: str) -> None:
        self.problems[reason] += 1
        if len(self.examples) < 3:
            self.examples.append(f"{reason}: {detail}")

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        status = "ok" if self.ok else ", ".join(f"{r} x{n}" for r, n in sorted(self.problems.items()))
        return f"{redact(self.path)}: {self.samples}/{self.expected_samples} samples, {self.tokens} tokens: {status}"


def verify_shard(manifest: Manifest, index: int, decode: bool = True) -> ShardReport:
    info = manifest.shards[index]
    path = manifest.shard_path(index)
    report = ShardReport(path, info.num_samples, expected_tokens=info.num_tokens)
    stats: Counter = Counter()
    specs = _estimate_specs(manifest)
    for _, key, members in iter_tar(path, stats, storage=manifest.storage):
        report.samples += 1
        if "json" not in members:
            report.problem("no_json", key)
            continue
        try:
            doc = loads_document(members["json"], f"{key}.json")
        except SchemaError as e:
            report.problem("bad_document", str(e))
            continue
        sizes = {}
        for name in doc.images:
            if name not in members:
                report.problem("missing_image", f"{key}: {name}")
                continue
            try:
                with Image.open(io.BytesIO(members[name])) as image:
                    if decode:
                        image.load()
                    sizes[name] = image.size
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
                report.problem("bad_image", f"{key}.{name}: {type(e).__name__}: {e}")
        if len(sizes) == len(doc.images):
            report.tokens += estimate_tokens(doc, sizes, *specs)
    for reason, n in stats.items():  # unreadable / truncated / corrupt tar
        report.problems[reason] += n
        if len(report.examples) < 3:
            report.examples.append(f"{reason}: see the log above")
    if report.samples != report.expected_samples:
        report.problem("count_mismatch", f"{report.samples} samples, the manifest says {report.expected_samples}")
    if report.tokens != report.expected_tokens and report.expected_tokens and "bad_image" not in report.problems:
        report.problem("token_estimate_mismatch", f"{report.tokens} tokens, the manifest says "
                                                  f"{report.expected_tokens} (other transforms?)")
    return report


def _estimate_specs(manifest: Manifest) -> tuple[ResizeSpec, ResizeSpec]:
    """The VAE and ViT transforms the manifest's token estimate assumed (default: the official ones)."""
    info = manifest.token_estimate
    try:
        return (ResizeSpec.from_dict(info.get("vae", VAE_DEFAULT.__dict__)),
                ResizeSpec.from_dict(info.get("vit", VIT_DEFAULT.__dict__)))
    except (TypeError, ValueError):
        return VAE_DEFAULT, VIT_DEFAULT


def _verify(args) -> ShardReport:
    return verify_shard(*args)


def verify_dataset(manifest: Manifest, *, workers: int = 1, decode: bool = True) -> list[ShardReport]:
    jobs = [(manifest, i, decode) for i in range(len(manifest.shards))]
    if workers <= 1 or len(jobs) <= 1:
        return [_verify(j) for j in jobs]
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_verify, jobs))
