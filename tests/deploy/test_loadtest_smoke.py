"""The headless load test, run for a few seconds: against the real service, and against a stub server
whose answers show that failures and 503 rejections are told apart."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from loadtest.report import read_summary

from .conftest import REPO_ROOT, LiveServer

RUN_TIMEOUT_S = 120


def run_loadtest(host: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "loadtest.run", "--host", host, "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_smoke_run_against_the_real_service(live_server: LiveServer, tmp_path: Path) -> None:
    result = run_loadtest(
        live_server.url,
        tmp_path,
        *("--users", "3", "--spawn-rate", "3", "--duration", "4s"),
        *("--tiers", "fast=1,exact=1", "--images-per-request", "2", "--top-k", "3"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for name in ("locust_stats.csv", "locust_report.html", "locust_summary.json"):
        assert (tmp_path / name).is_file(), f"{name} not written"
    tiers = read_summary(tmp_path / "locust_summary.json")
    assert set(tiers) == {"fast", "exact"}
    for stats in tiers.values():
        assert stats.requests > 0 and stats.failures == 0 and stats.rejections == 0, stats
        assert 0 < stats.p50_ms <= stats.p95_ms <= stats.p99_ms
    out = result.stdout
    assert "tier" in out and "images/s" in out and "p99 ms" in out
    assert "vit-tiny-demo/fast:" in out and "vit-tiny-demo/exact:" in out, out[-1500:]


def valid_body(tier: str, top_k: int) -> dict[str, object]:
    preds = [{"label": f"c{i}", "index": i, "score": 0.01} for i in range(top_k)]
    return {"request_id": "stub", "model": "stub", "tier": tier, "top_k": preds, "batch_size": 1}


class StubHandler(BaseHTTPRequestHandler):
    """exact: right answer; fast: 503; balanced: not JSON; fastest: wrong tier; broken: HTTP 500."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.reply(200, b"", "text/plain")  # /metrics: no batch sizes

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        query = parse_qs(urlparse(self.path).query)
        tier, top_k = query["tier"][0], int(query["top_k"][0])
        if tier == "exact":
            self.reply(200, json.dumps(valid_body(tier, top_k)).encode())
        elif tier == "fast":
            self.reply(503, b'{"error": {"code": "queue_full", "message": "full"}}')
        elif tier == "balanced":
            self.reply(200, b"<html>not json</html>", "text/html")
        elif tier == "fastest":
            self.reply(200, json.dumps(valid_body("exact", top_k)).encode())
        else:
            self.reply(500, b'{"error": {"code": "internal", "message": "boom"}}')


@pytest.fixture()
def stub_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_failures_and_rejections_are_counted_apart(stub_server: str, tmp_path: Path) -> None:
    result = run_loadtest(
        stub_server,
        tmp_path,
        *("--users", "2", "--spawn-rate", "2", "--duration", "2s", "--top-k", "2"),
        *("--tiers", "exact=1,fast=1,balanced=1,fastest=1,broken=1"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    tiers = read_summary(tmp_path / "locust_summary.json")
    assert set(tiers) == {"exact", "fast", "balanced", "fastest", "broken"}, tiers
    exact, fast = tiers["exact"], tiers["fast"]
    assert exact.requests > 0 and exact.failures == 0 and exact.rejections == 0
    assert fast.rejections > 0 and fast.requests == 0 and fast.failures == 0, "503 is no failure"
    for bad in ("balanced", "fastest", "broken"):
        stats = tiers[bad]
        assert stats.requests > 0 and stats.failures == stats.requests and stats.rejections == 0, stats
    errors = json.loads((tmp_path / "locust_summary.json").read_text())["errors"]
    messages = {e["name"]: e["error"] for e in errors}
    assert "not JSON" in messages["/classify [balanced]"]
    assert "asked for tier 'fastest'" in messages["/classify [fastest]"]
    assert "HTTP 500" in messages["/classify [broken]"]
    assert not any(name in messages for name in ("/classify [exact]", "/classify [fast]"))


def test_several_locust_processes_report_their_summed_figures(stub_server: str, tmp_path: Path) -> None:
    """With --processes the master writes the summary from every worker's stats; a worker must not
    overwrite it at exit with what it had not sent yet."""
    result = run_loadtest(
        stub_server,
        tmp_path,
        *("--users", "4", "--spawn-rate", "4", "--duration", "3s", "--top-k", "2", "--processes", "2"),
        *("--tiers", "exact=1,fast=1"),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "2 locust process(es)" in result.stdout
    summary = json.loads((tmp_path / "locust_summary.json").read_text())
    tiers = read_summary(tmp_path / "locust_summary.json")
    assert set(tiers) == {"exact", "fast"}, summary
    exact, fast = tiers["exact"], tiers["fast"]
    assert exact.requests > 20 and exact.failures == 0 and fast.rejections > 20, summary
