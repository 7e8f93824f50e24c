"""A real S3-compatible server for tests (moto's standalone server, in its own process on a free port
of 127.0.0.1) and a small HTTP proxy in front of it that can delay requests, answer some with 503
(S3's "SlowDown") or die after a number of requests, as a flaky or crashing store would."""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1; :meth:`stop` ends it (and every process it started)."""

    def __init__(self) -> None:
        self.port = free_port()
        env = {**os.environ, **CREDENTIALS}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """The environment a ckptavg process needs to reach this server (through ``endpoint`` if given)."""
        return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    def fs(self):
        """An s3fs file system on this server, for the test's own uploads and checks."""
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=self.endpoint,
                                 skip_instance_cache=True, use_listings_cache=False)


class FaultyProxy:
    """Forwards HTTP to ``target``; every ``fail_every``-th request gets a 503 SlowDown, each request
    waits ``delay`` seconds first, and after ``die_after`` requests every connection is dropped."""

    def __init__(self, target: str, *, fail_every: int = 0, delay: float = 0.0, die_after: int = 0) -> None:
        self.target = target.removeprefix("http://")
        self.fail_every, self.delay, self.die_after = fail_every, delay, die_after
        self.count = 0
        self.failed = 0
        self.active = 0  # requests being served now
        self.peak = 0  # the most served at once
        self.dead = False
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                with proxy.lock:
                    proxy.active += 1
                    proxy.peak = max(proxy.peak, proxy.active)
                try:
                    self._serve()
                finally:
                    with proxy.lock:
                        proxy.active -= 1

            def _serve(self) -> None:
                with proxy.lock:
                    proxy.count += 1
                    n = proxy.count
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.die_after and n > proxy.die_after:  # the server dies: no more connections
                    proxy.kill()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if proxy.delay:
                    time.sleep(proxy.delay)
                if proxy.fail_every and n % proxy.fail_every == 0:
                    with proxy.lock:
                        proxy.failed += 1
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.target, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def kill(self) -> None:
        """Stop listening at once: later connections are refused, as by a server that died."""
        with self.lock:
            if not self.dead:
                self.dead = True
                self.server.socket.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
