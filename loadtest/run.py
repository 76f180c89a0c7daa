"""Headless load test: run locust against a tome-serve, write its CSV and HTML, print a per-tier summary.

    .venv/bin/python -m loadtest.run --host http://127.0.0.1:8000 --users 8 --spawn-rate 8 \
        --duration 30s --tiers fast=1,exact=1 --processes 1 --out out/loadtest

Per tier: requests, requests/s, images/s, p50/p95/p99 latency, failure and rejection (503) rates;
then the service's own batch-size distribution over the run, read from its /metrics before and after.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from loadtest.report import batch_sizes, batch_sizes_delta, fetch_metrics, format_summary, read_summary
from loadtest.workload import DEFAULT_IMAGES_DIR, parse_tier_mix

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO_ROOT = LOCUSTFILE.parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtest.run", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="http://127.0.0.1:8000", help="service base URL")
    p.add_argument("--users", "-u", type=int, default=8, help="concurrent closed-loop users")
    p.add_argument("--spawn-rate", "-r", type=float, default=8.0, help="users started per second")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="locust processes generating load (forked workers under a master; -1: one per core)",
    )
    p.add_argument("--duration", "-t", default="30s", help="run time, e.g. 20s, 2m")
    p.add_argument("--tiers", default="balanced=1", help="tier mix, e.g. fast=3,exact=1")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--images-dir", default=str(DEFAULT_IMAGES_DIR), help="images to send")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--model", default="")
    p.add_argument("--out", default="out/loadtest", help="directory for locust's CSV and HTML report")
    args = p.parse_args(argv)
    parse_tier_mix(args.tiers)  # fail before starting locust
    return args


def locust_command(args: argparse.Namespace, prefix: Path) -> list[str]:
    processes = [] if args.processes == 1 else ["--processes", str(args.processes)]
    return [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate),
        "--run-time", args.duration,
        "--host", args.host,
        "--csv", str(prefix),
        "--html", str(prefix) + "_report.html",
        "--only-summary",
        "--stop-timeout", "10",
        "--exit-code-on-error", "0",  # failures are reported in the summary; 1 only if locust breaks
        "--tiers", args.tiers,
        "--images-dir", args.images_dir,
        "--images-per-request", str(args.images_per_request),
        "--top-k", str(args.top_k),
        "--model", args.model,
        "--summary-json", str(prefix) + "_summary.json",
        *processes,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    before = batch_sizes(fetch_metrics(args.host))
    proc = subprocess.run(locust_command(args, prefix), cwd=REPO_ROOT, check=False)
    if proc.returncode != 0:
        print(f"loadtest: locust exited with {proc.returncode}", file=sys.stderr)
        return proc.returncode
    after = batch_sizes(fetch_metrics(args.host))
    tiers = read_summary(Path(str(prefix) + "_summary.json"))
    print()
    print(f"tome-serve load test: {args.users} users, {args.processes} locust process(es), {args.duration}, "
          f"tiers {args.tiers}, {args.images_per_request} image(s)/request, host {args.host}")  # fmt: skip
    print(format_summary(tiers, args.images_per_request, batch_sizes_delta(before, after)))
    print(f"\nlocust CSV: {prefix}_stats.csv   HTML report: {prefix}_report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
