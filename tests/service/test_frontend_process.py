"""A front-end process whose connection to the engine ends while the engine lives exits, for the
supervisor to start it again connected (instead of answering 503 engine_down for good); one stopped while
it starts exits quietly."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn

from service.ipc.rundir import RunDir
from service.lifecycle.frontend_process import DrainingServer, frontend_main
from tests.processes import free_port

from .conftest import tiny_settings


async def _app(scope: dict, receive: object, send: object) -> None:  # a bare ASGI app: lifespan only
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":  # type: ignore[operator]
            await send({"type": "lifespan.startup.complete"})  # type: ignore[operator]
        await send({"type": "lifespan.shutdown.complete"})  # type: ignore[operator]


class _Engine:
    def __init__(self, lost_after_s: float | None) -> None:
        self.lost_after_s = lost_after_s

    async def wait_lost(self) -> None:
        if self.lost_after_s is None:
            await asyncio.Event().wait()  # never
        await asyncio.sleep(self.lost_after_s)


def _serve(lost_after_s: float | None, until_s: float) -> tuple[DrainingServer, float]:
    config = uvicorn.Config(_app, host="127.0.0.1", port=free_port(), log_level="warning")
    frontend = SimpleNamespace(engine=_Engine(lost_after_s), draining=False)
    server = DrainingServer(config, frontend, drain_timeout_s=1, engine_lost_grace_s=0.2)  # type: ignore[arg-type]

    async def main() -> float:
        start = time.monotonic()
        serving = asyncio.create_task(server.serve())
        done, _ = await asyncio.wait([serving], timeout=until_s)
        if not done:
            server.should_exit = True
            await serving
        return time.monotonic() - start

    return server, asyncio.run(main())


def test_a_front_end_that_lost_its_engine_connection_exits() -> None:
    server, took = _serve(lost_after_s=0.3, until_s=10)
    assert server.engine_lost and took < 5


def test_a_front_end_with_its_engine_keeps_serving() -> None:
    server, took = _serve(lost_after_s=None, until_s=1.5)
    assert not server.engine_lost and took >= 1.5


def test_a_front_end_stopped_while_it_starts_exits_quietly(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM while a front-end still connects to the engine (a rolling restart stopping a pod that just
    started) ends it at once with status 0 and no traceback. A SystemExit raised from the signal handler
    failed the app's start-up instead, which uvicorn logged as an ERROR traceback."""
    rundir = RunDir.create(tmp_path)
    engine = socket.socket(socket.AF_UNIX)  # an engine that accepts and never welcomes
    engine.bind(str(rundir.socket))
    engine.listen()
    port = socket.create_server(("127.0.0.1", free_port()))
    process = multiprocessing.get_context("spawn").Process(
        target=frontend_main, args=(tiny_settings(), str(rundir.path), 0, [port], "info")
    )
    try:
        process.start()
        engine.settimeout(60)
        conn, _ = engine.accept()  # the front-end is in its start-up now, waiting for the welcome
        time.sleep(0.2)
        process.terminate()
        process.join(10)
        conn.close()
        assert process.exitcode == 0, process.exitcode
    finally:
        if process.is_alive():
            process.kill()
        engine.close()
        port.close()
        rundir.remove()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "startup failed" not in err, err
