"""GIL-held time from py-spy: the raw output's parsing, the tick count, and a live check against a thread
that holds the GIL for a known share of the time without using the CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest import gil
from loadtest.hostpath import default_py_spy

RAW = """\
thread (4242): MainThread;run (asyncio/runners.py:118);_run_once (asyncio/base_events.py:1922) 30
thread (4242): MainThread;run (asyncio/runners.py:118);select (selectors.py:468) 12
thread (4250): decode_0;_worker (concurrent/futures/thread.py:83) 8
thread (0x7F00AB): no os thread id;f (x.py:1) 2
not a stack line
"""


def test_raw_output_is_summed_per_thread() -> None:
    assert gil.parse_raw(RAW) == {4242: 42, 4250: 8, 0x7F00AB: 2}


def test_ticks_are_the_schedule_less_the_last_and_the_unreadable() -> None:
    log = "py-spy> Sampling process 331 times a second for 2 seconds.\npy-spy> Wrote. Samples: 52 Errors: 9\n"
    samples, errors, behind = gil.parse_log(log)
    assert (samples, errors, behind) == (52, 9, False)
    held = gil.parse_raw(RAW)
    assert gil.readable_ticks(331, 2, samples, errors, held) == 331 * 2 - 1 - 9
    # py-spy 0.3 printed the ticks themselves as "Samples"
    assert gil.readable_ticks(331, 2, 600, errors, held) == 600
    assert gil.parse_log("1.20s behind in sampling, results may be inaccurate\nSamples: 1 Errors: 0")[2]


def test_fraction_error_and_upper_bound() -> None:
    s = gil.GilSamples(ticks=1000, held={1: 300, 2: 100}, errors=10)
    assert s.fraction(1) == 0.3 and s.fraction() == 0.4 and s.fraction(3) == 0.0
    assert s.stderr(1) == pytest.approx((0.3 * 0.7 / 1000) ** 0.5)
    assert s.upper() == pytest.approx(410 / 1010)


# A thread that sleeps 4 ms in usleep *holding the GIL* (ctypes.PyDLL keeps it), then 6 ms in
# time.sleep without it: it holds the GIL ~40% of the time while using next to no CPU.
HOLDER = textwrap.dedent(
    """
    import ctypes, threading, time
    libc = ctypes.PyDLL(None)
    def holder():
        while True:
            libc.usleep(4000)
            time.sleep(0.006)
    def idle():
        while True:
            time.sleep(0.01)
    threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (holder, idle)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    print(*(t.native_id for t in threads), flush=True)
    time.sleep(120)
    """
)


@pytest.fixture()
def holder_process() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    yield proc
    proc.kill()
    proc.wait(timeout=30)


def test_gil_held_while_off_cpu_is_measured(holder_process: subprocess.Popen[str], tmp_path: Path) -> None:
    py_spy = default_py_spy()
    assert holder_process.stdout is not None
    holder_tid, idle_tid = map(int, holder_process.stdout.readline().split())
    reason = gil.can_profile(py_spy, holder_process.pid)
    if reason:
        pytest.skip(f"py-spy cannot run here: {reason}")
    names = gil.thread_names(py_spy, holder_process.pid)
    assert names[holder_tid] == "holder" and names[idle_tid] == "idle"
    assert names[holder_process.pid] == "MainThread"

    samples = gil.start_recording(py_spy, holder_process.pid, 331, 2, tmp_path / "raw.txt").finish(timeout=60)
    assert samples.ticks > 500
    assert 0.28 < samples.fraction(holder_tid) < 0.55, samples  # ~0.39 (sleeps overshoot a little)
    assert samples.fraction(idle_tid) < 0.05
    assert samples.fraction() == pytest.approx(sum(samples.fraction(t) for t in samples.held)), (
        "the process's share is the sum of its threads'"
    )
