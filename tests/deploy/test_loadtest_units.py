"""The load test's parts: tier mix, response checks, image pool, locust and /metrics summaries."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loadtest.report import batch_sizes, batch_sizes_delta, format_summary, read_summary
from loadtest.validate import check_classify_response
from loadtest.workload import Workload, generated_images, load_images, parse_tier_mix


def test_parse_tier_mix() -> None:
    assert parse_tier_mix("fast=3,exact=1") == {"fast": 3.0, "exact": 1.0}
    assert parse_tier_mix("balanced") == {"balanced": 1.0}
    for bad in ("", "fast=0", "fast=x", "=2", "fast=1,fast=2"):
        with pytest.raises(ValueError):
            parse_tier_mix(bad)


def test_tier_choice_follows_weights() -> None:
    import random

    w = Workload(tiers={"fast": 3, "exact": 1}, images=generated_images(1))
    rng = random.Random(1)
    picks = [w.pick_tier(rng) for _ in range(4000)]
    assert 0.70 < picks.count("fast") / len(picks) < 0.80


def prediction(i: int) -> dict[str, object]:
    return {"label": f"class {i}", "index": i, "score": 0.1}


def test_response_checks() -> None:
    single = {"request_id": "r", "tier": "fast", "top_k": [prediction(1), prediction(2)], "batch_size": 3}
    assert check_classify_response(single, "fast", 1, 2) is None
    assert "tier" in (check_classify_response(single, "exact", 1, 2) or "")
    assert "auto" in (check_classify_response(single, "auto", 1, 2) or "")  # no reason given
    assert check_classify_response({**single, "auto_reason": "deadline"}, "auto", 1, 2) is None
    assert "predictions" in (check_classify_response(single, "fast", 1, 3) or "")
    assert check_classify_response([single], "fast", 1, 2) is not None
    assert check_classify_response({**single, "batch_size": 0}, "fast", 1, 2) is not None
    bad_score = {**single, "top_k": [prediction(1), {**prediction(2), "score": 1.5}]}
    assert "malformed" in (check_classify_response(bad_score, "fast", 1, 2) or "")

    result = {"top_k": [prediction(3)], "batch_size": 2}
    multi = {"request_id": "r", "tier": "exact", "results": [result, result]}
    assert check_classify_response(multi, "exact", 2, 1) is None
    assert check_classify_response(multi, "exact", 3, 1) is not None
    failed = {**multi, "results": [result, {"error": {"code": "bad_image", "message": "x"}}]}
    assert "failed" in (check_classify_response(failed, "exact", 2, 1) or "")


def test_images_from_a_directory_or_generated(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "b.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    found = load_images(tmp_path)
    assert [(f.name, f.content_type) for f in found] == [("a.jpg", "image/jpeg"), ("b.png", "image/png")]

    fallback = load_images(tmp_path / "missing")
    assert len(fallback) > 1 and all(f.name.startswith("generated-") for f in fallback)
    assert fallback == load_images(None), "generated images are deterministic"
    with Image.open(io.BytesIO(fallback[0].data)) as img:
        assert img.format == "JPEG" and img.size == (320, 240)


# Run in a child: importing locust monkey-patches the whole process with gevent.
LOCUST_STATS_SCRIPT = """
import json, sys
from locust.stats import RequestStats
from loadtest.report import REJECTED, final_stats
stats = RequestStats()
for ms in (10, 20, 30, 40):
    stats.log_request("POST", "/classify [fast]", ms, 100)
stats.log_error("POST", "/classify [fast]", "boom")
stats.log_request("POST", "/classify [exact]", 100, 100)
stats.log_request(REJECTED, "/classify [exact]", 1, 10)
stats.log_request(REJECTED, "/classify [exact]", 1, 10)
stats.log_request("GET", "/other", 5, 5)
open(sys.argv[1], "w").write(json.dumps(final_stats(stats)))
"""


def test_summary_from_locust_stats(tmp_path: Path, repo_root: Path) -> None:
    path = tmp_path / "summary.json"
    subprocess.run([sys.executable, "-c", LOCUST_STATS_SCRIPT, str(path)], cwd=repo_root, check=True)

    tiers = read_summary(path)
    assert set(tiers) == {"fast", "exact"}
    fast, exact = tiers["fast"], tiers["exact"]
    assert (fast.requests, fast.failures, fast.rejections) == (4, 1, 0)
    assert fast.failure_rate() == pytest.approx(0.25)
    assert 10 <= fast.p50_ms <= 40 and fast.p99_ms >= fast.p50_ms
    assert (exact.requests, exact.failures, exact.rejections) == (1, 0, 2)
    assert exact.rejection_rate() == pytest.approx(2 / 3)
    text = format_summary(tiers, 2, {})
    assert "fast" in text and "exact" in text and "(no batches recorded)" in text


def exposition(observations: dict[str, list[int]]) -> str:
    registry = CollectorRegistry()
    h = Histogram("tome_batch_size", "", ["model", "tier"], buckets=(1, 2, 4, 8), registry=registry)
    for tier, sizes in observations.items():
        for size in sizes:
            h.labels(model="m", tier=tier).observe(size)
    return generate_latest(registry).decode()


def test_batch_size_distribution_between_two_scrapes() -> None:
    before = batch_sizes(exposition({"fast": [1, 1], "exact": [2]}))
    after = batch_sizes(exposition({"fast": [1, 1, 1, 3, 4, 8], "exact": [2]}))
    delta = batch_sizes_delta(before, after)
    assert set(delta) == {("m", "fast")}, "a tier with no new batches is left out"
    fast = delta[("m", "fast")]
    assert fast.batches == 4 and fast.images == 16 and fast.mean() == 4
    assert fast.per_bucket() == [("1", 1), ("2", 0), ("3-4", 2), ("5-8", 1), (">8", 0)]
