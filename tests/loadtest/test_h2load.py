"""h2load's open-loop schedule and per-request log, read back; a real run where h2load is installed."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import h2load

SUMMARY = """\
finished in 19.80s, 988.35 req/s, 477.07KB/s
                     min         max         mean         sd        +/- sd
time for request:      644us       2.37s    633.60ms    612.98ms    69.53%
time for connect:       34us     20.45ms       237us       494us    99.13%
"""


@pytest.mark.parametrize("rate", [5.0, 50.0, 337.0, 489.0, 978.0, 1209.8, 3000.0])
def test_schedule_is_within_two_percent_in_small_bursts(rate: float) -> None:
    per, period_ms = h2load.schedule(rate)
    assert abs(per * 1000 / period_ms - rate) / rate <= 0.02
    assert per <= h2load.MAX_CONNECTIONS_PER_PERIOD and period_ms >= 1


def test_log_and_summary_are_read_in_seconds_and_ms() -> None:
    rows = h2load.parse_log("1795426017819412\t200\t2707\n1795426017830013\t503\t2194000\nnoise\n")
    assert rows == [(1795426017.819412, 200, 0.002707), (1795426017.830013, 503, 2.194)]
    assert h2load._summary_ms(SUMMARY, "time for connect") == pytest.approx(
        {"min": 0.034, "max": 20.45, "mean": 0.237}
    )
    assert h2load._summary_ms(SUMMARY, "time for request")["max"] == 2370.0  # type: ignore[index]
    assert h2load._summary_ms(SUMMARY, "time to 1st byte") is None


class _Server(http.server.ThreadingHTTPServer):
    """h2load opens a connection per request: socketserver's default listen backlog of 5 overflows in a
    50 ms stall of the accept loop, and the kernel retries a dropped connect ~1 s later, moving requests
    out of the window they were scheduled in."""

    request_queue_size = 512


class _Teapot(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(418 if self.path.endswith("tea") else 200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def teapot() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Teapot)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(not h2load.available(), reason="h2load is not installed (nghttp2-client)")
def test_a_real_run_counts_every_answer_in_its_window(teapot: str, tmp_path: Path) -> None:
    body = tmp_path / "body.bin"
    body.write_bytes(b"x" * 1000)
    run = h2load.run(f"{teapot}/ok", body, "image/jpeg", rate=100, seconds=1.0, warmup=0.5, timeout=5)
    assert run["offered_rate"] == pytest.approx(100, rel=0.02)
    assert set(run["counts"]) == {"200"} and 90 <= run["counts"]["200"] <= 110
    assert run["goodput_rps"] == pytest.approx(100, rel=0.1)
    assert run["latency_ms"]["ok"]["count"] == run["counts"]["200"]
    teas = h2load.run(f"{teapot}/tea", body, "image/jpeg", rate=50, seconds=0.5, warmup=0, timeout=5)
    assert set(teas["counts"]) == {"418"} and teas["goodput_rps"] == 0


class _Overloaded(http.server.BaseHTTPRequestHandler):
    """Every other request refused at once (503), the rest answered 504 after 0.3 s (a deadline)."""

    answered = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        type(self).answered += 1
        late = type(self).answered % 2 == 0
        if late:
            time.sleep(0.3)
        self.send_response(504 if late else 503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.skipif(not h2load.available(), reason="h2load is not installed (nghttp2-client)")
def test_refusals_are_the_same_statuses_as_openloops_and_504s_stay_apart(tmp_path: Path) -> None:
    """``latency_ms.refused`` means what loadtest.openloop's does (429/503: sent back at once); a 504
    is a deadline that passed while queued, and mixing it in reads as slow refusals."""
    server = _Server(("127.0.0.1", 0), _Overloaded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = tmp_path / "body.bin"
    body.write_bytes(b"x" * 1000)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/classify"
        run = h2load.run(url, body, "image/jpeg", rate=40, seconds=0.5, warmup=0, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    counts, latency = run["counts"], run["latency_ms"]
    assert set(counts) == {"503", "504"}
    assert latency["refused"]["count"] == counts["503"]
    # Refusals come back at once, 504s only after 0.3 s: a refusal under that is no 504 counted in, with
    # room for a stall of a loaded host (the median shows they are immediate).
    assert latency["refused"]["p50"] < 100 and latency["refused"]["max"] < 300
    assert latency["by_status"]["504"]["count"] == counts["504"]
    assert latency["by_status"]["504"]["p50"] >= 300
