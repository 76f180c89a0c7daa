"""The server's CPU is read from its whole process tree: a busy grandchild's CPU is counted, per process and
per thread, and the tree's processes get roles."""

from __future__ import annotations

import collections
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loadtest import proctree

BUSY_CPU_S = 0.4

# The root starts one child, named "engine" on its command line, and waits. The child waits for a file,
# burns BUSY_CPU_S of CPU in its main thread, writes another file, then sleeps until killed.
CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    go, done, busy = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    start = time.thread_time()
    while time.thread_time() - start < busy:
        pass
    done.write_text("done")
    time.sleep(60)
    """
)
ROOT = textwrap.dedent(
    """
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:], "engine"])
    print(child.pid, flush=True)
    child.wait()
    """
)


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} not written within {timeout} s")
        time.sleep(0.01)


def test_cpu_of_a_busy_child_is_counted_in_the_tree(tmp_path: Path) -> None:
    go, done = tmp_path / "go", tmp_path / "done"
    cmd = [sys.executable, "-c", ROOT, CHILD, str(go), str(done), str(BUSY_CPU_S)]
    root = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout is not None
        child_pid = int(root.stdout.readline())
        infos = proctree.describe_tree(root.pid)
        assert [(i.pid, i.depth, i.children) for i in infos] == [(root.pid, 0, 1), (child_pid, 1, 0)]
        roles = {i.pid: proctree.guess_role(i, len(infos)) for i in infos}
        assert roles == {root.pid: "supervisor (root)", child_pid: "engine"}
        assert proctree.device_owner(infos, roles) == child_pid

        with proctree.CpuWindow(root.pid) as window:
            go.write_text("go")
            wait_for(done, timeout=60)
        delta = window.delta
    finally:
        for p in proctree.tree_processes(root.pid)[::-1]:
            p.kill()
        root.wait(timeout=30)

    assert delta.appeared == [] and delta.vanished == []
    assert delta.seconds[child_pid] >= BUSY_CPU_S - 0.02
    assert delta.seconds[root.pid] < 0.1, "the waiting root spends next to nothing"
    assert delta.total_s == pytest.approx(delta.seconds[child_pid] + delta.seconds[root.pid])
    main_thread = delta.thread_seconds[child_pid][child_pid]  # the main thread's id is the pid
    assert main_thread >= BUSY_CPU_S - 0.02
    # the host's clock counts the child too (in ticks, so not to the millisecond)
    assert window.host_busy_s >= BUSY_CPU_S / 2 and window.seconds >= BUSY_CPU_S / 2
    assert 0 < window.busy_share <= 1


def test_a_single_process_is_the_server_and_owns_the_device() -> None:
    argv = ("python", "-m", "service.cli")
    info = proctree.ProcInfo(7, 1, 0, " ".join(argv), argv, children=0, uses_gpu=False, loads_torch=True)
    role = proctree.guess_role(info, 1)
    assert role == "server (single process)"
    assert proctree.device_owner([info], {7: role}) == 7


def test_processes_that_start_or_end_in_the_window_are_flagged() -> None:
    before = proctree.TreeCpu(
        {1: proctree.ProcCpu(1, 100.0, 5.0, {1: 4.0}), 2: proctree.ProcCpu(2, 100.0, 1.0, {})}
    )
    after = proctree.TreeCpu(
        {1: proctree.ProcCpu(1, 100.0, 7.5, {1: 6.0, 9: 0.5}), 3: proctree.ProcCpu(3, 101.0, 0.25, {})}
    )
    delta = proctree.cpu_delta(before, after)
    assert delta.seconds == {1: 2.5, 3: 0.25}
    assert delta.thread_seconds[1] == {1: 2.0}, "a thread born in the window has no start figure"
    assert delta.appeared == [3] and delta.vanished == [2]


def test_cpu_by_part_splits_each_process_into_its_main_thread_and_the_rest() -> None:
    delta = proctree.CpuDelta(
        seconds={10: 5.0, 20: 2.0, 21: 3.0, 1: 0.5, 2: 0.25},
        thread_seconds={10: {10: 1.0, 11: 3.5}, 20: {20: 0.75, 22: 1.25}, 21: {21: 1.0}, 1: {1: 0.5}},
    )
    roles = {10: "engine", 20: "frontend-0", 21: "frontend-1", 1: "supervisor"}  # pid 2: no role known
    assert proctree.cpu_by_part(delta, roles) == {
        "engine main thread": 1.0,
        "engine other threads": 4.0,  # the process's whole CPU less its main thread's
        "front-end main threads": 1.75,
        "front-end other threads": 3.25,
        "other processes": 0.75,
    }


def test_host_busy_is_everything_but_idle_and_iowait() -> None:
    fields = ("user", "nice", "system", "idle", "iowait")
    Times = collections.namedtuple("Times", fields)
    before, after = Times(10.0, 1.0, 2.0, 50.0, 0.5), Times(13.0, 1.5, 3.0, 54.0, 1.0)
    assert proctree.host_busy(before, after) == (4.5, 9.0)
