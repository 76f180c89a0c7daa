"""The open loop's parts without a network: arrival schedules and the report made from records."""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path

import pytest

from loadtest.arrivals import arrival_offsets
from loadtest.openloop_stats import (
    BAD_BODY,
    CONNECTION_ERROR,
    TIMEOUT,
    Records,
    Window,
    percentiles,
    summarize,
)


def test_constant_schedule_split_over_processes_is_the_whole_schedule() -> None:
    whole = list(arrival_offsets(100, 2.0))
    assert len(whole) == 200 and whole[:3] == [0.0, 0.01, 0.02]
    parts = [list(arrival_offsets(100, 2.0, part=p, parts=3)) for p in range(3)]
    assert sorted(t for part in parts for t in part) == whole
    assert [len(p) for p in parts] == [67, 67, 66]


def test_poisson_schedule_has_the_rate_and_exponential_gaps() -> None:
    parts = [list(arrival_offsets(500, 20.0, "poisson", seed=3, part=p, parts=2)) for p in range(2)]
    merged = sorted(t for part in parts for t in part)
    assert len(merged) == pytest.approx(500 * 20, rel=0.03)
    gaps = [b - a for a, b in itertools.pairwise(merged)]
    assert statistics.mean(gaps) == pytest.approx(1 / 500, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 500, rel=0.1), "exponential: sd == mean"
    assert parts[0] != parts[1] and parts[0] == list(arrival_offsets(500, 20.0, "poisson", 3, 0, 2))


def test_schedule_arguments_are_checked() -> None:
    for kwargs in ({"rate": 0}, {"kind": "burst"}, {"part": 2, "parts": 2}):
        with pytest.raises(ValueError):
            list(arrival_offsets(**{"rate": 1.0, "seconds": 1.0, **kwargs}))


def test_percentiles_interpolate() -> None:
    p = percentiles([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert p["count"] == 100 and p["p50"] == pytest.approx(50.5) and p["max"] == pytest.approx(100)
    assert p["p99"] == pytest.approx(99.01) and p["mean"] == pytest.approx(50.5)
    assert percentiles([]) == {"count": 0}


def records_of(rows: list[tuple[float, float, float, int, int]]) -> Records:
    """(intended, lag, latency, status, tier) rows; service time = latency - lag."""
    r = Records()
    for intended, lag, latency, status, tier in rows:
        r.add(intended, lag, latency, latency - lag if not math.isnan(lag) else math.nan, status, tier)
    return r


def test_report_counts_the_window_and_splits_oks_from_refusals(tmp_path: Path) -> None:
    rows = [
        (0.5, 0.0, 9.0, 503, 0),  # warm-up: sent, not counted
        *[(1.0 + 0.1 * k, 0.001, 0.1 + 0.01 * k, 200, k % 2) for k in range(10)],
        (2.0, 0.002, 0.005, 503, 0),
        (2.1, 0.002, 0.007, 429, 1),
        (2.2, 0.050, 3.0, 504, 0),
        (2.3, 0.001, 30.0, TIMEOUT, 0),
        (2.4, 0.001, 0.001, CONNECTION_ERROR, 1),
        (2.5, 0.001, 0.2, BAD_BODY, 0),
        (2.6, math.nan, 31.0, TIMEOUT, 1),  # never ran: its lag is unknown
        (3.0, 0.0, 0.1, 200, 0),  # after the window
    ]
    records = records_of(rows)
    saved = tmp_path / "records.bin"
    records.save(saved)
    loaded = Records.load(saved, len(records))
    for name in ("intended", "lag", "latency", "service", "status", "tier"):  # bytes: NaN != NaN
        assert getattr(loaded, name).tobytes() == getattr(records, name).tobytes(), name

    r = summarize(records, Window(1.0, 3.0), rate=8.0, tiers=["fast", "exact"], images_per_request=2)
    assert r["scheduled"] == 17 and r["window_s"] == 2.0 and r["offered_rate"] == 8.0
    assert r["counts"] == {
        "200": 10,
        "429": 1,
        "503": 1,
        "504": 1,
        "timeout": 2,
        "connection_error": 1,
        "bad_body": 1,
    }
    assert list(r["counts"]) == ["200", "429", "503", "504", "timeout", "connection_error", "bad_body"]
    assert r["goodput_rps"] == 5.0 and r["goodput_images_per_s"] == 10.0
    assert r["answered_rps"] == 13 / 2.0
    ok, refused = r["latency_ms"]["ok"], r["latency_ms"]["refused"]
    assert ok["count"] == 10 and ok["p50"] == pytest.approx(145) and ok["max"] == pytest.approx(190)
    assert refused["count"] == 2 and refused["max"] == pytest.approx(7)
    assert r["latency_ms"]["by_status"]["504"]["p50"] == pytest.approx(3000)
    assert r["service_latency_ms"]["ok"]["max"] == pytest.approx(189)
    sched = r["schedule"]
    assert sched["lag_ms"]["count"] == 16, "the request that never ran has no lag"
    assert sched["late"] == 1 and sched["lag_ms"]["max"] == pytest.approx(50)
    fast, exact = r["by_tier"]["fast"], r["by_tier"]["exact"]
    assert fast["scheduled"] + exact["scheduled"] == 17
    assert fast["counts"]["200"] == 5 and exact["counts"]["429"] == 1 and fast["goodput_rps"] == 2.5
