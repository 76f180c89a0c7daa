"""ApacheBench (``ab``) as a closed-loop load generator: one run, its figures, and its own CPU time.

ab speaks HTTP/1.0. With ``-k`` it asks for keep-alive, but a server may still close the connection after
every response (uvicorn does for HTTP/1.0), so the run reports ``Keep-Alive requests``: when it is 0, every
request paid a TCP connect/accept, and the server CPU measured includes it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MAX_REQUESTS_PER_S = 50_000  # ab sizes its result table from -n; -t alone caps a run at 50,000 requests


@dataclass(frozen=True)
class AbResult:
    complete: int
    failed: int  # connect, receive and exception failures (not length: -l accepts varying bodies)
    non_2xx: int
    keepalive: int
    seconds: float  # ab's "Time taken for tests"
    rps: float
    percentiles_ms: dict[int, float]  # 50, 66, 75, 80, 90, 95, 98, 99, 100
    cpu_s: float  # ab's own CPU time (user + system) over the run
    wall_s: float  # from starting ab to its exit

    @property
    def ok(self) -> int:
        return self.complete - self.non_2xx - self.failed


def _int(text: str, label: str, default: int | None = None) -> int:
    match = re.search(rf"^{re.escape(label)}:\s+(\d+)", text, re.MULTILINE)
    if match is None:
        if default is None:
            raise ValueError(f"ab output has no {label!r}:\n{text[-1500:]}")
        return default
    return int(match[1])


def _float(text: str, label: str) -> float:
    match = re.search(rf"^{re.escape(label)}:\s+([\d.]+)", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"ab output has no {label!r}:\n{text[-1500:]}")
    return float(match[1])


def parse_output(text: str, cpu_s: float = 0.0, wall_s: float = 0.0) -> AbResult:
    """Figures from ab's report (lines that are absent when zero, like Non-2xx, count as 0)."""
    failed_line = re.search(
        r"^Failed requests:\s+\d+\s*\n\s+\(Connect: (\d+), Receive: (\d+), Length: \d+, "
        r"Exceptions: (\d+)\)",
        text,
        re.MULTILINE,
    )
    failed = sum(int(g) for g in failed_line.groups()) if failed_line else _int(text, "Failed requests")
    percentiles = {int(m[1]): float(m[2]) for m in re.finditer(r"^\s+(\d+)%\s+(\d+)", text, re.MULTILINE)}
    return AbResult(
        complete=_int(text, "Complete requests"),
        failed=failed,
        non_2xx=_int(text, "Non-2xx responses", 0),
        keepalive=_int(text, "Keep-Alive requests", 0),
        seconds=_float(text, "Time taken for tests"),
        rps=_float(text, "Requests per second"),
        percentiles_ms=percentiles,
        cpu_s=cpu_s,
        wall_s=wall_s,
    )


def command(ab: str, url: str, body: Path, content_type: str, concurrency: int, seconds: float) -> list[str]:
    """``ab -k -c C -t S -p body -T type``; -n after -t lifts ab's 50,000-request cap for the run,
    -l accepts responses of varying length, -r keeps going on a socket error."""
    limit = max(MAX_REQUESTS_PER_S, int(seconds * MAX_REQUESTS_PER_S))
    return [
        ab, "-k", "-l", "-r", "-q",
        "-c", str(concurrency), "-t", str(max(1, round(seconds))), "-n", str(limit),
        "-p", str(body), "-T", content_type, url,
    ]  # fmt: skip


def run(ab: str, url: str, body: Path, content_type: str, concurrency: int, seconds: float) -> AbResult:
    """One ab run of ``seconds`` (whole seconds: ab's -t is an integer) at ``concurrency``."""
    start = time.monotonic()
    proc = subprocess.Popen(
        command(ab, url, body, content_type, concurrency, seconds),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output = proc.stdout.read()  # ab's report is small; read before waiting so the pipe never fills
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ab exited with {proc.returncode}:\n{output[-1500:]}")
    return parse_output(output, usage.ru_utime + usage.ru_stime, wall)
