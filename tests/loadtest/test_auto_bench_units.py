"""``loadtest.auto_bench``'s per-round summary and its capacity window (the server runs are BENCHMARKS.md's,
not tests)."""

from __future__ import annotations

import http.server
import random
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest

from loadtest import auto_bench
from loadtest.auto_bench import summary


def _round(auto_refused: int) -> dict:
    return {
        "capacity_rps": 36.8,
        "capacity_after_rps": 40.0,
        "phases": [
            {
                "tier": "exact",
                "load": 2.0,
                "load_vs_mean_capacity": 1.92,
                "counts": {"200": 5, "504": 3},
                "refused": 3,
            },
            {
                "tier": "auto",
                "load": 2.0,
                "load_vs_mean_capacity": 1.92,
                "counts": {"200": 9, "503": auto_refused},
                "refused": auto_refused,
                "auto_tier_mix": {"exact": 3.0, "floor": 6.0},
                "effective_agreement_calibrated": 0.75,
            },
            {
                "tier": "auto",
                "load": 0.5,
                "load_vs_mean_capacity": 0.48,
                "counts": {"200": 4},
                "refused": 0,
                "auto_tier_mix": {"exact": 4.0},
                "effective_agreement_calibrated": 1.0,
            },
        ],
    }


def test_the_summary_counts_rounds_whose_overloaded_auto_phase_refused_nothing() -> None:
    text = summary([_round(0), _round(7), _round(0)])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("round 1: capacity 36.8 req/s before, 40.0 after")
    assert "2x exact (1.92x their mean): 5 served, 3 refused" in lines[0]
    assert "2x auto (1.92x their mean): 9 served, 0 refused (33% at exact, agreement 75.0%)" in lines[0]
    assert "0.5x auto (0.48x their mean): 4 served, 0 refused (100% at exact" in lines[0]
    assert "2x auto (1.92x their mean): 9 served, 7 refused" in lines[1]
    # the light phase refused nothing in every round; only the overloaded one counts
    assert lines[-1] == "rounds whose overloaded auto phase refused nothing: 2 of 3"


LATENCY_S = (0.3, 0.6)  # uniform: the clients' answers do not come in step
SLACK_S = 0.1  # for the moments capacity() takes its window's start, and for delivery


class _SlowClassify(http.server.BaseHTTPRequestHandler):
    """Answers every POST 200 after a random LATENCY_S on keep-alive connections, noting when each
    answer left."""

    protocol_version = "HTTP/1.1"
    answered: ClassVar[list[float]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        time.sleep(random.uniform(*LATENCY_S))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
        self.answered.append(time.monotonic())

    def log_message(self, *args: object) -> None:
        pass


def test_capacity_counts_only_the_completions_inside_its_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate is the answers inside the window over its length. Each client has one request in flight
    when the window closes; it completes up to 0.6 s after it and must not be counted (8 clients over
    a 1 s window: it read 8 req/s too many)."""
    (tmp_path / "photo.JPEG").write_bytes(b"\xff\xd8 not decoded by this server")
    monkeypatch.setattr(auto_bench, "DEFAULT_IMAGES_DIR", tmp_path)
    answered: ClassVar[list[float]] = []
    handler = type("Handler", (_SlowClassify,), {"answered": answered})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        called = time.monotonic()
        rate = auto_bench.capacity(url, 1.0, clients=8, ramp=0.3)
    finally:
        server.shutdown()
        server.server_close()
    window = (called + 0.3 - SLACK_S, called + 0.3 + 1.0 + SLACK_S)
    inside = sum(1 for t in answered if window[0] <= t <= window[1])
    assert 0 < rate * 1.0 <= inside
