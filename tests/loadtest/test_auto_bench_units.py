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


def _metrics(refused: int, floor_busy_s: float, floor_images: float, queued: float) -> list:
    labels = {"model": "vit-ti", "tier": "floor"}
    return [
        ("tome_batch_duration_seconds_sum", labels, floor_busy_s),
        ("tome_batch_duration_seconds_count", labels, floor_images / 16),
        ("tome_images_total", labels, floor_images),
        ("tome_images_total", {"model": "vit-ti", "tier": "exact"}, 40.0),  # ran before: no time of its own
        ("tome_queue_depth", labels, queued),
        ("tome_queue_depth", {"model": "vit-ti", "tier": "exact"}, 0.0),
        ("tome_auto_tier_total", {"model": "vit-ti", "tier": "floor", "reason": "deadline"}, floor_images),
        ("tome_requests_total", {"model": "vit-ti", "tier": "auto", "status": "503"}, refused // 2),
        ("tome_requests_total", {"model": "vit-ti", "tier": "auto", "status": "504"}, refused - refused // 2),
        ("tome_requests_total", {"model": "vit-ti", "tier": "auto", "status": "200"}, floor_images),
    ]


def test_a_timeline_point_reads_the_backlog_batch_time_and_refusals_of_its_interval() -> None:
    start = _metrics(refused=5, floor_busy_s=10.0, floor_images=800, queued=0)
    before = _metrics(refused=5, floor_busy_s=12.0, floor_images=900, queued=300)
    now = _metrics(refused=12, floor_busy_s=14.5, floor_images=1000, queued=583)
    point = auto_bench.timeline_point(6.04, start, before, now)
    assert point == {"t": 6.0, "queued": {"floor": 583}, "ms_per_image": {"floor": 25.0}, "refused": 7}


def test_the_summary_reads_the_first_refusal_against_the_floors_batch_times() -> None:
    rnd = _round(7)
    points = [
        {"t": 2.0, "queued": {"floor": 100}, "ms_per_image": {"floor": 20.0}, "refused": 0},
        {"t": 4.0, "queued": {"floor": 400, "balanced": 56}, "ms_per_image": {"floor": 31.5}, "refused": 3},
        {"t": 6.0, "queued": {"floor": 300}, "ms_per_image": {"floor": 21.0}, "refused": 7},
    ]
    rnd["phases"][1]["timeline"] = points
    line = summary([rnd, _round(0)]).splitlines()[0]
    assert "[first refusal by 4 s: queued floor 400, balanced 56; floor 31.5 ms/image then, 21 the" in line
    assert auto_bench.first_refusal(points[:1], "floor") is None  # no refusal, nothing to read


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


def test_cpu_per_image_divides_each_part_and_the_rest_of_the_host_by_the_images_served() -> None:
    parts = {"engine other threads": 10.0, "front-end other threads": 2.0, "other processes": 0.0}
    cpu = auto_bench.cpu_per_image(parts, host_busy_s=15.0, images=1000, seconds=10.0)
    assert cpu["host_busy_cores"] == 1.5
    assert cpu["ms_per_image"] == {
        "engine other threads": 10.0,
        "front-end other threads": 2.0,
        "other processes": 0.0,
        "rest of host": 3.0,  # busy, but not in the service's tree
        "host": 15.0,
    }
    line = auto_bench.cpu_text(cpu)
    assert line.startswith("host 15 ms of CPU per image (1.5 cores busy): engine other threads 10, ")
    assert "other processes" not in line, "a part that cost nothing is left out"
    assert (
        auto_bench.cpu_text(auto_bench.cpu_per_image(parts, 1.0, images=0, seconds=1.0)) == "no image served"
    )
