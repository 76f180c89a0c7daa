"""The engine's life: load, report to the supervisor, listen, warm up, serve, drain on SIGTERM.

``engine_main`` is the engine process's entry point (spawned by the supervisor); ``EngineThread`` runs
the same engine in a thread of the current process, for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from ..engine.connections import EngineServer
from ..engine.engine import Engine
from ..engine.faults import Fatal
from ..engine.loading import ModelLoadError
from ..ipc.rundir import RunDir
from ..observability.metrics import EngineMetrics
from ..settings import ServiceSettings
from .process import configure_child, settle_heap

log = logging.getLogger(__name__)

DEVICE_MEMORY_INTERVAL_S = 5.0
EXIT_FATAL = 3


async def serve_engine(engine: Engine, stop: asyncio.Event, listening: threading.Event | None = None) -> None:
    """Listen (front-ends connect and wait while it warms up), warm up, serve until ``stop``, drain."""
    server = EngineServer(engine, engine.rundir.socket)
    await server.start()
    if listening is not None:
        listening.set()
    warm = asyncio.create_task(engine.start())
    memory = asyncio.create_task(_watch_device_memory(engine))
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([warm, stopping], return_when=asyncio.FIRST_COMPLETED)
    if warm in done and warm.exception() is not None:
        raise warm.exception()  # type: ignore[misc]
    await stopping
    engine.begin_drain()
    if not warm.done():
        warm.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await warm
    await engine.stop()
    memory.cancel()
    await server.close()


async def _watch_device_memory(engine: Engine) -> None:
    while True:
        engine.update_device_memory()
        await asyncio.sleep(DEVICE_MEMORY_INTERVAL_S)


def die(reason: str) -> None:
    """The engine's ``Fatal``: nothing in this process can be trusted to finish, so exit at once (the
    supervisor sees it and ends the service; front-ends answer 503 engine_down meanwhile)."""
    log.critical("ending the engine: %s", reason)
    logging.shutdown()
    os._exit(EXIT_FATAL)


def engine_main(
    settings: ServiceSettings, run_path: str, workers: int, status: Connection, log_level: str
) -> None:
    """The engine process: sends ``("loaded", "")`` or ``("failed", message)`` on ``status``."""
    configure_child("engine", log_level)
    rundir = RunDir.join(Path(run_path))
    rundir.register_pid("engine")
    engine = Engine(settings, rundir, EngineMetrics(registry=None), workers, die)
    try:
        engine.load()
    except ModelLoadError as e:
        status.send(("failed", str(e)))
        sys.exit(2)
    except Exception as e:
        status.send(("failed", f"{type(e).__name__}: {e}"))
        raise
    settle_heap()
    status.send(("loaded", ""))

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve_engine(engine, stop)

    run_loop(run())
    log.info("engine stopped")


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` on uvloop where it is installed (as the front-ends' uvicorn does): a cheaper loop
    for the process whose GIL time bounds the device's feed rate."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


class EngineThread:
    """The engine in a background thread of this process (tests): same sockets, slots and protocol."""

    def __init__(
        self,
        settings: ServiceSettings,
        rundir: RunDir,
        registry: CollectorRegistry,
        workers: int = 1,
        fatal: Fatal | None = None,
    ) -> None:
        self.fatal_reasons: list[str] = []  # what the engine would have died of, by default
        self.engine = Engine(
            settings, rundir, EngineMetrics(registry), workers, fatal or self.fatal_reasons.append
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._listening = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)

    def start(self, timeout: float = 120) -> None:
        self.engine.rundir.register_pid("engine")
        self.engine.load()
        self._thread.start()
        if not self._listening.wait(timeout):
            raise RuntimeError(f"engine not listening after {timeout} s")
        if self._error is not None:
            raise RuntimeError("the engine thread failed to start") from self._error

    def _main(self) -> None:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve_engine(self.engine, self._stop, self._listening)

        try:
            asyncio.run(run())
        except BaseException as e:  # surfaced by start()/stop()
            self._error = e
            self._listening.set()

    def stop(self, timeout: float = 60) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
