"""Real servers on loopback for the remote-shard tests, started by the tests themselves: an S3-compatible
server (moto's), a plain HTTP server over a directory, and a fault-injecting proxy in front of either."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BUCKET = "shards"
# What boto3 / s3fs read (the tests' own credentials: moto accepts any).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/moto-api/")
        yield url
    finally:
        proc.kill()
        proc.wait()


def upload_dir(endpoint: str, local: Path, prefix: str) -> str:
    """Every file of ``local`` to s3://BUCKET/prefix/ on the moto server; returns that URL."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    for f in sorted(local.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"{prefix}/{f.name}")
    return f"s3://{BUCKET}/{prefix}"


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    """Python's HTTP server over ``root`` in a thread; yields its base URL."""

    class Handler(_Quiet):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class FaultProxy:
    """An HTTP proxy in front of ``upstream`` that applies queued faults to the GETs of files whose path
    ends with ``match``: ``"drop"`` (headers and half the body, then the connection closes), ``"503"``,
    ``"slow"`` (waits ``slow_s`` before answering). ``always`` is applied to every such GET after the
    queue runs out. ``log`` records every (method, path)."""

    def __init__(self, upstream: str, match: str = ".tar", slow_s: float = 3.0):
        self.upstream = upstream.removeprefix("http://")
        self.match, self.slow_s = match, slow_s
        self.faults: list[str] = []
        self.always: str | None = None
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(_Quiet):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.log.append((self.command, self.path))
                    fault = None
                    if self.command == "GET" and self.path.split("?")[0].endswith(proxy.match):
                        fault = proxy.faults.pop(0) if proxy.faults else proxy.always
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_s)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "drop":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def gets(self) -> list[str]:
        """Paths of the matching GETs so far."""
        with self.lock:
            return [p for m, p in self.log if m == "GET" and p.split("?")[0].endswith(self.match)]

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment that points boto / s3fs at ``endpoint``."""
    return {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
