"""How long each thread of a running Python process holds the GIL, sampled with py-spy.

Method. ``py-spy record --gil --idle --threads --nonblocking --format raw --rate R --duration D`` reads the
target's memory about R times a second (at exponentially distributed intervals, so it cannot lock onto a
periodic timer of the target) without stopping it. At every tick it sees each thread's stack and which
thread holds the GIL; ``--gil`` keeps only the holder's stack, ``--threads`` prefixes it with the
holder's OS thread id, and the raw (collapsed-stack) output counts identical stacks. Summing the counts
per thread id gives n_t, the ticks at which thread t held the GIL.

The ticks taken are not printed: py-spy 0.4's "Samples: S" counts the stacks written (so with ``--gil``
it is sum(n_t), not the ticks). py-spy stops after exactly R * D ticks, the last one unrecorded, and an
unreadable tick (a torn read, counted in "Errors: E") records nothing; so the ticks that could have
recorded a holder are N = R * D - 1 - E (checked against a recording without ``--gil``, where every
thread appears at every tick). If "Samples" is not sum(n_t) (py-spy 0.3 counted ticks there), S is N.
Thread t held the GIL a fraction f_t = n_t / N of the window, i.e. f_t seconds per second, and
``held_ms_per_request = 1000 * f_t / requests_per_second``, the request rate measured over the window.

``--idle`` is added to the command the brief names: without it py-spy also drops samples whose thread
the OS reports as not running, so a thread that blocks in a system call *while holding the GIL* (the
very thing this measures) would be missed (tests/loadtest/test_gil.py holds the GIL in ``usleep``).

Error. Each tick is a Bernoulli draw with probability f_t, so the standard error of f_t is
sqrt(f_t * (1 - f_t) / N): at 331 Hz for 10 s (N ~ 3300) and f_t = 0.3, 0.008 absolute, 3% relative;
the report gives it. Systematic effects: (1) ticks lost to errors (E, a few % under load) are left out
of N, assuming the holder is the same on a torn read; if every such tick had found a holder the figure
would be (n + E) / (N + E), the bound :meth:`GilSamples.upper` gives. (2) A tick races with GIL
hand-offs (no pause with ``--nonblocking``); unbiased to first order. (3) "Held" is wall time: a holder
that the kernel preempts keeps the GIL while off-CPU, so on an oversubscribed host (a 2-core box running
the load generator, py-spy and the server) GIL-held time can exceed the holder's CPU time; the host-path
report shows both so the difference is visible.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

_THREAD = re.compile(r"^thread \((?P<tid>0x[0-9A-Fa-f]+|\d+)\)")
_SAMPLES = re.compile(r"Samples: (?P<n>\d+)")
_ERRORS = re.compile(r"Errors: (?P<n>\d+)")
_BEHIND = re.compile(r"behind in sampling", re.IGNORECASE)


@dataclass(frozen=True)
class GilSamples:
    """One py-spy recording: GIL-holding ticks per OS thread id, out of ``ticks`` readable ticks."""

    ticks: int  # ticks that could record a holder (errors excluded)
    held: dict[int, int]  # OS thread id -> ticks at which it held the GIL
    errors: int = 0
    fell_behind: bool = False

    def fraction(self, tid: int | None = None) -> float:
        """Share of the window the thread (None: any thread of the process) held the GIL."""
        if self.ticks <= 0:
            return 0.0
        n = sum(self.held.values()) if tid is None else self.held.get(tid, 0)
        return n / self.ticks

    def stderr(self, tid: int | None = None) -> float:
        """Standard error of :meth:`fraction` (binomial sampling)."""
        f = self.fraction(tid)
        return math.sqrt(f * (1 - f) / self.ticks) if self.ticks > 0 else 0.0

    def upper(self, tid: int | None = None) -> float:
        """:meth:`fraction` if every unreadable tick had found this thread (None: any) holding the GIL."""
        n = sum(self.held.values()) if tid is None else self.held.get(tid, 0)
        total = self.ticks + self.errors
        return (n + self.errors) / total if total > 0 else 0.0


def readable_ticks(rate: int, seconds: int, samples: int, errors: int, held: dict[int, int]) -> int:
    """Ticks that could record a holder (see the module docstring)."""
    if samples != sum(held.values()):  # py-spy 0.3: "Samples" counted ticks
        return samples
    return rate * seconds - 1 - errors


def parse_raw(text: str) -> dict[int, int]:
    """Ticks per OS thread id from py-spy's raw output (``thread (TID): name;frame;... COUNT`` lines)."""
    held: dict[int, int] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        match = _THREAD.match(stack)
        if not match or not count.isdigit():
            continue
        tid = int(match["tid"], 0)
        held[tid] = held.get(tid, 0) + int(count)
    return held


def parse_log(text: str) -> tuple[int, int, bool]:
    """("Samples", "Errors", fell behind) from py-spy's messages."""
    samples, errors = _SAMPLES.search(text), _ERRORS.search(text)
    if samples is None:
        raise ValueError(f"py-spy reported no sample count:\n{text[-1000:]}")
    return int(samples["n"]), int(errors["n"]) if errors else 0, bool(_BEHIND.search(text))


def record_command(py_spy: str, pid: int, rate: int, seconds: int, out: Path) -> list[str]:
    return [
        py_spy, "record", "--gil", "--idle", "--threads", "--nonblocking", "--format", "raw",
        "--rate", str(rate), "--duration", str(seconds), "--pid", str(pid), "-o", str(out),
    ]  # fmt: skip


@dataclass
class Recording:
    """A py-spy run in progress; :meth:`finish` waits for it and reads its samples."""

    proc: subprocess.Popen[str]
    out: Path
    rate: int
    seconds: int

    def finish(self, timeout: float) -> GilSamples:
        log, _ = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"py-spy exited with {self.proc.returncode}:\n{log[-1500:]}")
        samples, errors, behind = parse_log(log)
        held = parse_raw(self.out.read_text())
        ticks = readable_ticks(self.rate, self.seconds, samples, errors, held)
        return GilSamples(ticks, held, errors, behind)


def start_recording(py_spy: str, pid: int, rate: int, seconds: int, out: Path) -> Recording:
    """py-spy sampling ``pid`` at ``rate`` Hz for ``seconds`` (py-spy's --duration is whole seconds)."""
    cmd = record_command(py_spy, pid, rate, seconds, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Recording(proc, out, rate, seconds)


def thread_names(py_spy: str, pid: int, timeout: float = 30, attempts: int = 5) -> dict[int, str]:
    """OS thread id -> Python thread name of every Python thread of ``pid`` (``py-spy dump --json``);
    empty when the process is not Python or cannot be read. A non-blocking dump of a busy process
    fails now and then (a torn read), so it is tried a few times."""
    cmd = [py_spy, "dump", "--json", "--nonblocking", "--pid", str(pid)]
    for _ in range(attempts):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            threads = json.loads(result.stdout) if result.returncode == 0 else None
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            threads = None
        if threads:
            return {
                t["os_thread_id"]: t.get("thread_name") or f"thread {t['os_thread_id']}"
                for t in threads
                if t.get("os_thread_id") is not None
            }
    return {}


def can_profile(py_spy: str, pid: int, attempts: int = 5) -> str | None:
    """None if py-spy can read ``pid``, else why not (missing binary, no ptrace permission, ...).
    Tried a few times: a non-blocking read of a busy (or just started) interpreter can fail once."""
    cmd = [py_spy, "dump", "--nonblocking", "--pid", str(pid)]
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(0.5)
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        except FileNotFoundError:
            return f"{py_spy} not found"
        except subprocess.TimeoutExpired:
            reason = "py-spy dump timed out"
            continue
        if result.returncode == 0:
            return None
        reason = f"py-spy cannot read pid {pid}: {(result.stderr or result.stdout).strip()[-300:]}"
    return reason
