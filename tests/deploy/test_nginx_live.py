"""deploy/nginx/tome-serve.conf in a real nginx, its two replicas stood in for by tiny HTTP servers.

Needs nginx (Debian: `apt-get install nginx-light`); skipped, saying so, without it.
"""

from __future__ import annotations

import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.processes import free_port, running

from .conftest import REPO_ROOT

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None
)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
CONF = REPO_ROOT / "deploy" / "nginx" / "tome-serve.conf"
REPLICAS = ("tome-serve:8000", "tome-serve-gpu1:8000")


class Replica:
    """Answers POSTs with its name: 503 for the first ``fail_first``, then 200. GETs (readiness): 200."""

    def __init__(self, name: str, fail_first: int) -> None:
        self.name, self.fail_first, self.posts = name, fail_first, 0
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer(200)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    replica.posts += 1
                    code = 503 if replica.posts <= replica.fail_first else 200
                self._answer(code)

            def _answer(self, code: int) -> None:
                body = replica.name.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def nginx_in_front_of(ports: list[int], tmp_path: Path) -> Iterator[str]:
    """The repo's site config with its upstream servers pointed at ``ports``, in a minimal nginx.conf."""
    site = CONF.read_text()
    for replica, port in zip(REPLICAS, ports, strict=True):
        assert f"server {replica}" in site
        site = site.replace(f"server {replica}", f"server 127.0.0.1:{port}")
    listen = free_port()
    assert "listen 8080;" in site
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log warn;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n"
        f"  proxy_temp_path {tmp_path}/proxy;\n  include {tmp_path}/site.conf;\n}}\n"
    )
    url = f"http://127.0.0.1:{listen}"
    assert NGINX is not None
    cmd = [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    with running(cmd, url + "/", tmp_path / "nginx.out", 30):
        yield url


@contextmanager
def nginx_with_replicas(tmp_path: Path, *fail_first: int) -> Iterator[tuple[str, list[Replica]]]:
    """Replicas "a", "b", ... (each answering 503 to its first ``fail_first`` POSTs) behind nginx."""
    replicas = [Replica(name, n) for name, n in zip("ab", fail_first, strict=True)]
    try:
        with nginx_in_front_of([r.port for r in replicas], tmp_path) as url:
            yield url, replicas
    finally:
        for replica in replicas:
            replica.close()


def post_many(url: str, n: int) -> Counter[tuple[int, str]]:
    with httpx.Client(timeout=10) as client:
        return Counter(
            (r.status_code, r.text) for r in (client.post(url + "/", content=b"x") for _ in range(n))
        )


def test_a_503_is_retried_without_taking_the_replica_out(tmp_path: Path) -> None:
    """A queue_full 503 is the service's routine backpressure: nginx retries that request on the other
    replica, and keeps sending new work to both (with nginx's default max_fails=1 a retried 503 counts as
    a failure and the replica got no traffic for fail_timeout, 10 s: all of it went to the other one)."""
    with nginx_with_replicas(tmp_path, 1, 0) as (url, (first, _)):
        answers = post_many(url, 10)
    assert first.posts >= 2, f"no request reached the first replica after its 503: {answers}"
    assert set(answers) == {(200, "a"), (200, "b")}, answers


def test_a_replica_that_is_down_costs_no_request(tmp_path: Path) -> None:
    """Nothing listens on the second replica's port (restarting, or loading its model): every request
    is answered by the first, none gets a 502."""
    up = Replica("a", fail_first=0)
    down = free_port()
    try:
        with nginx_in_front_of([up.port, down], tmp_path) as url:
            answers = post_many(url, 10)
    finally:
        up.close()
    assert answers == Counter({(200, "a"): 10}), answers


def test_every_replica_503_passes_the_503_through(tmp_path: Path) -> None:
    with nginx_with_replicas(tmp_path, 100, 100) as (url, (first, second)):
        answers = post_many(url, 4)
    assert set(answers) <= {(503, "a"), (503, "b")} and sum(answers.values()) == 4, answers
    assert first.posts + second.posts == 8, "each request tried on both replicas, once each"


def test_a_body_over_the_limit_is_a_json_413_from_nginx(tmp_path: Path) -> None:
    """nginx refuses a body over the service's 16 MiB limit itself: the client gets the service's error
    shape (code ``too_large``), not nginx's HTML page, and no replica sees the request."""
    with nginx_with_replicas(tmp_path, 0, 0) as (url, (first, second)):
        r = httpx.post(url + "/classify", content=b"x" * (16 * 1024 * 1024 + 1), timeout=30)
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["code"] == "too_large"
    assert first.posts + second.posts == 0
