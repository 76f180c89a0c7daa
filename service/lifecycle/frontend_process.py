"""A front-end's life: serve HTTP on the supervisor's listening socket; on SIGTERM drain, then exit.

Front-ends import no torch (it costs ~4 s and ~700 MB per process): HTTP, bodies, decoding and resizing
need only FastAPI, Pillow and NumPy.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from ..api.app import create_app
from ..api.http_guard import guarded_protocol
from ..api.shedding import protocol_shedder
from ..api.state import Frontend
from ..ipc.rundir import RunDir
from ..settings import ServiceSettings
from .process import configure_child, settle_heap

log = logging.getLogger(__name__)

ENGINE_LOST_GRACE_S = 3.0  # longer than the supervisor's grace after the engine's death


class DrainingServer(uvicorn.Server):
    """uvicorn whose SIGTERM drains first: /readyz turns 503, new requests get 503 with
    ``Connection: close``, admitted ones are answered (at most ``drain_timeout_s``), then uvicorn closes
    the remaining connections (at most ``timeout_graceful_shutdown``). SIGINT is the supervisor's."""

    def __init__(
        self,
        config: uvicorn.Config,
        frontend: Frontend,
        drain_timeout_s: float,
        engine_lost_grace_s: float = ENGINE_LOST_GRACE_S,
    ) -> None:
        super().__init__(config)
        self.frontend = frontend
        self.drain_timeout_s = drain_timeout_s
        self.engine_lost_grace_s = engine_lost_grace_s
        self.engine_lost = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        watcher = self._loop.create_task(self._exit_when_the_engine_is_lost())
        try:
            await super().serve(sockets)
        finally:
            watcher.cancel()

    async def _exit_when_the_engine_is_lost(self) -> None:
        """A connection that ends while the engine lives (it dropped this front-end) would leave this
        process answering 503 engine_down for good: exit, and the supervisor starts it again, connected.
        Where the engine died, the supervisor acts first (its grace is shorter) and stops the service."""
        await self.frontend.engine.wait_lost()
        if self._draining or self.should_exit:
            return
        await asyncio.sleep(self.engine_lost_grace_s)  # meanwhile requests get 503 engine_down
        if self._draining:
            return
        log.error("the connection to the engine ended: exiting, for the supervisor to start this again")
        self.engine_lost = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT:
            return
        if not self.started:  # still connecting to the engine: nothing admitted, nothing to drain
            # Exit here and now: a SystemExit raised from this handler would fail the app's start-up, which
            # uvicorn logs as an ERROR traceback (seen when a rolling restart stops a just-started pod).
            log.info("stopped while starting")
            sys.stderr.flush()
            os._exit(0)
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        self.frontend.draining = True  # at once: the next /readyz and /classify already see it
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))  # type: ignore[union-attr]

    async def _drain_then_exit(self) -> None:
        await self.frontend.drain(self.drain_timeout_s)
        self.should_exit = True


def frontend_main(
    settings: ServiceSettings,
    run_path: str,
    frontend_id: int,
    sockets: list[socket.socket],
    log_level: str,
) -> None:
    """Entry point of front-end process ``frontend_id`` (spawned by the supervisor)."""
    role = f"frontend-{frontend_id}"
    configure_child(role, log_level)
    rundir = RunDir.join(Path(run_path))
    rundir.register_pid(role)
    app = create_app(settings, rundir, frontend_id)
    limits, metrics = settings.limits, app.state.frontend.metrics
    config = uvicorn.Config(
        app,
        http=guarded_protocol(
            limits.header_timeout_s,
            limits.max_header_bytes,
            metrics.reject,
            write_timeout_s=limits.body_timeout_s,
            new_request_id=app.state.frontend.new_request_id,
            answer_early=protocol_shedder(app.state.frontend),
        ),
        log_level=log_level,
        log_config=None,  # uvicorn's loggers propagate to ours: one format, with the role
        access_log=False,
        ws="none",  # no WebSocket routes: an Upgrade is served as plain HTTP (see http_guard)
        timeout_graceful_shutdown=settings.server.graceful_shutdown_s,
    )
    server = DrainingServer(config, app.state.frontend, settings.limits.drain_timeout_s)
    settle_heap()
    server.run(sockets=sockets)
    if server.engine_lost:
        sys.exit(1)
