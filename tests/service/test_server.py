"""The real server process (``python -m service.cli``) under concurrent load from several clients."""

from __future__ import annotations

import io
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from timm.data import create_transform

from models import tome
from tests.processes import serving

from .conftest import image_bytes, metric_value


def _config(tmp_path: Path, weights: str, img_size: int, depth: int, batching: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        f"""
device = "cpu"
[[models]]
name = "tiny"
timm_name = "vit_tiny_patch16_224"
weights = "{weights}"
model_kwargs = {{ img_size = {img_size}, depth = {depth} }}
[batching]
{batching}
[limits]
deadline_ms = 30000
max_files = 2
"""
    )
    return path


@contextmanager
def server(config: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the CLI on a free loopback port, wait for /readyz, always stop it."""
    with serving(config, tmp_path / "server.log", timeout_s=90) as (url, _, proc):
        yield url, proc


def _post(
    url: str, data: bytes, tier: str, top_k: int = 5, client: httpx.Client | None = None
) -> httpx.Response:
    return (client or httpx).post(
        f"{url}/classify",
        params={"tier": tier, "top_k": top_k},
        content=data,
        headers={"content-type": "image/png"},
        timeout=60,
    )


def _images(n: int) -> list[bytes]:
    return [image_bytes("PNG", size=(70 + 9 * i, 50 + 5 * i)) for i in range(n)]


def _idle_cpu_cores(url: str, seconds: float = 2.0) -> float:
    """Cores all the server's processes use while no request arrives (tome_process_cpu_seconds_total)."""
    time.sleep(0.5)  # let the last responses' work finish
    before = metric_value(httpx.get(f"{url}/metrics").text, "tome_process_cpu_seconds_total")
    time.sleep(seconds)
    after = metric_value(httpx.get(f"{url}/metrics").text, "tome_process_cpu_seconds_total")
    return (after - before) / seconds


def test_concurrent_requests_run_in_batches_and_equal_the_direct_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    safetensors.torch.save_file(vit.state_dict(), tmp_path / "w.safetensors")
    config = _config(tmp_path, str(tmp_path / "w.safetensors"), 64, 2, "max_batch_size = 8\nmax_wait_ms = 30")
    images = _images(6)
    with server(config, tmp_path) as (url, _):
        tiers = {t["name"]: t for t in httpx.get(f"{url}/tiers").json()["tiny"]["tiers"]}
        jobs = [(tier, i) for tier in tiers for i in range(len(images))] * 2
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda job: _post(url, images[job[1]], job[0]), jobs))
        metrics = httpx.get(f"{url}/metrics").text
        idle_cores = _idle_cpu_cores(url)

    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert max(r.json()["batch_size"] for r in responses) > 1
    batches = metric_value(metrics, "tome_batch_size_count")
    assert metric_value(metrics, "tome_images_total") == len(jobs)
    assert batches < len(jobs)  # so some batch held more than one image
    assert metric_value(metrics, "tome_batch_size_bucket", {"le": "1.0"}) < batches
    # an idle replica sleeps: no OpenMP worker spins a core waiting for the next batch
    assert idle_cores < 0.2, f"idle server used {idle_cores:.2f} cores"

    model = tome.patch(vit)
    config = timm.data.resolve_data_config(model=vit)
    config["input_size"] = (3, 64, 64)
    transform = create_transform(**config)
    r_of = {"exact": 0, "balanced": 4, "fast": 6, "fastest": 8}
    for (tier, i), response in zip(jobs, responses, strict=True):
        body = response.json()
        assert body["tier"] == tier and tiers[tier]["r_per_block"] == body["r_per_block"]
        x = transform(Image.open(io.BytesIO(images[i])).convert("RGB"))[None]
        with torch.inference_mode():
            probs = model(x, r=r_of[tier]).softmax(-1)[0]
        scores, indices = probs.topk(5)
        assert [p["index"] for p in body["top_k"]] == indices.tolist()
        assert [p["score"] for p in body["top_k"]] == pytest.approx(scores.tolist(), abs=1e-5)


def test_full_queue_gives_503_while_accepted_requests_succeed(tmp_path: Path) -> None:
    config = _config(
        tmp_path, "random", 224, 4, "max_batch_size = 1\nmax_wait_ms = 0\nmax_queue_size = 2\nwarmup = false"
    )
    data = _images(1)[0]
    with server(config, tmp_path) as (url, _):
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda _: _post(url, data, "exact"), range(48)))
        metrics = httpx.get(f"{url}/metrics").text
        assert _post(url, data, "exact").status_code == 200  # still serving afterwards

    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503}, codes
    full = [r for r in responses if r.status_code == 503]
    assert all(r.json()["error"]["code"] == "queue_full" and r.headers["Retry-After"] for r in full)
    assert all(len(r.json()["top_k"]) == 5 for r in responses if r.status_code == 200)
    assert metric_value(metrics, "tome_rejections_total", {"reason": "queue_full"}) == len(full)
    assert metric_value(metrics, "tome_requests_total", {"status": "503"}) == len(full)


def test_sigterm_during_load_answers_every_accepted_request(tmp_path: Path) -> None:
    config = _config(tmp_path, "random", 224, 4, "max_batch_size = 2\nmax_wait_ms = 5\nwarmup = false")
    data = _images(1)[0]
    n = 32
    # One client for the load, one for the probes: a fresh httpx.post builds an SSL context (~44 ms of
    # this host's CPU), which spread the 32 requests out until the first could be answered before the
    # last was sent, and each probe took as long as a batch.
    load = httpx.Client(limits=httpx.Limits(max_connections=n), timeout=60)
    probe = httpx.Client()
    with server(config, tmp_path) as (url, proc), ThreadPoolExecutor(n) as pool, load, probe:
        futures = [pool.submit(_post, url, data, "exact", client=load) for _ in range(n)]
        deadline = time.monotonic() + 30
        while True:  # wait until every request has been accepted (answered or in flight)
            text = probe.get(f"{url}/metrics").text
            in_flight = metric_value(text, "tome_in_flight_requests")
            if metric_value(text, "tome_requests_total") + in_flight >= n:
                break
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        try:  # while draining: not ready within a probe's second, no new work (or already gone)
            until = time.monotonic() + 1.0
            while (ready := probe.get(f"{url}/readyz", timeout=5).status_code) == 200:
                if time.monotonic() > until:
                    break
                time.sleep(0.01)
            late = _post(url, data, "exact").status_code
        except httpx.TransportError:
            ready = late = 503
        responses = [f.result() for f in futures]
        assert proc.wait(30) == 0
    assert in_flight > 0, "the signal came after the load was over; the test proved nothing"
    assert ready == 503 and late == 503
    assert [r.status_code for r in responses] == [200] * n
    assert all(len(r.json()["top_k"]) == 5 for r in responses)


def test_request_whose_client_left_before_its_batch_is_not_run(tmp_path: Path) -> None:
    config = _config(tmp_path, "random", 224, 4, "max_batch_size = 1\nmax_wait_ms = 0\nwarmup = false")
    data = _images(1)[0]
    n = 64  # one image per batch: the queue outlasts the clients' 0.2 s patience, so some must leave

    def impatient(_: int) -> bool:
        try:
            httpx.post(f"{url}/classify", content=data, headers={"content-type": "image/png"}, timeout=0.2)
            return True
        except httpx.TimeoutException:
            return False  # the client closes its connection and goes away

    with server(config, tmp_path) as (url, _):
        with ThreadPoolExecutor(n) as pool:
            answered = list(pool.map(impatient, range(n)))
        deadline = time.monotonic() + 30
        while metric_value(text := httpx.get(f"{url}/metrics").text, "tome_in_flight_requests") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _post(url, data, "exact").status_code == 200  # still serving
    assert answered.count(False) > 0
    assert metric_value(text, "tome_images_total") < n  # queued work of departed clients was skipped
    assert 0 < metric_value(text, "tome_requests_total", {"status": "499"}) <= answered.count(False)
