"""``tome-serve --config FILE --host H --port P``: load the models, then serve with uvicorn.

The first SIGTERM/SIGINT drains: /readyz turns 503, new classify requests get 503, every accepted
request is answered, then uvicorn shuts down. A second signal exits at once.
"""

from __future__ import annotations

import os

# libgomp reads this once, when torch loads it, so it must be set before torch is imported. Idle
# OpenMP workers then sleep instead of spinning: with ACTIVE an idle CPU replica kept a whole core busy
# (tests/service/test_server.py checks it stays idle) and served about half as many images under load; against
# libgomp's default (spin briefly, then sleep) no difference beyond noise was measured (BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .model_loading import ModelLoadError
from .runtime import Runtime
from .settings import CONFIG_FILE_ENV, load_settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn server whose first exit signal drains the runtime before shutting down."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None or not self.started:
            self.force_exit = self._drain_task is not None
            super().handle_exit(sig, frame)
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self.runtime.begin_drain()  # readyz goes 503 from this moment
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.runtime.drain()
        self.should_exit = True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tome-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help=f"TOML or YAML settings file (or ${CONFIG_FILE_ENV})")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings(args.config)
        app = create_app(settings)
        app.state.runtime.load()  # fail fast, with one clear message, before binding the port
    except (ValidationError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"tome-serve: cannot start: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    DrainingServer(config, app.state.runtime).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
