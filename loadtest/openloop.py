"""Open-loop load test: requests arrive at a fixed rate (or as a Poisson process) whatever the answers.

    python -m loadtest.openloop --host http://127.0.0.1:8000 --rate 300 --duration 30 --json out/ol.json
    python -m loadtest.openloop --host ... --capacity 200 --load 0.5,1.5,2,3 --duration 30 --processes 2

Measures overload without coordinated omission: arrivals do not wait for answers, and each request's
latency is taken from its *intended* send time. Reports per-status counts (200, 503, 504, ..., client
timeouts, connection errors), goodput (valid 200s per second), latency percentiles of the 200s and,
apart, of the refusals (429/503), and whether the generator kept its schedule (send lag, sends later
than ``--late-threshold-ms``, requests that found every connection busy, its CPU use). Requests whose
intended time falls in the warm-up are sent but not counted.

The schedule is split over ``--processes`` generator processes (``loadtest/openloop_client.py``, gevent
+ geventhttpclient); one process drives a few thousand requests per second. Give it more when its CPU
use nears 100% of a core or the report says it fell behind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.arrivals import ARRIVALS
from loadtest.openloop_client import Meta, Plan
from loadtest.openloop_stats import Records, Window, summarize, write_json
from loadtest.workload import DEFAULT_IMAGES_DIR, parse_tier_mix

REPO = Path(__file__).resolve().parents[1]
START_DELAY_S = 0.5  # between telling the generators the start time and that time
READY_TIMEOUT_S = 120
LATE_FRACTION = 0.01  # more than this share of sends later than the threshold: behind schedule


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtest.openloop", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="http://127.0.0.1:8000", help="service base URL")
    p.add_argument("--rate", default=None, help="requests/s offered; a comma list runs one after another")
    p.add_argument("--capacity", type=float, default=None, help="with --load: rates as multiples of this")
    p.add_argument("--load", default="0.5,1.5,2,3", help="multiples of --capacity to run")
    p.add_argument("--duration", type=float, default=30, help="measured seconds per rate")
    p.add_argument("--warmup", type=float, default=5, help="seconds sent but not counted, before each")
    p.add_argument("--pause", type=float, default=5, help="idle seconds between rates")
    p.add_argument("--arrivals", choices=ARRIVALS, default="constant")
    p.add_argument("--processes", type=int, default=1, help="generator processes sharing the schedule")
    p.add_argument(
        "--max-connections",
        type=int,
        default=0,
        help="connection pool size per process (default 0: as many as the open-file limit allows)",
    )
    p.add_argument("--timeout", type=float, default=30, help="client timeout per socket operation, s")
    p.add_argument("--tiers", default="balanced=1", help="tier mix, e.g. fast=3,exact=1")
    p.add_argument("--images-dir", default=str(DEFAULT_IMAGES_DIR), help="images to send")
    p.add_argument("--images-per-request", type=int, default=1, help="more than 1 implies --multipart")
    p.add_argument("--multipart", action="store_true", help="multipart 'file' parts (default: raw body)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--model", default="")
    p.add_argument("--no-validate", action="store_true", help="count any 200 as good, body unchecked")
    p.add_argument("--late-threshold-ms", type=float, default=10.0, help="a send this late is 'late'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    parse_tier_mix(args.tiers)
    if (args.rate is None) == (args.capacity is None):
        p.error("give --rate, or --capacity with --load")
    spec, scale = (args.rate, 1.0) if args.rate is not None else (args.load, args.capacity)
    try:
        args.rates = [scale * float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        p.error(f"not a list of numbers: {spec!r}")
    if not args.rates or min(args.rates) <= 0:
        p.error("rates must be positive")
    if args.processes < 1 or args.images_per_request < 1:
        p.error("--processes and --images-per-request must be at least 1")
    return args


def plans(args: argparse.Namespace, rate: float) -> list[Plan]:
    return [
        Plan(
            host=args.host,
            rate=rate,
            seconds=args.warmup + args.duration,
            arrivals=args.arrivals,
            part=part,
            parts=args.processes,
            tiers=parse_tier_mix(args.tiers),
            images_dir=args.images_dir or None,
            images_per_request=args.images_per_request,
            multipart=args.multipart or args.images_per_request > 1,
            top_k=args.top_k,
            model=args.model or None,
            timeout=args.timeout,
            max_connections=args.max_connections,
            validate=not args.no_validate,
            seed=args.seed,
        )
        for part in range(args.processes)
    ]


def run_generators(parts: list[Plan], workdir: Path) -> tuple[Records, list[Meta]]:
    """Start one generator per plan, start them all at the same instant, collect their records."""
    procs = []
    for plan in parts:
        plan_path = workdir / f"plan-{plan.part}.json"
        plan_path.write_text(json.dumps(asdict(plan)))
        err = (workdir / f"generator-{plan.part}.log").open("wb")
        cmd = [
            sys.executable,
            "-m",
            "loadtest.openloop_client",
            str(plan_path),
            str(workdir / f"out-{plan.part}"),
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        )
    try:
        for plan, proc in zip(parts, procs, strict=True):
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "ready" once its images are loaded
            if line.strip() != b"ready":
                raise RuntimeError(f"generator {plan.part} did not start:\n{_log_tail(workdir, plan.part)}")
        start = time.monotonic() + START_DELAY_S
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{start!r}\n".encode())
            proc.stdin.close()
        records, metas = Records(), []
        for plan, proc in zip(parts, procs, strict=True):
            code = proc.wait(timeout=plan.seconds + 3 * plan.timeout + READY_TIMEOUT_S)
            if code != 0:
                raise RuntimeError(
                    f"generator {plan.part} exited with {code}:\n{_log_tail(workdir, plan.part)}"
                )
            meta = Meta(**json.loads((workdir / f"out-{plan.part}.json").read_text()))
            records.extend(Records.load(workdir / f"out-{plan.part}.bin", meta.count))
            metas.append(meta)
        return records, metas
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _log_tail(workdir: Path, part: int) -> str:
    path = workdir / f"generator-{part}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-20:]) if path.exists() else ""


def generator_report(metas: list[Meta], report: dict[str, Any]) -> dict[str, Any]:
    """The generators' own figures, and whether they kept the schedule."""
    errors: Counter[str] = Counter()
    for m in metas:
        errors.update(m.errors)
    utilization = [m.cpu_s / m.wall_s if m.wall_s else 0.0 for m in metas]
    waited = sum(m.waited_for_connection for m in metas)
    sched = report["schedule"]
    late_share = sched["late"] / report["scheduled"] if report["scheduled"] else 0.0
    reasons = []
    if late_share > LATE_FRACTION:
        reasons.append(f"{100 * late_share:.1f}% of sends more than {sched['late_threshold_ms']:g} ms late")
    if waited:
        reasons.append(f"{waited} requests found all connections of a generator busy")
    if max(utilization, default=0.0) > 0.9:
        reasons.append(f"a generator used {100 * max(utilization):.0f}% of a core")
    return {
        "processes": len(metas),
        "cpu_utilization": utilization,
        "max_connections": [m.max_connections for m in metas],
        "max_in_flight": sum(m.max_in_flight for m in metas),
        "waited_for_connection": waited,
        "behind_schedule": bool(reasons),
        "behind_reasons": reasons,
        "errors": dict(errors.most_common()),
    }


def run_rate(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    parts = plans(args, rate)
    with tempfile.TemporaryDirectory(prefix="openloop-") as tmp:
        records, metas = run_generators(parts, Path(tmp))
    tiers = list(parts[0].tiers)
    window = Window(args.warmup, args.warmup + args.duration)
    report = summarize(records, window, rate, tiers, args.images_per_request, args.late_threshold_ms / 1000)
    report["generator"] = generator_report(metas, report)
    return report


def _row(name: str, stats: dict[str, float]) -> str:
    if not stats.get("count"):
        return f"  {name:<31} {0:>8}"
    cells = " ".join(f"{stats[k]:>8.1f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
    return f"  {name:<31} {int(stats['count']):>8} {cells}"


def format_report(r: dict[str, Any], args: argparse.Namespace) -> str:
    g = r["generator"]
    lat = r["latency_ms"]
    lines = [
        f"open loop: {r['offered_rate']:.1f} req/s offered ({args.arrivals}), {r['window_s']:g} s measured "
        f"after {args.warmup:g} s warm-up, {g['processes']} generator process(es)",
        "counts: " + ", ".join(f"{k}: {v}" for k, v in r["counts"].items()),
        f"goodput {r['goodput_rps']:.1f} req/s ({r['goodput_images_per_s']:.1f} images/s); "
        f"answered {r['answered_rps']:.1f}/s",
        f"  {'latency from intended send, ms':<31} {'count':>8} "
        + " ".join(f"{k:>8}" for k in ("p50", "p90", "p99", "p99.9", "max")),
        _row("200", lat["ok"]),
        _row("refused (429/503)", lat["refused"]),
    ]
    for status, stats in lat["by_status"].items():
        if status not in ("200", "429", "503"):
            lines.append(_row(status, stats))
    lines.append(_row("200, from actual send", r["service_latency_ms"]["ok"]))
    lag = r["schedule"]["lag_ms"]
    sched = r["schedule"]
    lines.append(
        f"schedule: send lag p50 {lag.get('p50', 0):.2f} / p99 {lag.get('p99', 0):.2f} / max "
        f"{lag.get('max', 0):.1f} ms; {sched['late']} sends > {sched['late_threshold_ms']:g} ms late; "
        f"{g['waited_for_connection']} waited for a connection; generator CPU "
        + ", ".join(f"{100 * u:.0f}%" for u in g["cpu_utilization"])
    )
    if g["behind_schedule"]:
        lines.append("WARNING: the generator fell behind its schedule: " + "; ".join(g["behind_reasons"]))
    for kind, n in list(g["errors"].items())[:5]:
        lines.append(f"  error x{n}: {kind}")
    return "\n".join(lines)


def run_in_subprocess(
    host: str, rate: float, seconds: float, report: Path, *extra: str, nice: int = 0, timeout: float = 300
) -> dict[str, Any]:
    """One rate of this CLI against ``host`` in a child process (``nice``: its priority below the
    caller's), with ``extra`` arguments; returns that rate's report (also written to ``report``)."""
    cmd = ["nice", "-n", str(nice)] if nice else []
    cmd += [sys.executable, "-m", "loadtest.openloop", "--host", host, "--rate", f"{rate:.2f}"]
    cmd += ["--duration", str(seconds), "--json", str(report), *extra]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=seconds + timeout)
    return json.loads(report.read_text())["runs"][0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = []
    for i, rate in enumerate(args.rates):
        if i:
            time.sleep(args.pause)
        report = run_rate(args, rate)
        runs.append(report)
        print(format_report(report, args), flush=True)
        print(flush=True)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, {"config": config, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
