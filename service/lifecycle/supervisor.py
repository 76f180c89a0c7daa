"""The supervisor: the process ``tome-serve`` starts. It owns no model and serves no request.

1. Validated settings in hand, it creates the run directory and starts the engine, which loads every
   model and says "loaded" (or why it failed: one line, exit 2) before the port is bound.
2. It binds the port and starts ``workers`` front-ends on that one listening socket. The engine warms up
   meanwhile; front-ends answer /readyz 503 until it is ready.
3. A front-end that dies is started again (the engine skips its unstarted work); the engine dying ends
   the service (exit 1) after front-ends had a moment to answer 503, so the orchestrator restarts it.
4. SIGTERM/SIGINT drains: front-ends stop taking work and answer everything admitted, then the engine
   stops; bounded by the drain timeout plus a few seconds. A second signal ends everything at once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client import multiprocess as prometheus_multiprocess

from ..ipc.rundir import RunDir
from ..observability.metrics import MULTIPROC_ENV
from ..settings import ServiceSettings
from . import entry
from .frontend_process import frontend_main

log = logging.getLogger("service.supervisor")

ENGINE_STOP_TIMEOUT_S = 30.0
ENGINE_DEATH_GRACE_S = 1.0
EXIT_MARGIN_S = 5.0
RESPAWN_WINDOW_S = 30.0
MAX_RESPAWNS_IN_WINDOW = 5


class StartupError(Exception):
    """The service cannot start; the message says why in one line."""


CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by a container's CPU quota (a pod limited to 4 CPUs
    on a 64-core node sees 64 in its affinity mask)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    try:
        if CGROUP_V2_CPU_MAX.is_file():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        if CGROUP_V1_QUOTA.is_file():
            quota_us = int(CGROUP_V1_QUOTA.read_text())
            return None if quota_us <= 0 else quota_us / int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return None


def bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings: ServiceSettings, host: str, port: int, log_level: str) -> None:
        self.settings = settings
        self.host, self.port = host, port
        self.log_level = log_level
        self.workers = settings.server.workers or available_cores()
        self.ctx = multiprocessing.get_context("spawn")
        self.rundir: RunDir | None = None
        self.engine: BaseProcess | None = None
        self.frontends: dict[int, BaseProcess] = {}
        self.sockets: list[socket.socket] = []  # the port, then the probe port if configured
        self._signals: list[int] = []
        self._respawns: list[float] = []
        self._terminated: set[int] = set()  # pids sent SIGTERM: a second one would mean "force exit"

    # ---- start ----------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, supervise until a signal or the engine's death, stop; the process's exit status."""
        self.rundir = RunDir.create(self.settings.server.run_dir)
        os.environ[MULTIPROC_ENV] = str(self.rundir.metrics)  # children inherit it before importing anything
        self.rundir.register_pid("supervisor")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            try:
                self._start_engine()
                self.sockets.append(bind(self.host, self.port, backlog=2048))
                probe = self.settings.server.probe_port
                if probe is not None:
                    self.sockets.append(bind(self.host, probe, backlog=64))
            except StartupError as e:
                print(f"tome-serve: cannot start: {e}", file=sys.stderr)
                return 2
            for i in range(self.workers):
                self._start_frontend(i)
            probe = self.settings.server.probe_port
            log.info(
                "serving on http://%s:%d with %d front-ends%s",
                self.host,
                self.port,
                self.workers,
                f" (health probes also on port {probe})" if probe else "",
            )
            return self._supervise()
        finally:
            self._stop_all()
            for sock in self.sockets:
                sock.close()
            self.rundir.remove()

    def _start_engine(self) -> None:
        assert self.rundir is not None
        parent, child = self.ctx.Pipe(duplex=False)
        self.engine = self.ctx.Process(
            target=entry.engine,  # imports torch in the engine process only
            args=(self.settings, str(self.rundir.path), self.workers, child, self.log_level),
            name="tome-engine",
        )
        self.engine.start()
        child.close()
        status, message = self._engine_status(parent)
        if status != "loaded":
            self._stop_engine()  # still loading if interrupted: do not wait for it
            raise StartupError(message)

    def _engine_status(self, conn: Connection) -> tuple[str, str]:
        assert self.engine is not None
        while not conn.poll(0.2):
            if not self.engine.is_alive():
                return "failed", f"the engine process exited with {self.engine.exitcode} while loading"
            if self._signals:
                return "failed", "interrupted while loading"
        try:
            return conn.recv()
        except EOFError:
            return "failed", "the engine process exited while loading"

    def _start_frontend(self, i: int) -> None:
        assert self.rundir is not None and self.sockets
        process = self.ctx.Process(
            target=frontend_main,
            args=(self.settings, str(self.rundir.path), i, self.sockets, self.log_level),
            name=f"tome-frontend-{i}",
        )
        process.start()
        self.frontends[i] = process

    # ---- supervise --------------------------------------------------------------------------------
    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)
        if len(self._signals) == 1:  # start the drain now: /readyz turns 503 without waiting for the loop
            self._terminate(list(self.frontends.values()))

    def _terminate(self, processes: list[BaseProcess]) -> None:
        """SIGTERM each process once."""
        for process in processes:
            if process.is_alive() and process.pid not in self._terminated:
                self._terminated.add(process.pid)  # type: ignore[arg-type]
                process.terminate()

    def _supervise(self) -> int:
        assert self.engine is not None
        while True:
            if self._signals:
                return self._drain()
            sentinels = [self.engine.sentinel, *(p.sentinel for p in self.frontends.values())]
            wait(sentinels, timeout=0.2)
            if not self.engine.is_alive():
                log.error("the engine exited with %s: stopping the service", self.engine.exitcode)
                time.sleep(ENGINE_DEATH_GRACE_S)  # front-ends answer 503 engine_down meanwhile
                self._stop_frontends(timeout=EXIT_MARGIN_S)
                return 1
            for i, process in list(self.frontends.items()):
                if not process.is_alive() and not self._signals:
                    if not self._may_respawn():
                        log.error("front-ends keep exiting: stopping the service")
                        self._drain()
                        return 1
                    log.warning("front-end %d exited with %s: starting it again", i, process.exitcode)
                    prometheus_multiprocess.mark_process_dead(process.pid)
                    self._start_frontend(i)

    def _may_respawn(self) -> bool:
        now = time.monotonic()
        self._respawns = [t for t in self._respawns if now - t < RESPAWN_WINDOW_S] + [now]
        return len(self._respawns) <= MAX_RESPAWNS_IN_WINDOW

    # ---- stop -------------------------------------------------------------------------------------
    def _drain(self) -> int:
        """Front-ends first (they answer what they admitted), then the engine."""
        log.info("draining")
        limits, server = self.settings.limits, self.settings.server
        self._stop_frontends(timeout=limits.drain_timeout_s + server.graceful_shutdown_s + EXIT_MARGIN_S)
        self._stop_engine()
        return 0

    def _stop_frontends(self, timeout: float) -> None:
        self._terminate(list(self.frontends.values()))
        self._join(list(self.frontends.values()), timeout)

    def _stop_engine(self) -> None:
        if self.engine is not None:
            self._terminate([self.engine])
            self._join([self.engine], ENGINE_STOP_TIMEOUT_S)

    def _join(self, processes: list[BaseProcess], timeout: float) -> None:
        """Wait for ``processes`` (a second signal cuts the wait short), then kill what is left."""
        deadline = time.monotonic() + timeout
        signals_before = len(self._signals)
        for process in processes:
            while (
                process.is_alive()
                and time.monotonic() < deadline
                and len(self._signals) <= max(signals_before, 1)
            ):
                process.join(0.1)
            if process.is_alive():
                log.warning("%s did not stop in time: killing it", process.name)
                process.kill()
                process.join()

    def _stop_all(self) -> None:
        for process in [*self.frontends.values(), *([self.engine] if self.engine else [])]:
            if process.is_alive():
                process.kill()
                process.join()
