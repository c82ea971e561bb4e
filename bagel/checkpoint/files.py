"""Writing and reading weight files: atomic writes, safetensors with errors that name the file.

A write goes to a temporary file in the same directory, is flushed to disk, then renamed over the
target (atomic on POSIX): an interrupted save never leaves a half-written file behind. Reading
goes through safetensors only (no pickle): a truncated or foreign file is a `CheckpointError`
naming the path, not a `SafetensorError` from deep inside the library.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from bagel.checkpoint.strict import CheckpointError


def atomic_write(path: str | Path, write_fn: Callable[[str], Any]) -> None:
    """Call `write_fn(tmp_path)`, fsync it, then rename the temp file over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt", **(metadata or {})}))


class SafetensorsFile:
    """A safetensors file opened for per-tensor reads (memory-mapped): `names()`, `shapes()`,
    `get(name)`. Opening a missing, truncated or non-safetensors file raises an error naming it."""

    def __init__(self, path: str | Path, what: str = "weights file"):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: {what} not found")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            self._names = list(self._handle.keys())
        except Exception as e:  # SafetensorError, OSError, ...: the header cannot be read
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({_reason(e)})") from None

    def names(self) -> list[str]:
        return list(self._names)

    def shapes(self) -> dict[str, list[int]]:
        return {k: list(self._handle.get_slice(k).get_shape()) for k in self._names}

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as e:  # the header promised more bytes than the file holds
            raise CheckpointError(f"{self.path}: tensor {name!r} cannot be read ({_reason(e)}); "
                                  "the file is truncated or damaged") from None


def load_safetensors(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (CPU), with errors that name the file."""
    f = SafetensorsFile(path, what)
    return {k: f.get(k) for k in f.names()}


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
