"""The engine's side of the boundary: a Unix-socket server, one connection per front-end process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from pathlib import Path

from ..ipc.protocol import Cancel, Hello, Message, State, Submit, Welcome, encode, read_message
from .engine import Engine

log = logging.getLogger(__name__)


class _Connection:
    def __init__(self, conn_id: int, writer: asyncio.StreamWriter) -> None:
        self.id = conn_id
        self.writer = writer
        self.frontend: int | None = None

    def send(self, message: Message) -> None:
        if not self.writer.is_closing():
            self.writer.write(encode(message))


class EngineServer:
    """Accepts front-ends, answers their hello with the engine's description, relays submits/cancels."""

    def __init__(self, engine: Engine, path: Path) -> None:
        self.engine = engine
        self.path = path
        self._ids = itertools.count(1)
        self._connections: dict[int, _Connection] = {}
        self._server: asyncio.AbstractServer | None = None
        engine.on_state(self._broadcast)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        self.path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections.values()):
            conn.writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _broadcast(self, state: State) -> None:
        for conn in self._connections.values():
            if conn.frontend is not None:  # not before its Welcome: a front-end reads that first
                conn.send(state)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(next(self._ids), writer)
        self._connections[conn.id] = conn
        try:
            while True:
                message = await read_message(reader)
                if isinstance(message, Submit):
                    self.engine.submit(
                        conn.id, message.request_id, message.model, message.tier, message.deadline,
                        message.top_k, message.slots, conn.send, message.jpeg,
                    )  # fmt: skip
                elif isinstance(message, Cancel):
                    self.engine.cancel(conn.id, message.request_id)
                elif isinstance(message, Hello):
                    conn.frontend = message.frontend_id
                    conn.send(Welcome(self.engine.description()))
                    conn.send(self.engine.state())
                else:
                    log.warning("unexpected %s from front-end %s", type(message).__name__, conn.frontend)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front-end exited
        except Exception:
            log.exception("connection to front-end %s failed", conn.frontend)
        finally:
            del self._connections[conn.id]
            self.engine.cancel_connection(conn.id)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
