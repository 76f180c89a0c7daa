"""Service benchmark: per-tier throughput and latency percentiles of the real server under load.

Starts ``python -m service.cli`` on a free loopback port with a generated config (and, with
``--compare-batch1``, a second one with max_batch_size=1). Per tier it runs ``--rounds`` rounds of: the
bare patched model at the same tier and batch size, in this process with the servers idle; then
``--duration`` seconds of load from ``--concurrency`` closed-loop clients posting real JPEGs to each
server in turn. Ratios are taken within a round, so the machine's drift over minutes cancels out.

    python -m loadtest.service_bench --model vit_small_patch16_224 --device cpu --concurrency 32 \
        --compare-batch1

The server's CPU per image is the CPU time of its whole process tree (the CLI's process and every
descendant: supervisor, engine, front-ends) read with psutil before and after each window, not the
service's own ``process_cpu_seconds_total``, which covers one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import timm
import torch

from loadtest import proctree
from loadtest.server import Server
from loadtest.workload import DEFAULT_IMAGES_DIR
from models import tome
from models.timing import time_call
from models.timm_data import model_data_config
from service.engine.tiers import build_tiers
from service.ingest.preprocess import Preprocessor


def completion_rate(times: list[float]) -> float:
    """Completions per second: least-squares slope of the cumulative count over completion times.

    A batched server answers in bursts of up to ``max_batch_size`` at once, so the plain count in a
    fixed window is off by up to one burst depending on where the window cuts the batch cycle (10% for
    16-image batches every second seen through a 10 s window). The staircase's slope does not depend on
    that phase.
    """
    if len(times) < 2 or max(times) == min(times):
        raise ValueError("need completions at two or more distinct times")
    ordered = sorted(times)
    return statistics.linear_regression(ordered, range(1, len(ordered) + 1)).slope


@dataclass
class LoadResult:
    """One measured window of closed-loop load on one server at one tier."""

    tier: str
    max_batch_size: int
    concurrency: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    completed_at: list[float]  # time.monotonic() of each successful completion inside the window
    mean_batch: float
    client_cpu_s: float  # CPU time of the load generator's thread over the window
    server_cpu_s: float  # CPU time of the server's whole process tree over the window

    @property
    def client_cpu_ms_per_request(self) -> float:
        return 1000 * self.client_cpu_s / max(1, self.requests)

    @property
    def server_cpu_ms_per_image(self) -> float:
        return 1000 * self.server_cpu_s / max(1, self.requests)

    @property
    def requests(self) -> int:
        return len(self.completed_at)

    @property
    def throughput(self) -> float:
        return completion_rate(self.completed_at)


@dataclass
class Round:
    """The bare model, then each server, measured back to back: ratios within a round share the drift."""

    bare: float  # images/s of the bare model
    bare_cpu_ms: float  # its CPU time per image (all its threads)
    loads: dict[int, LoadResult]  # by max_batch_size


@dataclass
class TierResult:
    tier: str
    rounds: list[Round]

    def throughput(self, max_batch_size: int) -> float:
        return statistics.median(r.loads[max_batch_size].throughput for r in self.rounds)

    def latencies_ms(self, max_batch_size: int) -> list[float]:
        return [v for r in self.rounds for v in r.loads[max_batch_size].latencies_ms]

    def pct(self, max_batch_size: int, q: int) -> float:
        return statistics.quantiles(self.latencies_ms(max_batch_size), n=100, method="inclusive")[q - 1]

    def bare(self) -> float:
        return statistics.median(r.bare for r in self.rounds)

    def ratios(self, numerator: int, denominator: int | None) -> list[float]:
        """Per-round throughput of server ``numerator`` over server ``denominator`` (None: the bare model)."""
        out = []
        for r in self.rounds:
            base = r.bare if denominator is None else r.loads[denominator].throughput
            out.append(r.loads[numerator].throughput / base)
        return out


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


def _batch_stats(metrics_text: str, tier: str) -> tuple[float, float]:
    """(sum, count) of the tier's ``tome_batch_size``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.labels.get("tier") == tier and s.name == "tome_batch_size_sum":
                total = s.value
            if s.labels.get("tier") == tier and s.name == "tome_batch_size_count":
                count = s.value
    return total, count


async def _drive(
    server: Server,
    tier: str,
    max_bs: int,
    images: list[bytes],
    concurrency: int,
    warmup: float,
    duration: float,
) -> LoadResult:
    """Closed-loop load; counts only requests that complete inside the measured window.

    The mean batch size comes from the server's /metrics; its CPU seconds from its process tree (psutil,
    at the window's edges); the load generator's CPU seconds are this thread's over the window.
    ``/metrics`` is read through its own connection: the load client's pool is saturated, and waiting
    for a free connection there would silently shorten the window.
    """
    latencies: list[float] = []
    completed_at: list[float] = []
    errors = 0
    window: tuple[float, float] | None = None  # (start, end) in time.monotonic()
    stop_at = time.monotonic() + warmup + duration
    url = server.url
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
                now = time.monotonic()
                if window is not None and window[0] <= now <= window[1]:
                    if r.status_code == 200:
                        latencies.append((time.perf_counter() - start) * 1000)
                        completed_at.append(now)
                    else:
                        errors += 1

        tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
        await asyncio.sleep(warmup)
        before = _batch_stats((await metrics_client.get("/metrics")).text, tier)
        tree_before = proctree.cpu_snapshot(server.pid)
        window = (time.monotonic(), stop_at)
        cpu_start = time.thread_time()
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        client_cpu = time.thread_time() - cpu_start
        tree_after = proctree.cpu_snapshot(server.pid)
        after = _batch_stats((await metrics_client.get("/metrics")).text, tier)
        await asyncio.gather(*tasks)
    batches = after[1] - before[1]
    mean_batch = (after[0] - before[0]) / batches if batches else 0.0
    seconds = window[1] - window[0]
    server_cpu = proctree.cpu_delta(tree_before, tree_after).total_s
    return LoadResult(
        tier,
        max_bs,
        concurrency,
        errors,
        seconds,
        latencies,
        completed_at,
        mean_batch,
        client_cpu,
        server_cpu,
    )


def load_window(
    args: argparse.Namespace, server: Server, tier: str, max_bs: int, images: list[bytes]
) -> LoadResult:
    """One window of closed-loop load on ``server``."""
    return asyncio.run(_drive(server, tier, max_bs, images, args.concurrency, args.warmup, args.duration))


def measure_tier(
    args: argparse.Namespace, tier: str, servers: dict[int, Server], images: list[bytes]
) -> TierResult:
    """``args.rounds`` rounds of: the bare model at the largest batch size (all servers idle), then a
    window of load on each server in turn. Figures taken minutes apart on a shared VM drift by ±10%
    or more; interleaving them keeps each ratio inside one round."""
    bare = BareModel(args, max(servers), tier)
    rounds = []
    for k in range(args.rounds):
        bare_ips, bare_cpu_ms = bare.measure(args.bare_seconds)
        loads = {}
        for max_bs, server in servers.items():
            loads[max_bs] = load_window(args, server, tier, max_bs, images)
        rounds.append(Round(bare_ips, bare_cpu_ms, loads))
        print(
            f"  round {k + 1}: bare bs={max(servers)} {bare_ips:6.1f} img/s "
            f"({bare_cpu_ms:.1f} ms CPU per image); "
            + "; ".join(
                f"max_bs={b} {r.throughput:6.1f} img/s (batch {r.mean_batch:4.1f}, "
                f"CPU per image: server {r.server_cpu_ms_per_image:.1f} ms, "
                f"load generator {r.client_cpu_ms_per_request:.1f} ms)"
                for b, r in loads.items()
            ),
            flush=True,
        )
    return TierResult(tier, rounds)


class BareModel:
    """The patched model alone at one tier and batch size, on the service's device and dtype."""

    def __init__(self, args: argparse.Namespace, batch_size: int, tier: str) -> None:
        self.device = torch.device(args.device)
        dtype = getattr(torch, args.dtype) if self.device.type == "cuda" else torch.float32
        self.model = tome.patch(timm.create_model(args.model, pretrained=False)).eval().to(self.device, dtype)
        self.r = build_tiers(self.model, None)[tier].r
        size = self.model.vit.patch_embed.img_size
        self.x = torch.randn(batch_size, 3, *size, device=self.device, dtype=dtype)
        for _ in range(3):
            self._call()

    def _call(self) -> float:
        """Seconds of one model call (device synchronised)."""
        with torch.inference_mode():
            return time_call(lambda: self.model(self.x, r=self.r), self.device)

    def measure(self, seconds: float) -> tuple[float, float]:
        """(images/s, CPU ms per image) over whole calls for about ``seconds``, after one untimed call."""
        self._call()
        n, elapsed, cpu_start = 0, 0.0, time.process_time()
        while elapsed < seconds:
            elapsed += self._call()
            n += 1
        images = n * self.x.shape[0]
        return images / elapsed, 1000 * (time.process_time() - cpu_start) / images


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


def _summary(t: TierResult, max_bs: int, batch1: bool) -> str:
    vs_bare = t.ratios(max_bs, None)
    line = (
        f"tier={t.tier:<8} service {t.throughput(max_bs):7.1f} img/s  p50/p95/p99 "
        f"{t.pct(max_bs, 50):.0f}/{t.pct(max_bs, 95):.0f}/{t.pct(max_bs, 99):.0f} ms  "
        f"bare {t.bare():7.1f} img/s  service/bare {statistics.median(vs_bare):.2f} "
        f"(rounds {min(vs_bare):.2f}-{max(vs_bare):.2f})  CPU ms per image: bare "
        f"{statistics.median(r.bare_cpu_ms for r in t.rounds):.1f}, server "
        f"{statistics.median(r.loads[max_bs].server_cpu_ms_per_image for r in t.rounds):.1f}, "
        f"load generator {statistics.median(r.loads[max_bs].client_cpu_ms_per_request for r in t.rounds):.1f}"
    )
    if batch1:
        gain = t.ratios(max_bs, 1)
        line += (
            f"  max_bs=1 {t.throughput(1):6.1f} img/s  batching gain {statistics.median(gain):.2f}x "
            f"(rounds {min(gain):.2f}-{max(gain):.2f})"
        )
    return line


def _as_json(results: list[TierResult]) -> list[dict]:
    return [
        {
            "tier": t.tier,
            "rounds": [
                {
                    "bare": r.bare,
                    "bare_cpu_ms": r.bare_cpu_ms,
                    "loads": {
                        b: {
                            "throughput": load.throughput,
                            "requests": load.requests,
                            "errors": load.errors,
                            "seconds": load.seconds,
                            "mean_batch": load.mean_batch,
                            "client_cpu_s": load.client_cpu_s,
                            "server_cpu_s": load.server_cpu_s,
                        }
                        for b, load in r.loads.items()
                    },
                }
                for r in t.rounds
            ],
        }
        for t in results
    ]


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="loadtest.service_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--tiers", default="exact,balanced,fast,fastest", type=lambda s: s.split(","))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--decode-workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved bare/service rounds per tier")
    p.add_argument("--duration", type=float, default=8, help="measured seconds per server per round")
    p.add_argument("--warmup", type=float, default=2, help="unmeasured seconds of load before each window")
    p.add_argument("--bare-seconds", type=float, default=3, help="seconds of bare-model timing per round")
    p.add_argument("--compare-batch1", action="store_true", help="also load a max_batch_size=1 server")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES_DIR)
    p.add_argument("--json", type=Path, help="write every round's figures here")
    p.add_argument("--preprocess-only", action="store_true", help="only time preprocessing, then stop")
    return p, p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    p, args = parse_args(argv)

    images = [f.read_bytes() for f in sorted(args.images.glob("*.JPEG"))]
    if not images:
        p.error(f"no *.JPEG under {args.images}")
    print(f"# {args.model} on {args.device}, {len(images)} JPEGs, torch threads={torch.get_num_threads()}")
    for fused, name in ((True, "fused (default)"), (False, "timm's transform")):
        print(f"decode+preprocess, {name}: {decode_ms(args, images, fused=fused):.2f} ms/image (one thread)")
    if args.preprocess_only:
        return 0
    sizes = [args.max_batch_size, 1] if args.compare_batch1 else [args.max_batch_size]
    results: list[TierResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        servers = {b: Server(_config(args, b), Path(tmp)) for b in sizes}
        try:
            for server in servers.values():
                server.wait_ready()
            for tier in args.tiers:
                print(f"tier {tier}:", flush=True)
                results.append(measure_tier(args, tier, servers, images))
        finally:
            for server in servers.values():
                server.stop()
    print(f"# medians over {args.rounds} rounds; ratios are per round (same drift), then the median")
    for t in results:
        print(_summary(t, args.max_batch_size, args.compare_batch1))
    if args.json:
        report = {"args": vars(args), "tiers": _as_json(results)}
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
