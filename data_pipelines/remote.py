"""Opening shards and manifests wherever they live: local paths, fsspec URLs, `pipe:` commands.

* A local path (or `file://`) is opened directly.
* `s3://`, `gs://`, `https://`, ... go through fsspec with the backend's standard credentials
  (environment variables, config files, instance metadata); `storage_options` in the data config
  pass extra keyword arguments per protocol (e.g. `{s3: {endpoint_url: ...}}`). They are read
  in blocks of `block_size` bytes (bounded memory, no full download), and tar members that are
  not wanted are skipped by seeking, so resuming inside a shard reads headers only.
* `pipe:CMD` (webdataset's convention) reads the standard output of a shell command.

Transient failures (a dropped connection, a 5xx answer, a timeout) are retried with exponential
backoff: `ResilientReader` reopens the object and continues at the byte where the read broke
off, so the tar stream above it sees no gap and no repeat. A missing object or a refused
credential is not retried. What stays unreachable after `retries` raises `OSError`, which the
shard reader counts and skips like any unreadable shard.

URLs are shown with `redact()` (no user:password, no query string: signed URLs carry secrets).
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# protocol -> the package that provides it (named in the error when it is missing)
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp",
            "https": "aiohttp", "az": "adlfs", "abfs": "adlfs"}
EXTRAS = {"s3fs": "bagel[s3]", "gcsfs": "bagel[gcs]"}
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class RemoteUnavailable(OSError):
    """A URL that cannot be read at all: a missing backend package, a missing object, no access."""


@dataclass(frozen=True)
class StorageConfig:
    """How remote data is read (the data config's `storage:` mapping)."""

    retries: int = 6  # attempts after the first failure of one read
    backoff: float = 0.25  # seconds before the first retry; doubles, at most `max_backoff`
    max_backoff: float = 8.0
    timeout: float = 60.0  # seconds without progress on one request before it counts as failed
    block_size: int = 4 << 20  # bytes per ranged request (and the read-ahead held in memory)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # protocol -> fsspec kwargs

    def __post_init__(self):
        if self.retries < 0 or self.backoff < 0 or self.timeout <= 0 or self.block_size < 4096:
            raise ValueError(f"storage: need retries >= 0, backoff >= 0, timeout > 0 and block_size >= 4096, "
                             f"got {self.retries}, {self.backoff}, {self.timeout}, {self.block_size}")


DEFAULT_STORAGE = StorageConfig()


def is_url(path: str) -> bool:
    return str(path).startswith("pipe:") or bool(_URL_RE.match(str(path)))


def protocol_of(url: str) -> str:
    return str(url).split("://", 1)[0].lower() if _URL_RE.match(str(url)) else "file"


def redact(url: str) -> str:
    """`url` without credentials: user:password and the query string removed."""
    url = str(url)
    if url.startswith("pipe:") or not _URL_RE.match(url):
        return url
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def join(root: str, relative: str) -> str:
    """`relative` under `root`, for URLs and local folders alike (absolute URLs pass through)."""
    if is_url(relative) or os.path.isabs(relative):
        return relative
    if is_url(root):
        return root.rstrip("/") + "/" + relative
    return os.path.join(root, relative)


def parent(path: str) -> str:
    if is_url(path):
        return str(path).rsplit("/", 1)[0]
    return os.path.dirname(path)


def filesystem(url: str, storage: StorageConfig):
    import fsspec

    protocol = protocol_of(url)
    kwargs = dict(storage.options.get(protocol, {}))
    if protocol in ("http", "https"):
        try:
            import aiohttp
        except ImportError:
            aiohttp = None
        if aiohttp is not None and "client_kwargs" not in kwargs:
            kwargs["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
                total=None, sock_connect=storage.timeout, sock_read=storage.timeout)}
    elif protocol in ("s3", "s3a"):
        config = dict(kwargs.pop("config_kwargs", {}))
        config.setdefault("connect_timeout", storage.timeout)
        config.setdefault("read_timeout", storage.timeout)
        kwargs["config_kwargs"] = config
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as e:
        package = BACKENDS.get(protocol, "the fsspec backend")
        extra = f" (pip install '{EXTRAS[package]}')" if package in EXTRAS else f" (pip install {package})"
        raise RemoteUnavailable(f"{redact(url)}: reading {protocol}:// needs the package {package}{extra}") from e
    except ValueError as e:  # fsspec: unknown protocol
        raise RemoteUnavailable(f"{redact(url)}: {e}") from e


def _permanent(error: BaseException) -> bool:
    """A failure that retrying cannot fix: missing object, refused access, bad request. (fsspec's
    HTTP backend reports a refused connection as FileNotFoundError: its cause says otherwise.)"""
    cause = error.__cause__ or error.__context__
    if cause is not None and _is_connection_error(cause):
        return False
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, RemoteUnavailable)):
        return True
    status = getattr(error, "status", None) or getattr(error, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _is_connection_error(error: BaseException) -> bool:
    names = {c.__name__ for c in type(error).__mro__}
    return isinstance(error, (ConnectionError, TimeoutError)) or bool(
        names & {"ClientConnectionError", "ServerTimeoutError", "EndpointConnectionError", "ConnectTimeoutError"})


def _describe(error: BaseException) -> str:
    """`Type: message` of an error, or of its cause when that says more (a refused connection)."""
    cause = error.__cause__ or error.__context__
    shown = cause if cause is not None and _is_connection_error(cause) else error
    return f"{type(shown).__name__}: {_clean(shown)}"


class ResilientReader(io.RawIOBase):
    """A read-only, seekable file over one URL that reconnects at the current byte on failures."""

    def __init__(self, url: str, storage: StorageConfig = DEFAULT_STORAGE):
        self.url, self.storage = url, storage
        self.pos = 0
        self.retried = 0  # reconnections so far (tests and logs)
        self._fs, self._path = filesystem(url, storage)
        self._file = None
        self.size = self._with_retries(lambda: self._fs.size(self._path), "size")

    def _open(self):
        if self._file is None:
            self._file = self._fs.open(self._path, "rb", block_size=self.storage.block_size)
            if self.pos:
                self._file.seek(self.pos)
        return self._file

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close, too
                pass
            self._file = None

    def _with_retries(self, action, what: str):
        delay = self.storage.backoff
        for attempt in range(self.storage.retries + 1):
            try:
                return action()
            except Exception as e:  # noqa: BLE001 - backends raise their own exception types
                self._drop()
                if _permanent(e):
                    hint = " (access refused: check the backend's credentials)" if isinstance(e, PermissionError) else ""
                    raise RemoteUnavailable(f"{redact(self.url)}: {_describe(e)}{hint}") from None
                if attempt == self.storage.retries:
                    raise OSError(f"{redact(self.url)}: {what} failed {attempt + 1} times, last: "
                                  f"{_describe(e)}") from None
                self.retried += 1
                log.info("retrying %s at byte %d in %.2f s (%s)", redact(self.url), self.pos, delay, _describe(e))
                time.sleep(delay)
                delay = min(self.storage.max_backoff, max(delay * 2, 0.01))
        raise AssertionError("unreachable")

    # io.RawIOBase ------------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        if self._file is not None:
            self._file.seek(self.pos)
        return self.pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), max(0, self.size - self.pos))
        if want == 0:
            return 0
        data = self._with_retries(lambda: self._open().read(want), f"reading at byte {self.pos}")
        if not data:  # the object is shorter than its size said: a truncated upload
            raise OSError(f"{redact(self.url)}: ended at byte {self.pos} of {self.size}")
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def _clean(error: BaseException) -> str:
    """An exception's text on one line, with any URL in it redacted."""
    text = " ".join(str(error).split())
    return re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+", lambda m: redact(m.group(0)), text)[:300]


class PipeReader(io.RawIOBase):
    """The standard output of `pipe:CMD` (not seekable; a failed command raises OSError)."""

    def __init__(self, url: str):
        self.command = url[len("pipe:"):]
        self._proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._proc.stdout.readinto(buffer)
        if n == 0:
            code = self._proc.wait()
            if code != 0:
                err = self._proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise OSError(f"pipe:{self.command} exited with status {code}"
                              + (f": {err[-1]}" if err else ""))
        return n

    def close(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self._proc.stdout.close()
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc.stderr.close()
        super().close()


def open_binary(path: str, storage: StorageConfig = DEFAULT_STORAGE) -> io.BufferedIOBase:
    """A buffered binary reader over a local path, a URL or a `pipe:` command."""
    path = str(path)
    if path.startswith("pipe:"):
        return io.BufferedReader(PipeReader(path), buffer_size=1 << 20)
    if not is_url(path) or protocol_of(path) == "file":
        local = path[len("file://"):] if path.startswith("file://") else path
        return open(local, "rb")
    return io.BufferedReader(ResilientReader(path, storage), buffer_size=min(1 << 16, storage.block_size))


def read_bytes(path: str, storage: StorageConfig = DEFAULT_STORAGE) -> bytes:
    with open_binary(path, storage) as f:
        return f.read()
