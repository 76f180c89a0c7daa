"""tier=auto: batch-time predictions, the choice of tier, hysteresis, and the API around it."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.engine.auto import EWMA_WEIGHT, AutoPolicy, BatchTimes, DecayedMean, faithful_order

from .conftest import image_bytes, metric_value

PNG = image_bytes("PNG")


def test_batch_times_start_from_warm_up_and_follow_live_batches() -> None:
    times = BatchTimes([1, 2, 4, 8], {"exact": {1: 0.010, 8: 0.040}})
    assert times.batch("exact", 1) == 0.010
    assert times.batch("exact", 5) == 0.040  # bucket 8
    assert times.batch("exact", 2) == pytest.approx(0.020)  # nearest measured bucket (1), scaled by size
    assert times.batch("r5", 4) == times.batch("exact", 4)  # no batch yet (a raw ?r=): the slowest known
    assert BatchTimes([1, 2], {}).batch("r5", 2) == 0.0  # nothing measured at all
    times.observe("exact", 8, 0.080)
    assert times.batch("exact", 8) == pytest.approx((1 - EWMA_WEIGHT) * 0.040 + EWMA_WEIGHT * 0.080)
    assert times.drain("exact", 20) == pytest.approx(2 * times.batch("exact", 8) + times.batch("exact", 4))
    assert times.drain("exact", 0) == 0.0


def test_unpadded_partial_batches_stand_for_their_bucket_by_time_per_image() -> None:
    eager = BatchTimes([1, 2, 4, 8], {"exact": {8: 0.040}}, padded=False)
    eager.observe("exact", 5, 0.025)  # 5 ms per image, as the warm-up's full batch of 8
    assert eager.batch("exact", 8) == pytest.approx(0.040)
    graphs = BatchTimes([1, 2, 4, 8], {"exact": {8: 0.040}})  # padded: a batch of 5 ran 8 rows
    graphs.observe("exact", 5, 0.040)
    assert graphs.batch("exact", 8) == pytest.approx(0.040)


def test_auto_takes_the_most_faithful_tier_that_fits() -> None:
    """Fitting means answering within target_share (0.5) of the budget; the floor may use all of it."""
    policy = AutoPolicy(["exact", "fast", "fastest"], hold_s=0, target_share=0.5)
    now = 100.0
    choice = policy.choose({"exact": 100.5, "fast": 100.3, "fastest": 100.2}, deadline=101.0, now=now)
    assert (choice.tier, choice.reason) == ("exact", "fits")
    choice = policy.choose({"exact": 100.8, "fast": 100.4, "fastest": 100.2}, deadline=101.0, now=now)
    assert (choice.tier, choice.reason) == ("fast", "deadline")
    choice = policy.choose({"exact": 101.5, "fast": 100.9, "fastest": 100.7}, deadline=101.0, now=now)
    assert (choice.tier, choice.reason) == ("fastest", "deadline")  # nothing within half: the floor, in time
    choice = policy.choose({"exact": 103, "fast": 102, "fastest": 101.5}, deadline=101.0, now=now)
    assert choice.tier is None and choice.reason == "floor_too_slow"


def test_auto_does_not_flap_back_to_a_faithful_tier_at_once() -> None:
    policy = AutoPolicy(["exact", "fastest"], upgrade_margin=0.5, hold_s=2.0, target_share=1.0)
    assert policy.choose({"exact": 12.0, "fastest": 10.5}, deadline=11.0, now=10.0).tier == "fastest"
    # exact fits again, but only just (0.9 of the 1 s budget): stay degraded, and say why
    choice = policy.choose({"exact": 10.9, "fastest": 10.3}, deadline=11.0, now=10.0)
    assert (choice.tier, choice.reason) == ("fastest", "hold")
    # roomy (0.3 of the budget) but the last change is under hold_s old: stay
    choice = policy.choose({"exact": 11.3, "fastest": 11.1}, deadline=12.0, now=11.0)
    assert (choice.tier, choice.reason) == ("fastest", "hold")
    # roomy and held long enough: back to exact
    choice = policy.choose({"exact": 13.3, "fastest": 13.1}, deadline=14.0, now=13.0)
    assert (choice.tier, choice.reason) == ("exact", "fits")
    # only the floor fits: it serves for the deadline, hysteresis or not
    choice = policy.choose({"exact": 16.0, "fastest": 14.5}, deadline=15.0, now=14.0)
    assert (choice.tier, choice.reason) == ("fastest", "deadline")
    # degrading is never delayed
    assert policy.choose({"exact": 14.5, "fastest": 13.2}, deadline=14.0, now=13.1).tier == "fastest"


def test_auto_moves_back_to_a_roomy_tier_even_when_a_more_faithful_one_only_just_fits() -> None:
    """Degraded to the floor: balanced fits again but only just, fast fits with room to spare and the
    hold has passed, so auto moves back to fast (not kept at the floor for as long as balanced is tight)."""
    policy = AutoPolicy(
        ["exact", "balanced", "fast", "fastest"], upgrade_margin=0.5, hold_s=0, target_share=1.0
    )
    assert (
        policy.choose({"exact": 12, "balanced": 12, "fast": 12, "fastest": 10.5}, 11.0, now=10.0).tier
        == "fastest"
    )
    finish = {"exact": 22.0, "balanced": 20.9, "fast": 20.3, "fastest": 20.2}
    assert policy.choose(finish, deadline=21.0, now=20.0).tier == "fast"


def test_faithful_order_uses_calibration_when_every_tier_has_one() -> None:
    gflops = {"exact": 1.2, "balanced": 0.9, "odd": 0.5, "fastest": 0.6}
    assert faithful_order(gflops, {}) == ["exact", "balanced", "fastest", "odd"]
    agreements = {"exact": 1.0, "balanced": 0.97, "odd": 0.96, "fastest": 0.90}
    assert faithful_order(gflops, agreements) == ["exact", "balanced", "odd", "fastest"]
    assert faithful_order(gflops, {"exact": 1.0}) == [
        "exact",
        "balanced",
        "fastest",
        "odd",
    ]  # partial: GFLOPs


def test_decayed_mean() -> None:
    mean = DecayedMean(half_life_s=10)
    assert math.isnan(mean.mean)
    mean.add(1.0, now=0)
    mean.add(0.0, now=10)  # the first value has half its weight by now
    assert mean.mean == pytest.approx(0.5 / 1.5)


def test_auto_at_low_load_serves_the_most_faithful_tier(make_client) -> None:
    c = make_client()
    r = c.post("/classify?tier=auto", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tier"] == "exact" and body["auto_reason"] == "fits" and body["r_per_block"] == [0, 0]
    text = c.get("/metrics").text
    assert (
        metric_value(text, "tome_auto_tier_total", {"model": "tiny", "tier": "exact", "reason": "fits"}) == 1
    )


def test_auto_refuses_at_once_what_even_the_floor_cannot_meet(make_client) -> None:
    """A deadline shorter than the batch-closing wait alone: 503 with Retry-After immediately, never a 504
    after waiting, and nothing runs."""
    c = make_client(batching={"max_batch_size": 8, "max_wait_ms": 50, "max_queue_size": 64})
    before = metric_value(c.get("/metrics").text, "tome_images_total")
    start = time.monotonic()
    r = c.post(
        "/classify?tier=auto", content=PNG, headers={"content-type": "image/png", "X-Deadline-Ms": "10"}
    )
    assert time.monotonic() - start < 0.5
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"]
    text = c.get("/metrics").text
    assert metric_value(text, "tome_auto_tier_total", {"tier": "none", "reason": "floor_too_slow"}) == 1
    assert metric_value(text, "tome_images_total") == before


def test_auto_refuses_a_request_larger_than_its_queue_share_as_a_bad_request(make_client) -> None:
    """auto admits images while a queue holds under max_queue_share of max_queue_size: a request with more
    images than that could never run at tier=auto, so it is a 400 that says why (not a 503 to retry);
    the same request naming a tier is served, and a smaller one at auto too."""
    c = make_client(batching={"max_batch_size": 8, "max_wait_ms": 2, "max_queue_size": 4})  # auto: 2
    files = [("file", (f"{i}.png", PNG, "image/png")) for i in range(3)]
    r = c.post("/classify?tier=auto", files=files)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
    assert "at most 2 images" in r.json()["error"]["message"]
    assert c.post("/classify?tier=exact", files=files).status_code == 200
    assert c.post("/classify?tier=auto", files=files[:2]).status_code == 200


def test_auto_can_be_the_default_tier(make_client) -> None:
    from .conftest import TINY_MODEL

    c = make_client(models=[{**TINY_MODEL, "default_tier": "auto"}])
    r = c.post("/classify", content=PNG, headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["auto_reason"] in ("fits", "deadline")
    tiers = c.get("/tiers").json()["tiny"]
    assert tiers["default_tier"] == "auto"
    auto = tiers["auto"]  # what auto may choose, down to its floor (the fastest tier by default)
    assert set(auto["tiers"]) == {t["name"] for t in tiers["tiers"]} and auto["tiers"][0] == "exact"
    assert auto["latency_objective_ms"] == 1000 and auto["max_queue_share"] == 0.5


def test_auto_counts_no_decision_for_a_request_refused_while_draining(make_client) -> None:
    """A draining engine refuses an auto request before choosing its tier: neither
    ``tome_auto_tier_total`` nor auto's effective agreement counts a request that never runs."""
    c = make_client()
    replies: list[object] = []
    c.engine.draining = True  # as begin_drain sets it, without telling the front-end
    try:
        c.engine.submit(999, 1, "tiny", "auto", time.monotonic() + 10, 1, [0], replies.append)
    finally:
        c.engine.draining = False
    assert [(r.code, r.request_id) for r in replies] == [("draining", 1)]  # type: ignore[attr-defined]
    assert metric_value(c.get("/metrics").text, "tome_auto_tier_total") == 0


def test_auto_refuses_a_deadline_passed_before_it_reaches_the_engine_with_a_503(
    make_client, monkeypatch
) -> None:
    """X-Deadline-Ms: 1 is spent reading and decoding the image: the engine refuses it at once (the floor
    cannot make it), and the front-end relays that 503 instead of giving up on the deadline with a 504;
    a request that named its tier still gets its 504."""
    from service.api.routes import classify

    def passed(*args: object, **kwargs: object) -> float:
        return time.monotonic() - 0.001  # as if decoding took longer than the client's X-Deadline-Ms

    monkeypatch.setattr(classify, "deadline", passed)
    c = make_client()
    r = c.post(
        "/classify?tier=auto", content=PNG, headers={"content-type": "image/png", "X-Deadline-Ms": "1"}
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"]
    text = c.get("/metrics").text
    assert metric_value(text, "tome_auto_tier_total", {"tier": "none", "reason": "floor_too_slow"}) == 1
    r = c.post(
        "/classify?tier=exact", content=PNG, headers={"content-type": "image/png", "X-Deadline-Ms": "1"}
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline"


def test_auto_meets_the_clients_deadline_not_the_objective_when_it_sends_one(make_client) -> None:
    """``auto.latency_objective_ms`` is auto's deadline only for a request without X-Deadline-Ms: one that
    sends a longer one is served within it, not refused against the objective."""
    from .conftest import TINY_MODEL

    c = make_client(
        models=[{**TINY_MODEL, "auto": {"latency_objective_ms": 100}}],
        batching={"max_batch_size": 8, "max_wait_ms": 200, "max_queue_size": 64},  # >= 240 ms predicted
    )
    headers = {"content-type": "image/png"}
    r = c.post("/classify?tier=auto", content=PNG, headers=headers)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"  # the objective: 100 ms
    r = c.post("/classify?tier=auto", content=PNG, headers={**headers, "X-Deadline-Ms": "5000"})
    assert r.status_code == 200 and r.json()["auto_reason"] == "fits", r.text


def test_an_auto_flood_leaves_a_front_ends_slots_to_requests_that_name_their_tier(make_client) -> None:
    """auto.max_queue_share kept room in the engine's queues, but a front-end's slots were first come
    first served: 4 queued auto requests took all 4 and a tier=exact request got 503 "too many images
    decoding or queued on this worker" although the engine would have taken it."""
    c = make_client(
        batching={"max_batch_size": 8, "max_wait_ms": 1500, "max_queue_size": 16},
        server={"max_scrapes_per_s": 0, "max_pending_images": 4},
    )
    png = {"content-type": "image/png", "X-Deadline-Ms": "10000"}  # time to wait for the batch
    with ThreadPoolExecutor(4) as pool:  # they wait in their queue for max_wait_ms, holding their slots
        autos = [pool.submit(c.post, "/classify?tier=auto", content=PNG, headers=png) for _ in range(4)]
        time.sleep(0.5)
        exact = c.post("/classify?tier=exact", content=PNG, headers=png)
        statuses = sorted(f.result().status_code for f in autos)
    assert exact.status_code == 200, exact.text
    assert statuses == [200, 200, 503, 503]  # auto may hold half of the 4 slots (max_queue_share 0.5)
    files = [("file", ("a.png", PNG, "image/png"))] * 3
    r = c.post("/classify?tier=auto", files=files, headers={"X-Deadline-Ms": "10000"})
    assert r.status_code == 400 and "at most 2 images" in r.json()["error"]["message"], r.text
    assert c.post("/classify?tier=exact", files=files).status_code == 200
