"""The private directory one running service shares between its processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHM = Path("/dev/shm")


@dataclass(frozen=True)
class RunDir:
    """Paths under one service's run directory (mode 0700: only the service's user can open them).

    ``engine.sock`` the engine's Unix socket; ``slots-<i>.bin`` model i's shared image slots;
    ``metrics/`` prometheus_client's multiprocess files; ``pids/<role>`` each process's pid.
    """

    path: Path

    @classmethod
    def create(cls, parent: Path | None = None) -> RunDir:
        """A fresh directory under ``parent``; by default in tmpfs (``/dev/shm``) where writable, else the
        system temp dir."""
        if parent is None and SHM.is_dir() and os.access(SHM, os.W_OK):
            parent = SHM
        path = Path(tempfile.mkdtemp(prefix="tome-serve-", dir=parent))
        rundir = cls(path)
        rundir.metrics.mkdir()
        rundir.pids.mkdir()
        return rundir

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
