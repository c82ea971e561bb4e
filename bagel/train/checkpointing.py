"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

    RUN_DIR/checkpoints/step_00001000/
        .metadata, __<rank>_0.distcp   model, optimizer and EMA shards (DCP; reshardable)
        rank_00000.pt ...              per rank: data-loader state, RNG states
        trainer.json                   step, loss scaler, counters, world size
        config.yaml                    the resolved TrainConfig

A checkpoint is written into `.tmp_step_XXXXXXXX` and renamed to `step_XXXXXXXX` by rank 0 once
every rank has finished (a rename within one directory is atomic on POSIX file systems; on many
nodes RUN_DIR must be on a shared file system). A run killed while writing leaves only a `.tmp_`
directory, which is ignored and removed at the next start; the previous checkpoint is untouched.
Only the last `keep` checkpoints are kept. Every rank saves and loads only its own shards: no
full state dict is gathered (the official trainer gathers it on rank 0 and OOMs on large models).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from bagel.train.distributed import DistInfo, barrier

PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale(run_dir: str | Path, dist: DistInfo) -> None:
    """Delete half-written checkpoints left by a killed run (rank 0)."""
    root = checkpoint_root(run_dir)
    if dist.is_main and root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
    barrier()


def save(run_dir: str | Path, step: int, model, optimizer, ema_state: dict[str, torch.Tensor] | None,
         trainer_state: dict[str, Any], rank_state: dict[str, Any], config_yaml: str, keep: int,
         dist: DistInfo, crash: bool = False) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). Returns its final path."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{step:08d}"
    if dist.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    state = _sharded_state(model, optimizer, ema_state)
    with _quiet():
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rank_state, tmp / f"rank_{dist.rank:05d}.pt")
    if crash:  # fault injection: die with the shards written but the checkpoint not committed
        os._exit(17)
    barrier()
    if dist.is_main:
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step,
                                                      "world_size": dist.world_size}, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _sharded_state(model, optimizer, ema_state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """What DCP saves and loads in place: model, optimizer and (if any) EMA state dicts."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if ema_state is not None:
        state["ema"] = ema_state
    return state


def load(path: str | Path, model, optimizer, ema_state: dict[str, torch.Tensor] | None,
         dist: DistInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and EMA in place; returns (trainer_state, this rank's state)."""
    path = Path(path)
    if not (path / "trainer.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer.json)")
    trainer_state = json.loads((path / "trainer.json").read_text())
    rank_file = path / f"rank_{dist.rank:05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by {trainer_state.get('world_size')} "
            f"ranks and this run has {dist.world_size}; the data-loader state only resumes on the same "
            "world size (weights alone can be reloaded with model.preset=pretrained after an export)")
    state = _sharded_state(model, optimizer, ema_state)
    with _quiet():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_state = torch.load(rank_file, weights_only=True)  # tensors and plain containers: no unpickling
    return trainer_state, rank_state


@contextlib.contextmanager
def _quiet():
    """DCP warns that it 'assumes a single process' whenever there is no process group: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
