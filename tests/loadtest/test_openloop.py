"""``python -m loadtest.openloop`` against loopback stub servers: the send schedule holds however slow the
answers are, and every kind of outcome is counted apart in the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 120


def valid_body(tier: str, top_k: int) -> bytes:
    preds = [{"label": f"c{i}", "index": i, "score": 0.01} for i in range(top_k)]
    return json.dumps({"request_id": "stub", "tier": tier, "top_k": preds, "batch_size": 1}).encode()


class Stub(ThreadingHTTPServer):
    """A thread per connection, a backlog deep enough for a burst of connects, and a log of arrivals."""

    daemon_threads = True
    request_queue_size = 512

    def __init__(self, handler: type[BaseHTTPRequestHandler], service_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.service_s = service_s
        self.one_at_a_time = threading.Lock()
        self.arrivals: list[float] = []  # time.monotonic() when each request's head was read

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up is expected here
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the generator's pool expects
    server: Stub

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.server.arrivals.append(time.monotonic())
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        query = parse_qs(urlparse(self.path).query)
        tier, top_k = query["tier"][0], int(query["top_k"][0])
        self.answer(tier, top_k)

    def answer(self, tier: str, top_k: int) -> None:
        """A server that does one request at a time, each taking ``service_s``."""
        with self.server.one_at_a_time:
            time.sleep(self.server.service_s)
        self.reply(200, valid_body(tier, top_k))


class OutcomeHandler(Handler):
    """exact: 200; fast: 503; balanced: 504; fastest: 200 with a wrong body; slow: no answer within the
    client timeout; broken: the connection is closed without an answer."""

    def answer(self, tier: str, top_k: int) -> None:
        if tier == "exact":
            self.reply(200, valid_body(tier, top_k))
        elif tier == "fast":
            self.reply(503, b'{"error": {"code": "queue_full", "message": "full"}}')
        elif tier == "balanced":
            self.reply(504, b'{"error": {"code": "deadline", "message": "late"}}')
        elif tier == "fastest":
            self.reply(200, valid_body("exact", top_k))
        elif tier == "slow":
            time.sleep(4.0)
            self.reply(200, valid_body(tier, top_k))
        else:
            self.close_connection = True  # nothing written


def serve(server: Stub) -> Iterator[Stub]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def slow_server() -> Iterator[Stub]:
    yield from serve(Stub(Handler, service_s=0.05))  # capacity 20 requests/s


@pytest.fixture()
def outcome_server() -> Iterator[Stub]:
    yield from serve(Stub(OutcomeHandler))


def run_openloop(host: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "loadtest.openloop", "--host", host, "--json", str(out), *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    report["stdout"] = result.stdout
    return report


def test_schedule_holds_while_latency_from_intended_send_grows(slow_server: Stub, tmp_path: Path) -> None:
    # 40 requests/s for 2 s at a server that answers 20/s: a closed loop would slow down to 20/s and
    # report flat latency; the open loop keeps sending at 40/s and the queue shows in the latency.
    report = run_openloop(
        slow_server.url,
        tmp_path / "ol.json",
        *("--rate", "40", "--duration", "2", "--warmup", "0", "--timeout", "30", "--tiers", "exact"),
        *("--images-dir", str(tmp_path / "none")),  # generated images: no ../shared needed
    )
    (run,) = report["runs"]
    assert run["scheduled"] == 80 and run["counts"] == {"200": 80}

    # The server saw the requests arrive on schedule, in the second second as many as in the first,
    # although by then it was a second behind in answering them. The bounds leave room for a stall of a
    # few hundred ms on a loaded CI host; a closed loop (sending as answers come back, 20/s) puts ~20 in
    # the first second, spreads the 80 over ~4 s and lags by up to ~2 s, far outside every one of them.
    arrivals = sorted(slow_server.arrivals)
    assert len(arrivals) == 80
    start = arrivals[0]
    first = sum(1 for t in arrivals if t - start < 1.0)
    assert 30 <= first <= 50, arrivals
    assert arrivals[-1] - start == pytest.approx(79 / 40, abs=0.5)

    # Sends on time: the median request left within 20 ms of its intended time and none was 250 ms late
    # (not p99: of 80 lags that is ~the max, so one scheduler stall would fail it).
    sched, gen = run["schedule"], run["generator"]
    assert sched["lag_ms"]["p50"] < 20 and sched["lag_ms"]["max"] < 250, sched
    assert gen["waited_for_connection"] == 0 and gen["max_in_flight"] > 20

    # Latency from the intended send grows with the queue: the last requests waited for ~40 before them.
    ok = run["latency_ms"]["ok"]
    assert ok["p50"] > 1000 and ok["max"] > 1500, ok
    assert ok["max"] > 10 * 50, "far above the 50 ms service time"
    assert run["goodput_rps"] == pytest.approx(40.0)  # every request was eventually answered


def test_every_outcome_is_counted_apart(outcome_server: Stub, tmp_path: Path) -> None:
    report = run_openloop(
        outcome_server.url,
        tmp_path / "ol.json",
        *("--rate", "60", "--duration", "2", "--warmup", "0.5", "--timeout", "2", "--processes", "2"),
        *("--tiers", "exact,fast,balanced,fastest,slow,broken", "--images-dir", str(tmp_path / "none")),
        *("--arrivals", "poisson", "--seed", "7"),
    )
    assert report["config"]["processes"] == 2 and report["config"]["rates"] == [60.0]
    (run,) = report["runs"]
    counts = run["counts"]
    assert set(counts) == {"200", "503", "504", "timeout", "connection_error", "bad_body"}, counts
    assert sum(counts.values()) == run["scheduled"] > 60
    assert run["goodput_rps"] == counts["200"] / 2.0
    by_tier = run["by_tier"]
    assert by_tier["exact"]["counts"] == {"200": by_tier["exact"]["scheduled"]}
    assert by_tier["fast"]["counts"] == {"503": by_tier["fast"]["scheduled"]}
    assert by_tier["slow"]["counts"] == {"timeout": by_tier["slow"]["scheduled"]}
    assert by_tier["broken"]["counts"] == {"connection_error": by_tier["broken"]["scheduled"]}
    assert by_tier["fastest"]["counts"] == {"bad_body": by_tier["fastest"]["scheduled"]}

    lat = run["latency_ms"]
    assert lat["ok"]["count"] == counts["200"] and lat["refused"]["count"] == counts["503"]
    assert lat["by_status"]["timeout"]["p50"] >= 2000, "a timeout is reported after the client timeout"
    for key in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean"):
        assert key in lat["ok"] and key in lat["refused"]
    gen = run["generator"]
    assert gen["processes"] == 2 and len(gen["cpu_utilization"]) == 2
    assert isinstance(gen["behind_schedule"], bool) and run["schedule"]["lag_ms"]["count"] == run["scheduled"]
    assert any("asked for tier 'fastest'" in e for e in gen["errors"]), gen["errors"]
    assert "counts: 200:" in report["stdout"] and "refused (429/503)" in report["stdout"]
