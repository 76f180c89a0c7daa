"""The private directory one running service shares between its processes."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")


PREFIX = "tome-serve-"


@dataclass(frozen=True)
class RunDir:
    """Paths under one service's run directory (mode 0700: only the service's user can open them).

    ``engine.sock`` the engine's Unix socket; ``slots-<i>.bin`` model i's shared image slots;
    ``metrics/`` prometheus_client's multiprocess files; ``pids/<role>`` each process's pid; ``lock``
    share-locked (``flock``) by every process of the service while it runs.

    The lock is how a later service tells a directory left behind (a supervisor killed with SIGKILL
    never removes it, and its slot files can be hundreds of MiB of tmpfs) from one in use: the kernel
    drops a dead process's locks, and unlike a pid it means the same in every pid namespace that
    shares the tmpfs.
    """

    path: Path
    lock_fd: int | None = field(default=None, compare=False, repr=False)  # open for the process's life

    @classmethod
    def create(cls, parent: Path | None = None) -> RunDir:
        """A fresh, locked directory under ``parent`` (by default tmpfs, ``/dev/shm``, where writable,
        else the system temp dir), after removing the directories earlier services left there."""
        if parent is None and SHM.is_dir() and os.access(SHM, os.W_OK):
            parent = SHM
        sweep(Path(parent or tempfile.gettempdir()))
        path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        # Locked before it has its name, so no sweeper ever sees an unlocked ``lock`` of a live service.
        fd = os.open(path / "lock.new", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.rename(path / "lock.new", path / "lock")
        rundir = cls(path, fd)
        rundir.metrics.mkdir()
        rundir.pids.mkdir()
        return rundir

    @classmethod
    def join(cls, path: Path) -> RunDir:
        """The directory a child process was given, share-locked for as long as this process lives."""
        fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return cls(path, fd)

    @property
    def socket(self) -> Path:
        return self.path / "engine.sock"

    def slots(self, model_index: int) -> Path:
        return self.path / f"slots-{model_index}.bin"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def pids(self) -> Path:
        return self.path / "pids"

    def register_pid(self, role: str) -> None:
        """Record this process under ``role`` (engine, frontend-0, ...) for the process-tree metrics."""
        (self.pids / role).write_text(str(os.getpid()))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)


def sweep(parent: Path) -> list[Path]:
    """Remove the run directories under ``parent`` that no live process holds; the ones removed.

    A directory without a ``lock`` file (made by an older version) is left alone: nothing says it is
    unused.
    """
    removed = []
    for path in parent.glob(PREFIX + "*"):
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # no lock file, or not ours to open
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a service is running there
            continue
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.info(
            "removed %d run directories left by services that ended without cleaning up: %s",
            len(removed),
            ", ".join(map(str, removed)),
        )
    return removed
