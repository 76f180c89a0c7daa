"""``tier=auto`` against fixed ``exact`` under overload, on the real ViT-Ti (for BENCHMARKS.md).

    python -m loadtest.auto_bench --calibration out/calib/vit-ti-fp32.json --json out/auto-bench.json
    python -m loadtest.auto_bench --calibration ... --floor-min-speedup 2.2   # a deeper floor tier

Starts ``python -m service.cli`` with the real ViT-Ti (``../shared/models``) on the CPU, the calibration
file, its default budget tiers (plus, with ``--floor-min-speedup``, a tier ``floor`` declared by that
budget, which auto may then use), a latency objective of ``--objective-ms`` for every request, admission
bounds that let that much work wait (512 requests per front-end, 2048 images per tier queue, so that
auto's half of the floor's queue holds 10 s of its work) and the
fidelity monitor sampling ``--shadow-rate`` of the images served at a merging tier. Then:

1. capacity: closed-loop requests/s of ``tier=exact`` with 32 clients (the load where exact saturates);
2. open-loop arrivals (``loadtest.openloop``, niced) at ``--overload`` x capacity, first all
   ``tier=exact``, then all ``tier=auto``: refusals (503/504), latency of the answers, tier mix of auto;
3. the same at ``--light`` x capacity with ``tier=auto``: everything should be served at ``exact``.

``--rounds N`` repeats 1-3 on the same server (capacity measured again each round, so the offered load
follows this VM's drifting speed) and ends with a summary: per round, the refusals of each phase.

With ``--trace-interval`` (default 2 s; 0: off), each overloaded auto phase also keeps a timeline read
from ``/metrics``: per point, the images waiting in each tier's queue, each tier's batch time per image
over the interval (this VM's speed as the batches saw it) and the 503s and 504s so far. The summary reads
the first refusal against it: a backlog grown at the usual batch time is queueing, one grown while the
batch time per image rose is the VM slowing down.

Every phase also reads where the host's CPU went (``cpu``: the service's process tree by part, with
``loadtest.proctree``, and the host's busy time), per image served: the engine's other threads are the
model, the front-ends' other threads decode, and the rest of the host is mostly the load generator. On
these shared cores it shows how much of the machine the model had while a tier served the overload.

Effective agreement of auto's traffic: the calibrated agreement of each tier weighted by the images auto
sent to it (``tome_auto_tier_total``), and the fidelity monitor's live figures
(``tome_shadow_{checks,agreements}_total`` over the whole run, read once its idle-time work is done).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest import openloop, proctree
from loadtest.scrape import Sample, by_label, delta, scrape
from loadtest.server import REPO, Server, interpreter
from loadtest.workload import DEFAULT_IMAGES_DIR

SHARED = REPO.parent / "shared"
ARCH = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
WEIGHTS = SHARED / "models" / f"{ARCH}.safetensors"


def config(
    calibration: Path,
    objective_ms: float,
    shadow_rate: float,
    floor_min_speedup: float | None,
    target_share: float | None = None,
) -> str:
    tiers = {"exact": "max_agreement_loss = 0", "balanced": "max_agreement_loss = 0.05"}
    tiers |= {"fast": "max_agreement_loss = 0.10", "fastest": "max_agreement_loss = 0.15"}
    if floor_min_speedup is not None:
        tiers["floor"] = f"min_speedup = {floor_min_speedup}"
    lines = [
        'device = "cpu"',
        "[[models]]",
        'name = "vit-ti"',
        f'timm_name = "{ARCH}"',
        f'weights = "{WEIGHTS}"',
        f'calibration = "{calibration.resolve()}"',
        'default_tier = "exact"',
        "[models.tiers]",
        *(f"{name} = {{ {spec} }}" for name, spec in tiers.items()),
        "[models.auto]",
        f"latency_objective_ms = {objective_ms}",
        f'floor = "{"floor" if floor_min_speedup is not None else "fastest"}"',
        *([f"target_share = {target_share}"] if target_share is not None else []),
        "[server]",  # admission sized for the objective: 10 s of the floor's ~70 img/s may wait
        "max_requests = 512",
        "max_pending_images = 1024",  # auto may hold half of them (auto.max_queue_share)
        "[batching]",
        "max_batch_size = 16",
        "max_queue_size = 2048",
        "[limits]",
        f"deadline_ms = {objective_ms}",
        "[fidelity]",
        f"sample_rate = {shadow_rate}",
    ]
    return "\n".join(lines) + "\n"


def capacity(url: str, seconds: float, clients: int = 32, ramp: float = 5.0) -> float:
    """Closed-loop tier=exact requests/s: completions inside the ``seconds`` that follow ``ramp`` s of
    load. The requests still in flight when the window closes (one per client) complete after it and
    are not counted: counted, they would add ``clients / seconds`` to the rate."""
    photos = sorted(DEFAULT_IMAGES_DIR.glob("*.JPEG"))[:100]
    bodies = [p.read_bytes() for p in photos]
    done: list[float] = []

    async def client(i: int, until: float) -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            n = i
            while time.monotonic() < until:
                r = await c.post(
                    f"{url}/classify",
                    params={"tier": "exact"},
                    content=bodies[n % len(bodies)],
                    headers={"content-type": "image/jpeg"},
                )
                n += clients
                if r.status_code == 200:
                    done.append(time.monotonic())

    async def run() -> tuple[float, float]:
        start = time.monotonic() + ramp
        until = start + seconds
        await asyncio.gather(*(client(i, until) for i in range(clients)))
        return start, until

    start, until = asyncio.run(run())
    return sum(1 for t in done if start <= t <= until) / seconds


def open_loop(url: str, tier: str, rate: float, seconds: float, work: Path) -> dict[str, Any]:
    extra = ("--warmup", "5", "--tiers", f"{tier}=1", "--timeout", "60")
    report = work / f"openloop-{tier}-{rate:.0f}.json"
    return openloop.run_in_subprocess(url, rate, seconds, report, *extra, nice=10)


def timeline_point(t: float, start: list[Sample], before: list[Sample], now: list[Sample]) -> dict[str, Any]:
    """One point of a phase's timeline, ``t`` s in: queued images per tier now, batch time per image per
    tier since ``before`` (tiers that ran), and the requests answered 503 or 504 since ``start`` (by the
    front-ends' admission or by auto's prediction)."""
    busy = delta(
        by_label(now, "tome_batch_duration_seconds_sum", "tier"),
        by_label(before, "tome_batch_duration_seconds_sum", "tier"),
    )
    images = delta(by_label(now, "tome_images_total", "tier"), by_label(before, "tome_images_total", "tier"))
    answered = delta(
        by_label(now, "tome_requests_total", "status"), by_label(start, "tome_requests_total", "status")
    )
    return {
        "t": round(t, 1),
        "queued": {k: v for k, v in by_label(now, "tome_queue_depth", "tier").items() if v},
        "ms_per_image": {k: round(1000 * v / images[k], 2) for k, v in busy.items() if images.get(k)},
        "refused": answered.get("503", 0.0) + answered.get("504", 0.0),
    }


class Timeline:
    """Reads ``/metrics`` every ``interval`` s in a thread while a phase runs (``timeline_point``)."""

    def __init__(self, url: str, interval: float, start: list[Sample]) -> None:
        self.url, self.interval, self._start = url, interval, start
        self.points: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)

    def __enter__(self) -> Timeline:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        before = self._start
        while not self._stop.wait(self.interval):
            try:
                now = scrape(self.url)
            except httpx.HTTPError:
                continue  # a missed point; the next one covers its interval
            self.points.append(timeline_point(time.monotonic() - self._t0, self._start, before, now))
            before = now


def first_refusal(points: list[dict[str, Any]], tier: str) -> str | None:
    """The first point with a refusal, read against ``tier``'s median batch time per image in the phase."""
    hit = next((p for p in points if p["refused"]), None)
    if hit is None:
        return None
    times = [p["ms_per_image"][tier] for p in points if tier in p["ms_per_image"]]
    queued = ", ".join(f"{k} {v:.0f}" for k, v in sorted(hit["queued"].items(), key=lambda kv: -kv[1]))
    text = f"first refusal by {hit['t']:g} s: queued {queued or 'nothing'}"
    if tier in hit["ms_per_image"] and times:
        then, median = hit["ms_per_image"][tier], statistics.median_high(times)
        text += f"; {tier} {then:g} ms/image then, {median:g} the phase's median"
    return text


def cpu_per_image(
    parts: dict[str, float], host_busy_s: float, images: float, seconds: float
) -> dict[str, Any]:
    """Where the host's CPU went, per image served: the service's parts (``proctree.cpu_by_part``), the
    rest of the host (the load generator, this bench, anything else running) and the host as a whole."""
    per = {k: round(1000 * v / images, 2) if images else None for k, v in parts.items()}
    rest = host_busy_s - sum(parts.values())
    per["rest of host"] = round(1000 * rest / images, 2) if images else None
    per["host"] = round(1000 * host_busy_s / images, 2) if images else None
    return {"images": images, "host_busy_cores": round(host_busy_s / seconds, 2), "ms_per_image": per}


def phase(
    url: str,
    tier: str,
    rate: float,
    seconds: float,
    work: Path,
    agreement: dict[str, float],
    trace_interval: float = 0,
    server_pid: int | None = None,
) -> dict:
    before = scrape(url)
    with contextlib.ExitStack() as stack:
        cpu = stack.enter_context(proctree.CpuWindow(server_pid)) if server_pid is not None else None
        timeline = stack.enter_context(Timeline(url, trace_interval, before)) if trace_interval > 0 else None
        run = open_loop(url, tier, rate, seconds, work)
    after = scrape(url)
    mix = delta(
        by_label(after, "tome_auto_tier_total", "tier"), by_label(before, "tome_auto_tier_total", "tier")
    )
    reasons = delta(
        by_label(after, "tome_auto_tier_total", "reason"), by_label(before, "tome_auto_tier_total", "reason")
    )
    refused_by_auto = mix.pop("none", 0.0)  # auto's 503s: not even the floor met the deadline
    served = sum(mix.values())
    ok = run["latency_ms"]["ok"]
    out = {
        "tier": tier,
        "offered_rps": round(rate, 2),
        "counts": run["counts"],
        "refused": sum(v for k, v in run["counts"].items() if k in ("503", "504", "429")),
        "goodput_rps": round(run["goodput_rps"], 2),
        "latency_ms_200": {k: round(ok[k]) for k in ("p50", "p95", "p99", "max") if k in ok},
        "generator_behind": run["generator"]["behind_reasons"],
    }
    if cpu is not None:  # over the whole phase, its warm-up included, like the images counted
        images = delta(
            by_label(after, "tome_images_total", "tier"), by_label(before, "tome_images_total", "tier")
        )
        parts = proctree.cpu_by_part(cpu.delta, proctree.registered_roles(cpu.root_pid))
        out["cpu"] = cpu_per_image(parts, cpu.host_busy_s, sum(images.values()), cpu.seconds)
    if tier == "auto":
        out["auto_tier_mix"] = mix
        out["auto_reasons"] = reasons
        out["auto_refused"] = refused_by_auto
        if timeline is not None:
            out["timeline"] = timeline.points
        if served:
            out["effective_agreement_calibrated"] = round(
                sum(n * agreement[t] for t, n in mix.items()) / served, 4
            )
    return out


def tier_agreements(url: str) -> dict[str, dict[str, Any]]:
    model = httpx.get(f"{url}/tiers", timeout=10).json()["vit-ti"]
    out = {}
    for t in model["tiers"]:
        a = t.get("agreement_with_exact") or {}
        out[t["name"]] = {
            "schedule": t["schedule"],
            "agreement": a.get("rate"),
            "agreement_interval": [a.get("ci_low"), a.get("ci_high")],
            "calibrated_speedup": t.get("calibrated_speedup"),
            "speedup_warmup": t.get("speedup_vs_exact"),
        }
    return out


def one_round(
    url: str, args: argparse.Namespace, work: Path, agreement: dict[str, float], server_pid: int | None = None
) -> dict[str, Any]:
    """Capacity, then fixed exact and auto at the overload, then auto at the light load."""
    cap = capacity(url, 20)
    print(f"capacity at exact: {cap:.2f} req/s", flush=True)
    out: dict[str, Any] = {"capacity_rps": round(cap, 2), "phases": []}
    for tier, load in (("exact", args.overload), ("auto", args.overload), ("auto", args.light)):
        time.sleep(10)  # the backlog of the phase before drains
        trace = args.trace_interval if tier == "auto" and load == args.overload else 0
        ph = phase(url, tier, load * cap, args.seconds, work, agreement, trace, server_pid)
        ph["load"] = load
        print(json.dumps(ph), flush=True)
        out["phases"].append(ph)
    time.sleep(10)
    after = capacity(url, 20)  # this VM's speed drifts: how far from 2x the overload really was
    out["capacity_after_rps"] = round(after, 2)
    for ph in out["phases"]:
        ph["load_vs_mean_capacity"] = round(ph["offered_rps"] / ((cap + after) / 2), 2)
    print(f"capacity at exact after the round: {after:.2f} req/s", flush=True)
    return out


def cpu_text(cpu: dict[str, Any]) -> str:
    """``cpu_per_image`` in a line: the host's CPU per image served and its largest parts."""
    per = cpu["ms_per_image"]
    if per["host"] is None:
        return "no image served"
    parts = sorted(((k, v) for k, v in per.items() if k != "host" and v), key=lambda kv: -kv[1])
    listed = ", ".join(f"{k} {v:g}" for k, v in parts)
    return f"host {per['host']:g} ms of CPU per image ({cpu['host_busy_cores']:g} cores busy): {listed}"


def summary(rounds: list[dict[str, Any]], floor: str = "floor") -> str:
    """One line per round: capacity and, per phase, served / refused (and auto's effective agreement,
    and where the phase has a timeline, its first refusal read against ``floor``'s batch times)."""
    lines = []
    for i, rnd in enumerate(rounds, 1):
        before, after = rnd["capacity_rps"], rnd["capacity_after_rps"]
        parts = [f"round {i}: capacity {before:.1f} req/s before, {after:.1f} after"]
        for ph in rnd["phases"]:
            served = ph["counts"].get("200", 0)
            text = f"{ph['load']:g}x {ph['tier']} ({ph['load_vs_mean_capacity']:.2f}x their mean): "
            text += f"{served} served, {ph['refused']} refused"
            if "effective_agreement_calibrated" in ph:
                at_exact = ph["auto_tier_mix"].get("exact", 0) / sum(ph["auto_tier_mix"].values())
                text += f" ({at_exact:.0%} at exact, agreement {ph['effective_agreement_calibrated']:.1%})"
            if ph.get("timeline") and (refusal := first_refusal(ph["timeline"], floor)):
                text += f" [{refusal}]"
            if ph["tier"] == "auto" and ph.get("cpu"):
                text += f" <{cpu_text(ph['cpu'])}>"
            parts.append(text)
        lines.append("; ".join(parts))
    heavy = [
        max((ph for ph in rnd["phases"] if ph["tier"] == "auto"), key=lambda ph: ph["load"]) for rnd in rounds
    ]
    met = sum(1 for ph in heavy if ph["refused"] == 0)
    lines.append(f"rounds whose overloaded auto phase refused nothing: {met} of {len(rounds)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", type=Path, required=True, help="tome-serve calibrate's file for ViT-Ti")
    p.add_argument("--objective-ms", type=float, default=10_000)
    p.add_argument("--overload", type=float, default=2.0, help="multiple of exact's capacity")
    p.add_argument("--light", type=float, default=0.5, help="multiple of exact's capacity")
    p.add_argument("--seconds", type=float, default=30, help="measured seconds per open-loop phase")
    p.add_argument("--shadow-rate", type=float, default=0.1)
    p.add_argument("--floor-min-speedup", type=float, default=None, help="add a deeper floor tier")
    p.add_argument(
        "--target-share", type=float, default=None, help="auto.target_share (default: the service's)"
    )
    p.add_argument("--rounds", type=int, default=1, help="capacity + the three phases, this many times")
    p.add_argument(
        "--trace-interval",
        type=float,
        default=2.0,
        help="seconds between /metrics reads in each overloaded auto phase (0: no timeline)",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="auto-bench-") as tmp:
        work = Path(tmp)
        text = config(
            args.calibration, args.objective_ms, args.shadow_rate, args.floor_min_speedup, args.target_share
        )
        with Server(text, work) as server:
            server.wait_ready()
            tiers = tier_agreements(server.url)
            agreement = {name: t["agreement"] for name, t in tiers.items()}
            python = interpreter()
            print(f"server and load generator on {python}", flush=True)
            print("tiers:", json.dumps(tiers), flush=True)
            result: dict[str, Any] = {"python": python, "tiers": tiers, "rounds": []}
            for n in range(args.rounds):
                if n:
                    time.sleep(10)  # the backlog of the round before drains
                result["rounds"].append(one_round(server.url, args, work, agreement, server.pid))
            result |= result["rounds"][0]  # the first round's figures at the top level, as before
            time.sleep(15)  # the fidelity monitor's idle-time work finishes
            samples = scrape(server.url)
            checks = by_label(samples, "tome_shadow_checks_total", "tier")
            agreements = by_label(samples, "tome_shadow_agreements_total", "tier")
            result["shadow"] = {
                "checks": checks,
                "agreements": agreements,
                "dropped": sum(v for n, _, v in samples if n == "tome_shadow_dropped_total"),
                "live_agreement": round(sum(agreements.values()) / sum(checks.values()), 4)
                if sum(checks.values())
                else None,
            }
            print("shadow:", json.dumps(result["shadow"]), flush=True)
    floor = "floor" if args.floor_min_speedup is not None else "fastest"
    print(summary(result["rounds"], floor), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
