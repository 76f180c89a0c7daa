"""Open-loop arrivals from nghttp2's ``h2load`` (Debian: ``apt-get install nghttp2-client``).

A C generator costs ~0.15 ms of CPU per request where the Python one (``loadtest.openloop``) costs
several times that, so on a host that runs generator and server side by side (this project's 2-core
VM) the overload measured is the server's, not the generator's. h2load's rate mode opens ``r``
connections every ``period``, each sending one request (``-n N -c N``): arrivals do not wait for answers,
and every arrival costs the server an accept, as a flood of new clients would. Its per-request log
(start time, status, duration) gives the counts and latencies; connection errors and timeouts are the
scheduled requests that never logged an answer.

    python -m loadtest.h2load --url http://127.0.0.1:8000/classify --rate 900 --duration 20
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from loadtest.openloop_stats import REFUSALS, percentiles

MAX_CONNECTIONS_PER_PERIOD = 50


def available() -> bool:
    return shutil.which("h2load") is not None


def schedule(rate: float, tolerance: float = 0.02) -> tuple[int, int]:
    """(connections per period, period in ms) for ``rate`` per second: the smallest bursts within
    ``tolerance`` of the rate, else the closest."""
    best: tuple[float, int, int] = (float("inf"), 1, 1)
    for per in range(1, MAX_CONNECTIONS_PER_PERIOD + 1):
        period_ms = max(1, round(per * 1000 / rate))
        error = abs(per * 1000 / period_ms - rate) / rate
        if error <= tolerance:
            return per, period_ms
        if error < best[0]:
            best = (error, per, period_ms)
    return best[1], best[2]


def parse_log(text: str) -> list[tuple[float, int, float]]:
    """(start s, status, duration s) per answered request, from ``h2load --log-file``."""
    rows = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) == 3:
            rows.append((int(fields[0]) / 1e6, int(fields[1]), int(fields[2]) / 1e6))
    return rows


def _summary_ms(text: str, label: str) -> dict[str, float] | None:
    """h2load's min/max/mean row for ``label`` (e.g. "time for connect"), in ms."""
    match = re.search(rf"^{label}:\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if match is None:
        return None
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}

    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()  # type: ignore[union-attr]
        return float(number) * units[unit]

    return dict(zip(("min", "max", "mean"), (ms(v) for v in match.groups()), strict=True))


def run(
    url: str,
    body: Path,
    content_type: str,
    rate: float,
    seconds: float,
    warmup: float = 2.0,
    timeout: float = 30,
) -> dict[str, Any]:
    """Arrivals at ``rate`` for ``warmup + seconds``; figures over the last ``seconds`` (by send time),
    shaped like ``loadtest.openloop``'s report where they overlap."""
    per, period_ms = schedule(rate)
    actual_rate = per * 1000 / period_ms
    total = round(actual_rate * (warmup + seconds))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.tsv"
        cmd = ["h2load", "--h1", "-n", str(total), "-c", str(total), "-r", str(per)]
        cmd += ["--rate-period", f"{period_ms}ms", "-T", f"{timeout:g}", "--log-file", str(log)]
        cmd += ["-d", str(body), "-H", f"content-type: {content_type}", url]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=warmup + seconds + 2 * timeout + 60
        )
        rows = parse_log(log.read_text()) if log.exists() else []
    if done.returncode != 0 and not rows:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr[-500:]}")
    start = min(r[0] for r in rows) + warmup if rows else 0.0
    window = [r for r in rows if start <= r[0] < start + seconds]
    counts: dict[str, int] = {}
    for _, status, _ in window:
        counts[str(status)] = counts.get(str(status), 0) + 1
    by_status = {code: percentiles([d for _, s, d in window if str(s) == code]) for code in counts}
    unanswered = total - len(rows)
    if unanswered:
        counts["no answer (whole run)"] = unanswered
    ok = [d for _, s, d in window if s == 200]
    refused = [d for _, s, d in window if s in REFUSALS]  # as openloop's: a 504 is no refusal
    connect = _summary_ms(done.stdout, "time for connect")
    slow_connect = connect is not None and connect["max"] > 100  # waiting in the accept queue
    return {
        "generator": {
            "tool": "h2load",
            "connections_per_period": per,
            "period_ms": period_ms,
            "connect_ms": connect,
            "behind_reasons": [f"connect took up to {connect['max']:.0f} ms"] if slow_connect else [],
        },
        "offered_rate": actual_rate,
        "window_s": seconds,
        "counts": counts,
        "goodput_rps": len(ok) / seconds,
        "latency_ms": {"ok": percentiles(ok), "refused": percentiles(refused), "by_status": by_status},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="loadtest.h2load", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000/classify")
    p.add_argument("--rate", type=float, required=True, help="arrivals per second")
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--body", type=Path, help="file to POST (default: one shared photo)")
    p.add_argument("--content-type", default="image/jpeg")
    args = p.parse_args(argv)
    from loadtest.reliability import photo  # reliability imports this module

    with tempfile.TemporaryDirectory() as tmp:
        body = args.body
        if body is None:
            body = Path(tmp) / "photo.jpg"
            body.write_bytes(photo())
        print(
            json.dumps(
                run(args.url, body, args.content_type, args.rate, args.duration, args.warmup), indent=1
            )
        )


if __name__ == "__main__":
    main()
