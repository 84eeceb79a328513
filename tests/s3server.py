"""A real S3-protocol server on 127.0.0.1 for tests: moto's server mode in a subprocess.

``moto_s3()`` starts it, points the standard AWS environment variables at it (the same
configuration chain production uses), creates a bucket, and restores the environment
when done. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BUCKET = "piarec-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str = BUCKET):
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
           "MLFLOW_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.2)
        os.environ.update(env)
        import boto3

        boto3.client("s3").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=10)


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that injects faults.

    ``fail_first`` requests get a 503 SlowDown (or, with ``delay``, are held that many
    seconds and dropped unanswered, so the client times out); later ones pass through.
    ``fail_first=None`` fails every request; ``fail_after=N`` passes the first N requests
    and fails every later one (a store that goes down mid-run). ``requests`` counts what
    reached the proxy.
    """

    def __init__(self, upstream: str, fail_first: int | None = 2, delay: float = 0.0, fail_after: int | None = None):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlparse

        up = urlparse(upstream)
        proxy = self
        self.fail_first, self.delay, self.requests, self.faults = fail_first, delay, 0, 0
        if fail_after is not None:
            self.fail_first = 0
        self.fail_after = fail_after
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _read_body(self) -> bytes:
                """The body as sent; a chunked body keeps its framing (S3's aws-chunked
                uploads carry checksum trailers inside it) and is forwarded chunked."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = []
                while True:
                    line = self.rfile.readline()
                    raw.append(line)
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, then the blank line
                            line = self.rfile.readline()
                            raw.append(line)
                            if line in (b"\r\n", b"\n", b""):
                                return b"".join(raw)
                    raw.append(self.rfile.read(size + 2))  # data + CRLF

            def _handle(self):
                body = self._read_body()
                with proxy._lock:
                    proxy.requests += 1
                    fault = (proxy.fail_first is None or proxy.requests <= proxy.fail_first
                             or (proxy.fail_after is not None and proxy.requests > proxy.fail_after))
                    proxy.faults += fault
                if fault and proxy.delay:
                    time.sleep(proxy.delay)  # the client times out; the request is dropped
                    self.close_connection = True
                    return
                if fault:
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                # Hop-by-hop headers stay here: the body has been read already.
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "keep-alive")}
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    # A HEAD answer carries the object's length with no body: keep it.
                    if k.lower() not in ("transfer-encoding", "connection") and (
                            k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _safe(self):
                try:
                    self._handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout the test injected)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
