"""`bagel-data convert` at scale: the input split into parts converted by parallel processes,
every shard written atomically, and a killed conversion resumed by running the same command.

* Part k of K converts the work units (JSONL line blocks, parquet row groups) that hash to k
  (`ErrorPolicy.part`), into its own shards `{name}-p{k:03d}-{i:06d}.tar` (one part: the plain
  `{name}-{i:06d}.tar`). A shard is written as `.tmp` and renamed when complete.
* A finished part leaves `OUT/.parts/p{k:03d}.json` (its shards, task counts and skip counts).
  When every part has one, they are merged into `manifest.json` and `.parts/` is removed.
* Running the same command on the same OUT resumes: finished parts are kept, the shards of the
  others are deleted and redone. `.parts/plan.json` holds the settings; resuming with other
  settings is refused, naming the one that differs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from bagel.progress import track
from data_pipelines.converters import convert
from data_pipelines.converters.common import ErrorPolicy, estimate_info, estimate_tokens
from data_pipelines.converters.inputs import as_input
from data_pipelines.shards import DatasetWriter, Manifest, ShardInfo, write_manifest

PARTS_DIR = ".parts"
FORMATS: dict[str, Callable] = {
    "folder": lambda job, policy: convert.from_folder(as_input(job.input), as_input(job.images or "."), policy),
    "t2i-parquet": lambda job, policy: convert.from_t2i_parquet(as_input(job.input), policy),
    "vlm-jsonl": lambda job, policy: convert.from_vlm_jsonl(as_input(job.input), _opt(job.images), policy),
    "edit-parquet": lambda job, policy: convert.from_edit_parquet(as_input(job.input), policy),
    "obelics": lambda job, policy: convert.from_obelics(as_input(job.input), _opt(job.images), policy),
}


def _opt(path: str | None):
    return None if path is None else as_input(path)


@dataclass(frozen=True)
class ConvertJob:
    format: str
    input: str  # a path or an fsspec URL
    out: str  # a local folder
    name: str
    images: str | None = None
    max_samples: int = 1000
    max_bytes: int | None = None
    on_error: str = "skip"
    parts: int = 1

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; expected one of {sorted(FORMATS)}")
        if self.parts < 1:
            raise ValueError(f"parts must be >= 1, got {self.parts}")

    def part_name(self, k: int) -> str:
        return self.name if self.parts == 1 else f"{self.name}-p{k:03d}"

    def records(self, policy: ErrorPolicy) -> Iterator[convert.Record]:
        return FORMATS[self.format](self, policy)


@dataclass
class ConvertResult:
    manifest: Manifest
    skipped: Counter
    resumed_parts: int  # parts found finished by an earlier run


_counter = None  # documents converted, shared by the worker processes (set by _init_worker)


def _init_worker(counter) -> None:
    global _counter
    _counter = counter


def planned_parts(out: str | Path, requested: int | None, workers: int) -> int:
    """The part count of a conversion into `out`: `requested`, else what an unfinished conversion
    there was started with (so rerunning the same command resumes it), else 1 for one worker and
    4 per worker otherwise."""
    plan = Path(out) / PARTS_DIR / "plan.json"
    if requested is None and plan.is_file():
        return int(json.loads(plan.read_text()).get("parts", 1))
    return requested or (1 if workers == 1 else 4 * workers)


def run_part(job: ConvertJob, k: int) -> dict:
    """Convert part k into its shards; returns (and saves in .parts/) what the manifest needs."""
    policy = ErrorPolicy(job.on_error, part=(k, job.parts))
    writer = DatasetWriter(job.out, job.part_name(k), max_samples=job.max_samples, max_bytes=job.max_bytes,
                           estimate_tokens=estimate_tokens, token_estimate_info=estimate_info())
    for key, doc, images in job.records(policy):
        writer.write(key, doc, images)
        if _counter is not None:
            with _counter.get_lock():
                _counter.value += 1
    manifest = writer.finish()
    record = {"shards": [asdict(s) for s in manifest.shards], "tasks": manifest.tasks,
              "skipped": dict(policy.skipped)}
    _write_json(Path(job.out) / PARTS_DIR / f"p{k:03d}.json", record)
    return record


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _check_plan(job: ConvertJob, parts_dir: Path) -> None:
    plan = {k: v for k, v in asdict(job).items() if k != "out"}
    plan_file = parts_dir / "plan.json"
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        differ = [k for k in plan if saved.get(k) != plan[k]]
        if differ:
            k = differ[0]
            raise ValueError(f"{job.out} holds an unfinished conversion with {k}={saved.get(k)!r}, not "
                             f"{plan[k]!r}: rerun it with the same settings to resume, or use another --out")
        return
    if (Path(job.out) / "manifest.json").exists():
        raise ValueError(f"{job.out} already holds a converted dataset (manifest.json); use another --out")
    parts_dir.mkdir(parents=True, exist_ok=True)
    _write_json(plan_file, plan)


def _clear_part(job: ConvertJob, k: int) -> None:
    """Remove the shards of an unfinished part (it is redone from its start)."""
    prefix = job.part_name(k) + "-"
    for f in Path(job.out).iterdir():
        rest = f.name[len(prefix):]
        if f.name.startswith(prefix) and rest[:6].isdigit() and rest[6:] in (".tar", ".tar.tmp"):
            f.unlink()


def convert_dataset(job: ConvertJob, *, workers: int = 1, progress: bool = True) -> ConvertResult:
    """Run (or resume) `job` with `workers` processes; writes manifest.json when all parts are done."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    parts_dir = out / PARTS_DIR
    _check_plan(job, parts_dir)
    done = {k: json.loads((parts_dir / f"p{k:03d}.json").read_text())
            for k in range(job.parts) if (parts_dir / f"p{k:03d}.json").is_file()}
    todo = [k for k in range(job.parts) if k not in done]
    for k in todo:
        _clear_part(job, k)
    if done and todo:
        print(f"resuming: {len(done)} of {job.parts} parts were finished; converting the other {len(todo)}")
    bar = track(desc=f"convert {job.name}", unit="doc", enabled=progress)
    counter = mp.get_context("fork").Value("q", 0)
    if workers == 1 or len(todo) <= 1:
        _init_worker(counter)
        try:
            for k in todo:
                done[k] = run_part(job, k)
                bar.update(counter.value - bar.n)
        finally:
            _init_worker(None)
    else:
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("fork"),
                                 initializer=_init_worker, initargs=(counter,)) as pool:
            pending = {pool.submit(run_part, job, k): k for k in todo}
            while pending:
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[pending.pop(future)] = future.result()  # a part's error ends the run here
                bar.update(counter.value - bar.n)
                time.sleep(0 if finished else 0.01)
    bar.close()
    resumed = job.parts - len(todo)
    shards, tasks, skipped = [], Counter(), Counter()
    for k in range(job.parts):
        shards += [ShardInfo(**s) for s in done[k]["shards"]]
        tasks.update(done[k]["tasks"])
        skipped.update(done[k]["skipped"])
    manifest = Manifest(job.name, str(out), shards, estimate_info(), dict(tasks))
    write_manifest(manifest)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return ConvertResult(manifest, skipped, resumed)
