"""A run directory belongs to one run at a time, and a new run never eats an old one.

- `RunLock`: rank 0 holds an exclusive `flock` on RUN_DIR/.lock for the whole run (the kernel
  drops it when the process dies, however it dies). A second trainer in the same directory
  (an orphaned worker of a killed torchrun, a relaunch started too early) is refused with the
  holder's pid and host; a lock file left by a dead process is taken over, with a message.
- `check_fresh_start`: a run that starts at step 0 in a directory holding an earlier run's files
  is refused (naming the directory and the options), unless told to overwrite, which moves the
  old run aside to RUN_DIR.old-<time> first. Nothing is deleted.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from bagel.config import ConfigError

LOCK_NAME = ".lock"
# Entries a fresh run may find in its directory without it counting as used.
_NOT_A_RUN = {LOCK_NAME, "checkpoints"}


class RunDirError(ConfigError):
    """The run directory is in use or holds another run."""


class RunLock:
    """Exclusive lock on a run directory; use as a context manager (or acquire / release)."""

    def __init__(self, run_dir: str | Path, log=print):
        self.path = Path(run_dir) / LOCK_NAME
        self.log = log
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"run directory {self.path.parent} is in use by another trainer ({holder}); stop it "
                              "first, or choose another --run_dir") from None
        previous = _read_holder(fd)
        if previous != "unknown process":
            self.log(f"[bagel-train] taking over the lock of {self.path.parent} left by {previous}, which is no "
                     "longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # a clean exit leaves no stale holder behind
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {data['pid']} on {data['host']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


def used_entries(run_dir: str | Path) -> list[str]:
    """What in `run_dir` belongs to an earlier run (its files, or any checkpoint, even a partial one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    used = sorted(p.name for p in run_dir.iterdir() if p.name not in _NOT_A_RUN)
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        used.append("checkpoints/" + ", ".join(sorted(p.name for p in checkpoints.iterdir())[:3]))
    return used


def check_fresh_start(run_dir: str | Path, overwrite: bool, log=print) -> None:
    """Before a run starts at step 0 in `run_dir`: refuse if it holds an earlier run, or (with
    `overwrite`) move that run aside first."""
    run_dir = Path(run_dir)
    used = used_entries(run_dir)
    if not used:
        return
    if not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already holds a run ({', '.join(used[:4])}) and this run would start from "
            "step 0: use --resume auto to continue it, --checkpoint.overwrite=true to move it aside and start "
            "afresh, or another --run_dir")
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name.split('+')[0]}+{n}")
        n += 1
    aside.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            os.replace(entry, aside / entry.name)
    log(f"[bagel-train] moved the earlier run in {run_dir} aside to {aside}")
