"""Converter inputs by fsspec URL: `RemotePath`, the few `pathlib.Path` operations the converters
use (name, stem, suffix, parent, `/`, is_dir, is_file, rglob, open, read_bytes) over a URL.

`as_input("s3://bucket/data")` gives a RemotePath, a local path gives a `Path`; the converters
do not tell them apart. Image references inside a remote input are confined like local ones:
an absolute reference or one with `..` is refused (`confined`).
"""

from __future__ import annotations

import io
import posixpath
from pathlib import Path, PurePosixPath

from data_pipelines.remote import (DEFAULT_STORAGE, RemoteUnavailable, filesystem, is_url, open_binary, read_bytes,
                                   redact)


class RemotePath:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({redact(self.url)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, part: str) -> "RemotePath":
        return RemotePath(self.url + "/" + str(part))

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.url.rsplit("/", 1)[0])

    def _fs(self):
        return filesystem(self.url, DEFAULT_STORAGE)

    def is_dir(self) -> bool:
        fs, path = self._fs()
        return fs.isdir(path)

    def is_file(self) -> bool:
        fs, path = self._fs()
        return fs.isfile(path)

    def rglob(self, pattern: str) -> list["RemotePath"]:
        fs, path = self._fs()
        found = fs.glob(posixpath.join(path, "**", pattern))
        return sorted(RemotePath(fs.unstrip_protocol(f)) for f in found)

    def __lt__(self, other: "RemotePath") -> bool:
        return self.url < other.url

    def read_bytes(self) -> bytes:
        return read_bytes(self.url)

    def open(self, mode: str = "r", encoding: str | None = None):
        """Read in blocks (a large JSONL or parquet file is not downloaded first)."""
        raw = open_binary(self.url)
        return raw if "b" in mode else io.TextIOWrapper(raw, encoding=encoding or "utf-8")


def as_input(path: str | Path) -> Path | RemotePath:
    """A converter input: a `Path`, or a `RemotePath` for an fsspec URL."""
    text = str(path)
    if is_url(text):
        if text.startswith("pipe:"):
            raise RemoteUnavailable(f"{text}: pipe: inputs are for shards, not converter inputs")
        if text.startswith("file://"):
            return Path(text[len("file://"):])
        return RemotePath(text)
    return Path(text)


def confined(root: Path | RemotePath, ref: str) -> Path | RemotePath:
    """`root / ref`, refused if it resolves outside `root` (absolute paths, `..`, symlinks out)."""
    if isinstance(root, RemotePath):
        if ref.startswith("/") or ".." in PurePosixPath(ref).parts:
            raise PermissionError(f"{ref} points outside the input root {redact(root.url)}")
        return root / ref
    base = root.resolve()
    path = (base / ref).resolve()
    if not path.is_relative_to(base):
        raise PermissionError(f"{ref} points outside the input root {root}")
    return path
