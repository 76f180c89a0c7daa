"""The service's processes against the real CLI: supervisor, engine and front-ends, and what each one's
death or overload does to the others."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from loadtest import openloop
from tests.processes import free_port, read_response, serving

from .conftest import image_bytes, metric_value

REPO = Path(__file__).resolve().parents[2]
PNG = image_bytes("PNG", size=(90, 70))


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        'device = "cpu"\n[[models]]\nname = "tiny"\ntimm_name = "vit_tiny_patch16_224"\nweights = "random"\n'
        + body
    )
    return path


@contextmanager
def serve(tmp_path: Path, body: str, ready_path: str = "/readyz") -> Iterator[tuple[str, subprocess.Popen]]:
    with serving(_config(tmp_path, body), tmp_path / "server.log", 120, ready_path) as (url, _, proc):
        yield url, proc


def roles(
    supervisor_pid: int, wait_for: tuple[str, ...] = ("engine", "frontend-0"), timeout: float = 30
) -> dict[str, int]:
    """role -> pid, from the run directory the supervisor registered itself in.

    /readyz answers as soon as *one* front-end serves, so the others may still be starting: wait until
    every role in ``wait_for`` has registered."""
    deadline = time.monotonic() + timeout
    while True:
        for pids in Path("/dev/shm").glob("tome-serve-*/pids"):
            if (pids / "supervisor").is_file() and int((pids / "supervisor").read_text()) == supervisor_pid:
                found = {p.name: int(p.read_text()) for p in pids.iterdir() if p.read_text()}
                if all(role in found for role in wait_for) or time.monotonic() > deadline:
                    return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no run directory of supervisor {supervisor_pid}")
        time.sleep(0.05)


def post(url: str, timeout: float = 60, tier: str | None = None, **headers: str) -> httpx.Response:
    params = {"tier": tier} if tier else None
    headers = {"content-type": "image/png", **headers}
    return httpx.post(f"{url}/classify", content=PNG, params=params, headers=headers, timeout=timeout)


def test_front_ends_import_no_torch() -> None:
    code = "import sys, service.cli, service.lifecycle.frontend_process; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_killed_front_end_is_replaced_and_the_engine_keeps_serving(tmp_path: Path) -> None:
    slow = (
        "model_kwargs = { img_size = 224, depth = 4 }\n[server]\nworkers = 2\n[batching]\nmax_batch_size = 1"
    )
    with serve(tmp_path, slow + "\n") as (url, proc):
        before = roles(proc.pid, ("engine", "frontend-0", "frontend-1"))
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(post, url) for _ in range(32)]
            time.sleep(0.5)  # requests are queued on both front-ends
            os.kill(before["frontend-0"], signal.SIGKILL)
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result().status_code)
                except httpx.TransportError:
                    outcomes.append("reset")  # the killed front-end's own clients
        assert 200 in outcomes, outcomes
        deadline = time.monotonic() + 30
        while roles(proc.pid).get("frontend-0") == before["frontend-0"]:
            assert time.monotonic() < deadline, "the killed front-end was not started again"
            time.sleep(0.1)
        after = roles(proc.pid)
        assert after["engine"] == before["engine"] and psutil.pid_exists(after["engine"])
        assert psutil.Process(after["frontend-0"]).is_running()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/readyz").status_code != 200:  # the new front-end finishes starting
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert all(post(url).status_code == 200 for _ in range(8))
        assert proc.poll() is None


def test_engine_death_fails_requests_fast_and_ends_the_service(tmp_path: Path) -> None:
    held = (
        "model_kwargs = { img_size = 64, depth = 2 }\n[server]\nworkers = 1\n[batching]\nmax_wait_ms = 3000"
    )
    with serve(tmp_path, held + "\n") as (url, proc):  # every batch waits 3 s to fill: requests are queued
        engine = roles(proc.pid)["engine"]
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, url) for _ in range(8)]
            time.sleep(0.5)
            killed = time.monotonic()
            os.kill(engine, signal.SIGKILL)
            statuses = []
            for f in futures:
                try:
                    r = f.result()
                    statuses.append(
                        (r.status_code, r.json()["error"]["code"] if r.status_code != 200 else "")
                    )
                except httpx.TransportError:
                    statuses.append(("closed", ""))
            answered_within = time.monotonic() - killed
        try:
            ready = httpx.get(f"{url}/readyz", timeout=2).status_code
        except httpx.TransportError:
            ready = None  # already gone
        assert proc.wait(20) == 1, "the supervisor ends the service when its engine dies"
    assert answered_within < 5, "requests waiting on a dead engine must not hang"
    assert (503, "engine_down") in statuses, statuses
    assert ready in (503, None)


def test_admission_refuses_before_reading_the_body(tmp_path: Path) -> None:
    """server.max_requests counts requests from the moment they are admitted; past it a request gets
    503 at once, while its body is still unsent."""
    body = "model_kwargs = { img_size = 64, depth = 2 }\n[server]\nworkers = 1\nmax_requests = 2\n"
    with serve(tmp_path, body) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        head = (
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        )
        holders = []
        for _ in range(2):  # two uploads that send their headers and a few bytes, then stall
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head)
            s.sendall(b"\x89PNG")
            holders.append(s)
        deadline = time.monotonic() + 10  # well within the body timeout (30 s): they stay admitted
        while (in_flight := metric_value(httpx.get(f"{url}/metrics").text, "tome_in_flight_requests")) < 2:
            assert time.monotonic() < deadline, in_flight
            time.sleep(0.05)
        assert in_flight == 2
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as s:  # headers only: no body ever comes
            s.sendall(head)
            reply = read_response(s, 5)
        assert time.monotonic() - start < 4.0  # not after a body that never comes (30 s body timeout)
        assert reply.startswith("HTTP/1.1 503") and '"overloaded"' in reply and "retry-after" in reply.lower()
        for s in holders:
            s.close()
        deadline = time.monotonic() + 10
        while post(url).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_the_probe_port_answers_health_probes_beside_the_main_port(tmp_path: Path) -> None:
    probe = free_port()
    body = f"model_kwargs = {{ img_size = 64, depth = 2 }}\n[server]\nworkers = 2\nprobe_port = {probe}\n"
    with serve(tmp_path, body) as (url, _):
        probe_url = f"http://127.0.0.1:{probe}"
        assert httpx.get(f"{probe_url}/healthz").status_code == 200
        assert httpx.get(f"{probe_url}/readyz").status_code == 200
        assert "tome_requests_total" in httpx.get(f"{probe_url}/metrics").text
        assert post(url).status_code == 200


def test_metrics_add_up_across_front_ends(tmp_path: Path) -> None:
    body = "model_kwargs = { img_size = 64, depth = 2 }\n[server]\nworkers = 2\n"
    with serve(tmp_path, body) as (url, proc):
        n = 24
        for _ in range(n):  # a new connection each: the kernel spreads them over both front-ends
            assert post(url, timeout=30, connection="close").status_code == 200
        scrapes = [httpx.get(f"{url}/metrics", headers={"connection": "close"}).text for _ in range(6)]
        memory = {
            role: metric_value(scrapes[-1], "tome_process_resident_memory_bytes", {"role": role})
            for role in roles(proc.pid, ("supervisor", "engine", "frontend-0", "frontend-1"))
        }
    for text in scrapes:  # whichever front-end answered, it reports every process's counts
        assert metric_value(text, "tome_requests_total", {"status": "200"}) == n
        assert metric_value(text, "tome_images_total") == n
    cpu_roles = {"supervisor", "engine", "frontend-0", "frontend-1"}
    assert {
        r for r in cpu_roles if metric_value(scrapes[-1], "tome_process_cpu_seconds_total", {"role": r}) > 0
    } == cpu_roles
    light = max(memory["supervisor"], memory["frontend-0"], memory["frontend-1"])
    assert light < 250 * 2**20 < memory["engine"], f"only the engine may import torch: {memory}"


def test_the_port_opens_while_warming_up_and_says_so(tmp_path: Path) -> None:
    """The engine warms up (several seconds here) after the port is bound: until it is warm, /healthz is
    200 (alive), /readyz is 503 "starting" and classify is 503 warming_up with Retry-After."""
    model = "model_kwargs = { img_size = 224, depth = 4 }\n"
    body = model + "[server]\nworkers = 1\n[batching]\nmax_batch_size = 32\n"
    with serve(tmp_path, body, ready_path="/healthz") as (url, _):
        ready = httpx.get(f"{url}/readyz")
        early = post(url)
        assert ready.status_code == 503 and ready.json() == {"status": "starting"}
        assert early.status_code == 503 and early.json()["error"]["code"] == "warming_up"
        assert early.headers["retry-after"]
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert post(url).status_code == 200


def _open_loop(url: str, tier: str, rate: float, seconds: float, work: Path) -> dict[str, int]:
    """Status counts of ``rate`` requests/s at ``tier`` for ``seconds``, sent on schedule whatever the
    answers (loadtest.openloop: no coordinated omission), from a niced process so the server keeps the
    CPU it would have on its own host."""
    images = work / "images"
    images.mkdir(exist_ok=True)
    (images / "x.png").write_bytes(PNG)
    extra = ("--warmup", "0", "--tiers", f"{tier}=1", "--images-dir", str(images), "--timeout", "30")
    report = work / f"openloop-{tier}-{rate:.0f}.json"
    run = openloop.run_in_subprocess(url, rate, seconds, report, *extra, nice=10, timeout=120 - seconds)
    return run["counts"]


def _device_capacity(url: str, tier: str) -> float:
    """Images/s the device runs ``tier`` at, measured live: 8 clients post 4 images 4 times (batches of
    up to 8), over the batches' own durations, times the batches it runs at once (CPU lanes). (Warm-up's
    one timing per bucket read up to 2x slow on a noisy host, which made "2x" a load the device kept up
    with.)"""

    def images_and_seconds() -> tuple[float, float]:
        text = httpx.get(f"{url}/metrics").text
        labels = {"tier": tier}
        return (
            metric_value(text, "tome_batch_size_sum", labels),
            metric_value(text, "tome_batch_duration_seconds_sum", labels),
        )

    files = [("file", (f"{i}.png", PNG, "image/png")) for i in range(4)]

    def client(_: int) -> None:
        for _ in range(4):
            r = httpx.post(f"{url}/classify", params={"tier": tier}, files=files, timeout=60)
            assert r.status_code == 200, r.text

    images, seconds = images_and_seconds()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(client, range(8)))
    after_images, after_seconds = images_and_seconds()
    lanes = metric_value(httpx.get(f"{url}/metrics").text, "tome_device_parallel_batches", {})
    return lanes * (after_images - images) / (after_seconds - seconds)


def test_auto_degrades_under_overload_where_a_fixed_tier_refuses(tmp_path: Path) -> None:
    """At twice what the device runs exact at, exact alone refuses part of it (its queue outgrows the
    deadline); at that load (or, on a host where fastest has less than 3.2x exact's speed, at fastest's
    capacity / 1.6, still past exact's), auto moves to the fast tier and answers everything. At half load,
    auto stays exact."""
    body = (
        "model_kwargs = { img_size = 224, depth = 12 }\n"
        'tiers = { exact = { r = 0 }, fastest = { r = 48, inflection = -1 } }\ndefault_tier = "exact"\n'
        "auto = { latency_objective_ms = 3000, hold_s = 0.5, safety_factor = 1.5 }\n"
        "[server]\nworkers = 1\nmax_requests = 512\nmax_pending_images = 512\n"
        "[batching]\nmax_batch_size = 8\n"
        "[limits]\ndeadline_ms = 3000\n"
    )
    with serve(tmp_path, body) as (url, _):
        # exact on both sides of fastest: this VM's speed drifts, and the ratio is what the test needs
        before, fastest = _device_capacity(url, "exact"), _device_capacity(url, "fastest")
        exact = (before + _device_capacity(url, "exact")) / 2
        # the test needs a fast tier with room past exact (3.3-3.85x read on an idle host, 2.48x once in
        # a whole-suite run): auto is offered 2x exact, or less where fastest would run at over 60% of its
        # device capacity, which the host's decoding and load generator (same cores) push towards 100%
        assert fastest > 2.2 * exact, (exact, fastest)
        overload = min(2 * exact, fastest / 1.6)
        half = _open_loop(url, "auto", exact * 0.5, 3.0, tmp_path)
        text = httpx.get(f"{url}/metrics").text
        assert set(half) == {"200"}, half
        exact_at_half = metric_value(text, "tome_auto_tier_total", {"tier": "exact"})
        assert exact_at_half >= 0.9 * half["200"], text  # auto stays exact when it can
        fixed = _open_loop(url, "exact", exact * 2, 6.0, tmp_path)
        auto = _open_loop(url, "auto", overload, 6.0, tmp_path)
        text = httpx.get(f"{url}/metrics").text
    refused_fixed = sum(n for status, n in fixed.items() if status != "200")
    assert refused_fixed > 0.1 * sum(fixed.values()), f"exact alone at 2x: {fixed}"
    assert set(auto) == {"200"}, f"auto at {overload / exact:.2f}x: {auto}"
    assert metric_value(text, "tome_auto_tier_total", {"tier": "fastest", "reason": "deadline"}) > 0
