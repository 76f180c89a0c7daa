"""The front-end's side of the boundary: one connection to the engine, shared by every request.

Each ``submit`` gets exactly one final answer from the engine (``Result`` or ``Reject``); its
``on_final`` callback runs then, and only then, which is when the request's slots may be reused. The
request's handler may stop waiting earlier (client gone, deadline) and ``cancel``: the slots still come
back with the final answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .protocol import Cancel, Hello, Reject, Result, State, Submit, Welcome, encode, read_message

log = logging.getLogger(__name__)

CONNECT_RETRY_S = 0.05


class EngineGone(Exception):
    """The connection to the engine closed: the engine process exited."""


class EngineClient:
    def __init__(self, socket_path: Path, frontend_id: int) -> None:
        self.socket_path = socket_path
        self.frontend_id = frontend_id
        self.description: dict[str, Any] = {}
        self.state = State(ready=False, draining=False, speedups={}, batch_ms={})
        self.connected = False
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[Result | Reject], Callable[[], None]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._state_changed = asyncio.Event()
        self._lost = asyncio.Event()

    async def connect(self, timeout: float) -> None:
        """Connect (the engine may still be loading: retry until ``timeout``), say hello, read welcome."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(CONNECT_RETRY_S)
        writer.write(encode(Hello(self.frontend_id, os.getpid())))
        welcome = await read_message(reader)
        if not isinstance(welcome, Welcome):
            raise RuntimeError(f"engine answered hello with {type(welcome).__name__}")
        self.description = welcome.description
        self._writer = writer
        self.connected = True
        self._reader_task = asyncio.create_task(self._read(reader), name="engine-reader")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                message = await read_message(reader)
                if isinstance(message, State):
                    self.state = message
                    self._state_changed.set()
                elif isinstance(message, Result | Reject):
                    entry = self._pending.pop(message.request_id, None)
                    if entry is not None:
                        future, on_final = entry
                        on_final()
                        if not future.done():
                            future.set_result(message)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.error("the engine closed its connection")
            self._lost.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("reading from the engine failed")
            self._lost.set()
        finally:
            self._fail_all()

    async def wait_lost(self) -> None:
        """Return once the connection to the engine has ended other than by ``close``."""
        await self._lost.wait()

    def _fail_all(self) -> None:
        self.connected = False
        self._state_changed.set()
        pending, self._pending = self._pending, {}
        for future, on_final in pending.values():
            on_final()  # the engine is gone: nobody reads these slots any more
            if not future.done():
                future.set_exception(EngineGone())

    def submit(
        self,
        model: str,
        tier: str | int,
        deadline: float,
        top_k: int,
        slots: list[int],
        on_final: Callable[[], None],
        jpeg: list[bool] | None = None,
    ) -> tuple[int, asyncio.Future[Result | Reject]]:
        """Send one request; returns its id and a future for the engine's final answer. ``jpeg``: per
        slot, whether it holds a JPEG's bytes for the engine to decode (``ingest.passthrough``)."""
        if not self.connected or self._writer is None or self._writer.is_closing():
            on_final()
            raise EngineGone()
        request_id = next(self._ids)
        jpeg = jpeg if jpeg is not None and any(jpeg) else None  # None: every slot holds pixels
        try:
            self._writer.write(encode(Submit(request_id, model, tier, deadline, top_k, slots, jpeg)))
        except (ConnectionError, RuntimeError) as e:  # closed before the reader saw it (uvloop raises)
            on_final()
            raise EngineGone() from e
        future: asyncio.Future[Result | Reject] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, on_final)
        return request_id, future

    def cancel(self, request_id: int) -> None:
        if self.connected and self._writer is not None and request_id in self._pending:
            with contextlib.suppress(ConnectionError, RuntimeError):  # the reader fails it all next
                self._writer.write(encode(Cancel(request_id)))

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
        self._fail_all()
