"""Service benchmark: per-tier throughput and latency percentiles of the real server under load.

Starts ``python -m service.cli`` on a free loopback port with a generated config, drives it with
``--concurrency`` closed-loop clients posting real JPEGs for ``--duration`` seconds per tier, and
compares with the bare patched model at the same tier and batch size (measured in this process while
the server is down). ``--compare-batch1`` repeats the run with max_batch_size=1.

    python -m service.bench --model vit_small_patch16_224 --device cpu --concurrency 32 --compare-batch1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import timm
import torch

from models import tome
from models.timm_data import model_data_config

from .preprocess import Preprocessor
from .tiers import build_tiers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "imagenet-sample"


@dataclass
class LoadResult:
    tier: str
    max_batch_size: int
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    mean_batch: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(args: argparse.Namespace, max_batch_size: int) -> str:
    return f"""
device = "{args.device}"
[[models]]
name = "bench"
timm_name = "{args.model}"
weights = "random"
dtype = "{args.dtype}"
[batching]
max_batch_size = {max_batch_size}
max_wait_ms = {args.max_wait_ms}
max_queue_size = 1024
[limits]
deadline_ms = 120000
decode_workers = {args.decode_workers}
"""


class Server:
    """The CLI in a subprocess, ready once /readyz says so."""

    def __init__(self, config_text: str, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / f"bench-{self.port}.toml"
        config.write_text(config_text)
        self.log = (workdir / f"server-{self.port}.log").open("w")
        cmd = [sys.executable, "-m", "service.cli", "--config", str(config), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def _batch_stats(metrics_text: str, tier: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.labels.get("tier") == tier and s.name == "tome_batch_size_sum":
                total = s.value
            if s.labels.get("tier") == tier and s.name == "tome_batch_size_count":
                count = s.value
    return total, count


async def _drive(url: str, tier: str, images: list[bytes], concurrency: int, warmup: float, duration: float):
    """Closed-loop load; counts only requests that complete inside the measured window.

    ``/metrics`` is read through its own connection: the load client's pool is saturated, and waiting
    for a free connection there would silently shorten the window.
    """
    latencies: list[float] = []
    errors = 0
    window: tuple[float, float] | None = None  # (start, end) in time.monotonic()
    stop_at = time.monotonic() + warmup + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client,
        httpx.AsyncClient(base_url=url, timeout=30) as metrics_client,
    ):

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.monotonic() < stop_at:
                start = time.perf_counter()
                r = await client.post(
                    "/classify",
                    params={"tier": tier},
                    content=images[i % len(images)],
                    headers={"content-type": "image/jpeg"},
                )
                i += concurrency
                if window is not None and window[0] <= time.monotonic() <= window[1]:
                    if r.status_code == 200:
                        latencies.append((time.perf_counter() - start) * 1000)
                    else:
                        errors += 1

        tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        await asyncio.sleep(warmup)
        before = _batch_stats((await metrics_client.get("/metrics")).text, tier)
        window = (time.monotonic(), stop_at)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        after = _batch_stats((await metrics_client.get("/metrics")).text, tier)
        await asyncio.gather(*tasks)
    batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / batches if batches else 0.0
    return latencies, errors, window[1] - window[0], mean_batch


def run_service(
    args: argparse.Namespace,
    max_batch_size: int,
    images: list[bytes],
    workdir: Path,
    bare: dict[str, float] | None,
) -> list[LoadResult]:
    """Load the server tier by tier. With ``bare``, time the bare model just before each tier (server
    idle), so both figures see the same machine load."""
    server = Server(_config(args, max_batch_size), workdir)
    try:
        server.wait_ready()
        results = []
        for tier in args.tiers:
            if bare is not None:
                bare[tier] = bare_throughput(args, max_batch_size, tier)
                print(
                    f"bare patched model tier={tier:<8} bs={max_batch_size}: {bare[tier]:8.1f} img/s",
                    flush=True,
                )
            lat, errors, seconds, mean_batch = asyncio.run(
                _drive(server.url, tier, images, args.concurrency, args.warmup, args.duration)
            )
            res = LoadResult(
                tier, max_batch_size, args.concurrency, len(lat), errors, seconds, lat, mean_batch
            )
            results.append(res)
            print(_row(res), flush=True)
        return results
    finally:
        server.stop()


def bare_throughput(args: argparse.Namespace, batch_size: int, tier: str) -> float:
    """Images/s of the patched model alone at ``tier`` and ``batch_size`` (same device and dtype)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    model = tome.patch(timm.create_model(args.model, pretrained=False)).eval().to(device, dtype)
    tiers = build_tiers(model, None)
    size = model.vit.patch_embed.img_size
    x = torch.randn(batch_size, 3, *size, device=device, dtype=dtype)
    r = tiers[tier].r
    with torch.inference_mode():
        for _ in range(3):
            model(x, r=r)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.bare_seconds:
            model(x, r=r)
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n * batch_size / (time.perf_counter() - start)


def decode_ms(args: argparse.Namespace, images: list[bytes], fused: bool, rounds: int = 3) -> float:
    """Mean ms to decode and preprocess one image in one thread: best of ``rounds`` after a warm-up."""
    vit = timm.create_model(args.model, pretrained=False)
    pre = Preprocessor(model_data_config(vit), max_pixels=10**8, fused=fused)
    for data in images:
        pre(data)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for data in images:
            pre(data)
        best = min(best, time.perf_counter() - start)
    return best * 1000 / len(images)


def _row(r: LoadResult) -> str:
    return (
        f"tier={r.tier:<8} max_bs={r.max_batch_size:<3} conc={r.concurrency:<3} "
        f"throughput={r.throughput:8.1f} img/s  p50={r.pct(50):8.1f} ms  p95={r.pct(95):8.1f} ms  "
        f"p99={r.pct(99):8.1f} ms  mean_batch={r.mean_batch:5.1f}  errors={r.errors}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--tiers", default="exact,balanced,fast,fastest", type=lambda s: s.split(","))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--duration", type=float, default=15, help="measured seconds per tier")
    p.add_argument("--warmup", type=float, default=3, help="unmeasured seconds of load per tier")
    p.add_argument("--bare-seconds", type=float, default=5)
    p.add_argument("--compare-batch1", action="store_true", help="also run with max_batch_size=1")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--preprocess-only", action="store_true", help="only time preprocessing, then stop")
    args = p.parse_args(argv)

    images = [f.read_bytes() for f in sorted(args.images.glob("*.JPEG"))]
    if not images:
        p.error(f"no *.JPEG under {args.images}")
    print(f"# {args.model} on {args.device}, {len(images)} JPEGs, torch threads={torch.get_num_threads()}")
    for fused, name in ((True, "fused (default)"), (False, "timm's transform")):
        print(f"decode+preprocess, {name}: {decode_ms(args, images, fused=fused):.2f} ms/image (one thread)")
    if args.preprocess_only:
        return 0
    bare: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results = run_service(args, args.max_batch_size, images, Path(tmp), bare)
        single = run_service(args, 1, images, Path(tmp), None) if args.compare_batch1 else []
    for r in results:
        print(f"service/bare tier={r.tier:<8}: {r.throughput / bare[r.tier]:.2f}")
    for r1, rn in zip(single, results, strict=False):
        print(
            f"batching gain tier={rn.tier:<8} (max_bs={rn.max_batch_size} vs 1): "
            f"{rn.throughput / r1.throughput:.2f}x"
        )
    if args.json:
        rows = [
            {
                k: getattr(r, k)
                for k in (
                    "tier",
                    "max_batch_size",
                    "concurrency",
                    "requests",
                    "errors",
                    "seconds",
                    "mean_batch",
                )
            }
            | {"throughput": r.throughput, "p50_ms": r.pct(50), "p95_ms": r.pct(95), "p99_ms": r.pct(99)}
            for r in [*results, *single]
        ]
        args.json.write_text(json.dumps({"bare": bare, "service": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
