"""Run directories: a later service removes what a killed one left, and nothing in use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from service.ipc.rundir import RunDir

HOLD = """
import sys, time
from pathlib import Path
from service.ipc.rundir import RunDir
rundir = RunDir.{how}(Path(sys.argv[1]))
print(rundir.path, flush=True)
time.sleep(60)
"""


def hold(how: str, path: Path) -> subprocess.Popen[str]:
    """A process that makes (``create``, ``path`` its parent) or joins (``join``) a run dir and lives on."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(how=how), str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # the directory exists, locked
    return proc


def test_a_run_dir_left_by_a_killed_service_is_removed_by_the_next(tmp_path: Path) -> None:
    killed = hold("create", tmp_path)
    (left,) = tmp_path.glob("tome-serve-*")
    (left / "slots-0.bin").write_bytes(b"\0" * 4096)
    killed.send_signal(signal.SIGKILL)  # no clean-up runs
    killed.wait()
    assert left.is_dir()

    alive = RunDir.create(tmp_path)
    try:
        assert not left.exists()
        assert list(tmp_path.iterdir()) == [alive.path]
    finally:
        alive.remove()


def test_a_run_dir_in_use_is_kept_even_after_its_creator_died(tmp_path: Path) -> None:
    """A live service's directory stays; so does one whose supervisor died while a child still runs
    there (a front-end draining after its parent's death)."""
    live = hold("create", tmp_path)
    (live_dir,) = tmp_path.glob("tome-serve-*")
    first = RunDir.create(tmp_path)
    child = hold("join", first.path)
    orphan = first.path
    assert first.lock_fd is not None
    os.close(first.lock_fd)  # its creator's lock is gone, the child's is not
    try:
        second = RunDir.create(tmp_path)
        assert live_dir.is_dir() and orphan.is_dir()
        second.remove()
        child.kill()
        child.wait()
        third = RunDir.create(tmp_path)
        assert not orphan.exists() and live_dir.is_dir()
        third.remove()
    finally:
        for proc in (live, child):
            proc.kill()
            proc.wait()


def test_a_directory_without_a_lock_is_left_alone(tmp_path: Path) -> None:
    """Older versions made no lock: nothing says such a directory is unused."""
    older = tmp_path / "tome-serve-older"
    older.mkdir()
    rundir = RunDir.create(tmp_path)
    try:
        assert older.is_dir()
    finally:
        rundir.remove()
    assert not rundir.path.exists()
