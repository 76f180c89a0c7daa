"""A front-end process whose connection to the engine ends while the engine lives exits, for the
supervisor to start it again connected (instead of answering 503 engine_down for good)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import uvicorn

from service.lifecycle.frontend_process import DrainingServer
from tests.processes import free_port


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
