"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

    RUN_DIR/checkpoints/step_00001000/
        .metadata, __<rank>_0.distcp   model, optimizer and EMA shards (DCP; reshardable)
        rank_00000.pt ...              per rank: data-loader state, RNG states (weights_only);
                                       on another world size all of them go to the loader
        trainer.json                   step, loss scaler, counters, world size
        config.yaml                    the resolved TrainConfig
        manifest.json                  size and sha256 of every file above, written last

Writing: every rank writes its shards into `.tmp_step_XXXXXXXX`; then rank 0 writes the JSON
files and, last, the manifest, fsyncs the files and the directory, and renames it to
`step_XXXXXXXX` (atomic within one file system; on many nodes RUN_DIR must be a shared file
system). Re-saving an existing step renames the old one aside first, so a complete checkpoint of
that step exists at every moment. Only the `keep` newest are kept. Every rank saves and loads
only its own shards: no full state dict is gathered (the official trainer gathers it on rank 0
and OOMs on large models).

Reading: a checkpoint counts only if its manifest matches its files (sizes when listing, sizes and
hashes when loading); `latest_checkpoint` falls back from a damaged newest one to the newest intact
one, saying what was wrong. The DCP files are read through `bagel.checkpoint.dcp` (no arbitrary
unpickling) and the per-rank files with `torch.load(weights_only=True)`, so a checkpoint handed
over from elsewhere cannot run code. A start removes `.tmp_` leftovers of a killed run (or
promotes one whose manifest is complete: the kill came between its last two renames).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from bagel.checkpoint.dcp import SafeLoadPlanner, SafeReader, check_fits
from bagel.checkpoint.files import fsync_dir, fsync_file, write_text
from bagel.checkpoint.strict import CheckpointError
from bagel.train.distributed import DistInfo, barrier

PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"
OLD_PREFIX = ".old_step_"
MANIFEST = "manifest.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def verify(path: str | Path, hashes: bool = True) -> str | None:
    """What is wrong with checkpoint `path` (None: intact). Sizes always, sha256 with `hashes`."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the checkpoint was never completed)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, info in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {info['size']}"
        if hashes and _sha256(f) != info["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    try:
        json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer.json is unreadable ({e})"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints whose files match their manifest's sizes, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and verify(p, hashes=False) is None]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path, log=None) -> Path | None:
    """The newest intact checkpoint (sizes and hashes checked); damaged newer ones are skipped,
    each with a message through `log` naming what is wrong."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), key=_step_of)
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            return path
        if log is not None:
            log(f"[bagel-train] warning: skipping damaged checkpoint {path}: {problem}")
    return None


def remove_stale(run_dir: str | Path, dist: DistInfo) -> None:
    """Rank 0: finish or remove what a killed save left behind."""
    root = checkpoint_root(run_dir)
    if dist.is_main and root.is_dir():
        for p in sorted(root.iterdir()):
            if not p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                continue
            final = root / f"{PREFIX}{p.name.rsplit('_', 1)[1]}"
            if not final.exists() and verify(p) is None:
                os.replace(p, final)  # complete, only its rename was missing
            else:
                shutil.rmtree(p, ignore_errors=True)
        fsync_dir(root)
    barrier()


def save(run_dir: str | Path, step: int, model, optimizer, ema_state: dict[str, torch.Tensor] | None,
         trainer_state: dict[str, Any], rank_state: dict[str, Any], config_yaml: str, keep: int,
         dist: DistInfo, trainable_only: bool = False) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). Returns its final path.
    `trainable_only` (LoRA runs): the model's frozen parameters are not written (the run rebuilds
    them from its base model), so the checkpoint holds only what trains."""
    root = checkpoint_root(run_dir)
    tmp = root / f"{TMP_PREFIX}{step:08d}"
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    write_shards(tmp, model, optimizer, ema_state, rank_state, dist, trainable_only)
    barrier()
    final = root / f"{PREFIX}{step:08d}"
    if dist.is_main:
        commit(tmp, final, {**trainer_state, "step": step, "world_size": dist.world_size}, config_yaml)
        prune(run_dir, keep)
    barrier()
    return final


def write_shards(tmp: Path, model, optimizer, ema_state, rank_state: dict[str, Any], dist: DistInfo,
                 trainable_only: bool = False) -> None:
    """This rank's part of a checkpoint: its DCP shards and its rank state."""
    with _quiet():
        dcp.save(_sharded_state(model, optimizer, ema_state, trainable_only), checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank_{dist.rank:05d}.pt")


def commit(tmp: Path, final: Path, trainer_state: dict[str, Any], config_yaml: str) -> None:
    """Rank 0, once every rank's files are in `tmp`: JSON files, the manifest last, then rename."""
    write_text(tmp / "config.yaml", config_yaml)
    write_text(tmp / "trainer.json", json.dumps(trainer_state, indent=2))
    files = {}
    for f in sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST):
        fsync_file(f)
        files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    write_text(tmp / MANIFEST, json.dumps({"files": files}, indent=1))
    fsync_dir(tmp)
    if final.exists():  # the same step saved again: keep a complete copy at every moment
        old = final.with_name(OLD_PREFIX + final.name[len(PREFIX):])
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest intact checkpoints (damaged ones are left for a person to look at)."""
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _options(trainable_only: bool) -> StateDictOptions:
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _sharded_state(model, optimizer, ema_state: dict[str, torch.Tensor] | None, trainable_only: bool) -> dict[str, Any]:
    """What DCP saves and loads in place: model, optimizer and (if any) EMA state dicts."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    state = {"model": model_sd, "optim": optim_sd}
    if ema_state is not None:
        state["ema"] = ema_state
    return state


def load(path: str | Path, model, optimizer, ema_state: dict[str, torch.Tensor] | None,
         dist: DistInfo, trainable_only: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and EMA in place; returns (trainer_state, this rank's state)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    problem = verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete: {problem}")
    trainer_state = json.loads((path / "trainer.json").read_text())
    saved_world = int(trainer_state.get("world_size", dist.world_size))
    rank_files = [path / f"rank_{r:05d}.pt" for r in range(saved_world)]
    missing = [f.name for f in rank_files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} was written by {saved_world} ranks but lacks {missing}")
    state = _sharded_state(model, optimizer, ema_state, trainable_only)
    check_fits(path, state)  # our own message, before DCP fails with tracebacks in its logs
    with _quiet():
        dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(trainable_only))
    return trainer_state, _rank_state(rank_files, dist)


def _rank_state(rank_files: list[Path], dist: DistInfo) -> dict[str, Any]:
    """This rank's data position and RNG states. On another world size (an elastic resume) the
    data state is every saved rank's, `{"ranks": [...]}`, for the loader to redistribute, and the
    RNG states are those of saved rank `rank % saved_world`."""
    load = lambda f: torch.load(f, weights_only=True)  # noqa: E731 - tensors and plain containers only
    if len(rank_files) == dist.world_size:
        return load(rank_files[dist.rank])
    saved = [load(f) for f in rank_files]
    return {**saved[dist.rank % len(saved)], "data": {"ranks": [s["data"] for s in saved]}}


@contextlib.contextmanager
def _quiet():
    """DCP warns that it 'assumes a single process' whenever there is no process group: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
