"""Real servers on 127.0.0.1 for the remote-data tests, started and stopped by the tests.

`FileServer`: a standard-library HTTP server for one folder with HEAD, byte ranges and injected
faults (the first `fail_500` GETs answer 500; every `drop_every`-th GET drops the connection
after `drop_after` bytes, `drops` times). `s3_server()`: moto in server mode (an S3-compatible endpoint for s3fs).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        server = self.server
        with server.lock:
            server.gets += 1
            fail = server.fail_500 > 0
            if fail:
                server.fail_500 -= 1
            drop = server.drops > 0 and server.drop_after is not None and server.gets % server.drop_every == 0
            if drop:
                server.drops -= 1
        if fail:
            self.send_error(500, "injected failure")
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end, status = 0, len(data), 200
        match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            if start >= len(data):
                self.send_error(416)
                return
            status = 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if drop and len(body) > server.drop_after:
            self.wfile.write(body[:server.drop_after])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)  # the client sees the body end early
            return
        self.wfile.write(body)

    def do_HEAD(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


class FileServer:
    """`with FileServer(folder) as server: server.url + "/name"`."""

    def __init__(self, folder: str | Path, *, fail_500: int = 0, drop_after: int | None = None, drops: int = 0,
                 drop_every: int = 1):
        handler = lambda *a, **k: _Handler(*a, directory=str(folder), **k)  # noqa: E731
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.lock = threading.Lock()
        self.httpd.gets, self.httpd.fail_500 = 0, fail_500
        self.httpd.drop_after, self.httpd.drops, self.httpd.drop_every = drop_after, drops, drop_every
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def gets(self) -> int:
        return self.httpd.gets

    def faults(self, *, fail_500: int = 0, drop_after: int | None = None, drops: int = 0, drop_every: int = 1) -> None:
        """Answer 500 to the next `fail_500` GETs; cut every `drop_every`-th GET after `drop_after`
        bytes, `drops` times."""
        with self.httpd.lock:
            self.httpd.fail_500, self.httpd.drop_after, self.httpd.drops = fail_500, drop_after, drops
            self.httpd.drop_every = drop_every

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def s3_server(monkeypatch):
    """moto's S3 on 127.0.0.1 with test credentials in the environment; yields the endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint
    finally:
        import urllib.request

        # moto keeps its buckets in the process, not in the server: empty them for the next test
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
        server.stop()


def upload_folder(s3, folder: str | Path, bucket: str, prefix: str) -> None:
    """Copy every file of `folder` to s3://bucket/prefix/ with an s3fs filesystem."""
    for root, _, files in os.walk(folder):
        for name in files:
            local = Path(root) / name
            rel = local.relative_to(folder).as_posix()
            s3.put_file(str(local), f"{bucket}/{prefix}/{rel}")
