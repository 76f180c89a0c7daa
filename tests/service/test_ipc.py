"""The front-end/engine wire format: length-prefixed msgpack messages, however the bytes arrive."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from service.engine.connections import EngineServer
from service.ipc.client import EngineClient, EngineGone
from service.ipc.protocol import (
    MAX_MESSAGE_BYTES,
    Cancel,
    Hello,
    ImageOutcome,
    Reject,
    Result,
    State,
    Submit,
    Welcome,
    encode,
    read_message,
)

SAMPLE = [
    Hello(1, 4242),
    Welcome({"default_model": "m", "models": [{"name": "m", "labels": ["a", "b"]}]}),
    State(True, False, {"m": {"fast": 1.6}}, {"m": {"fast": {1: 2.5, 16: 9.0}}}),
    Submit(7, "m", "fast", 123.5, 5, [0, 3], [True, False]),
    Submit(8, "m", 13, 124.0, 1, [1]),
    Cancel(7),
    Result(
        8,
        "fast",
        "fits",
        [ImageOutcome(0.01, 0.02, 2, [3, 1], [0.9, 0.05]), ImageOutcome(0, 0, 2, [], [], "bad")],
    ),
    Reject(9, "queue_full", "full"),
]


async def _read_all(chunks: list[bytes]) -> list[object]:
    """Every message until the stream ends; a message cut short by the end raises."""
    reader = asyncio.StreamReader()

    async def feed() -> None:
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)  # let the reader wait for the rest, as with a real socket
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    out: list[object] = []
    try:
        while not (reader.at_eof() and feeder.done()):
            out.append(await read_message(reader))
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
    await feeder
    return out


def test_messages_survive_any_split_of_the_stream() -> None:
    stream = b"".join(encode(m) for m in SAMPLE)
    whole = asyncio.run(_read_all([stream]))
    assert whole == SAMPLE
    one_byte_at_a_time = asyncio.run(_read_all([stream[i : i + 1] for i in range(len(stream))]))
    assert one_byte_at_a_time == SAMPLE
    assert isinstance(whole[6], Result) and whole[6].images[1].error == "bad"


def test_a_message_over_the_limit_is_refused_before_its_body_is_read() -> None:
    header = (MAX_MESSAGE_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(ValueError, match="over the"):
        asyncio.run(_read_all([encode(Cancel(1)), header]))


def test_a_message_cut_short_by_the_writer_closing_raises() -> None:
    stream = encode(Cancel(1)) + encode(Cancel(2))[:-1]
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(_read_all([stream]))


class _StateOnlyEngine:
    """What EngineServer needs of an engine, with a state change to broadcast at will."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[State], None]] = []

    def on_state(self, listener: Callable[[State], None]) -> None:
        self.listeners.append(listener)

    def description(self) -> dict:
        return {"models": []}

    def state(self) -> State:
        return State(True, False, {}, {})

    def publish(self) -> None:  # as the engine does at the end of warm-up and when draining
        for listener in self.listeners:
            listener(self.state())

    def cancel_connection(self, conn_id: int) -> None:
        pass


def test_a_state_change_before_a_front_ends_hello_does_not_precede_its_welcome() -> None:
    """Front-ends connect while the engine warms up; a connection accepted but not yet greeted must
    not receive the end-of-warm-up State first (the front-end reads Welcome first and failed to start)."""

    async def main(path: Path) -> list[object]:
        engine = _StateOnlyEngine()
        server = EngineServer(engine, path)  # type: ignore[arg-type]
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            await asyncio.sleep(0.05)  # accepted by the server, no hello yet
            engine.publish()
            writer.write(encode(Hello(1, os.getpid())))
            first = [await asyncio.wait_for(read_message(reader), 5) for _ in range(2)]
            writer.close()
            client = EngineClient(path, 2)  # the real client against the same server
            await client.connect(5)
            engine.publish()
            await asyncio.sleep(0.05)
            assert client.connected and client.state.ready
            await client.close()
            return first
        finally:
            await server.close()

    with tempfile.TemporaryDirectory() as d:
        first, second = asyncio.run(main(Path(d) / "engine.sock"))
    assert isinstance(first, Welcome) and isinstance(second, State), (first, second)


class _BrokenWriter:
    """A writer whose engine end is gone; uvloop raises RuntimeError on a write to a closed transport."""

    def __init__(self, closing: bool) -> None:
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation on <UnixTransport closed=True>")


@pytest.mark.parametrize("closing", [False, True], ids=["write-raises", "closing"])
def test_a_submit_after_the_engine_went_away_is_engine_gone_with_its_slots_freed(closing: bool) -> None:
    """Before the reader task has seen the engine's end, a submit must still be an EngineGone (the route's
    503), not an exception the route does not expect, and give its slots back once."""

    async def main() -> None:
        client = EngineClient(Path("/nonexistent"), 1)
        client.connected, client._writer = True, _BrokenWriter(closing)  # type: ignore[assignment]
        freed: list[int] = []
        with pytest.raises(EngineGone):
            client.submit("m", "exact", 0.0, 5, [3], on_final=lambda: freed.append(3))
        assert freed == [3] and not client._pending
        client._pending[7] = (asyncio.get_running_loop().create_future(), lambda: None)
        client.cancel(7)  # does not raise either: the reader fails what is pending

    asyncio.run(main())


def test_wait_lost_tells_a_dropped_connection_from_one_the_client_closed() -> None:
    async def main(path: Path) -> None:
        server = EngineServer(_StateOnlyEngine(), path)  # type: ignore[arg-type]
        await server.start()
        closed_here, dropped = EngineClient(path, 1), EngineClient(path, 2)
        await closed_here.connect(5)
        await dropped.connect(5)
        await closed_here.close()
        await server.close()  # the engine ends every connection it still has
        await asyncio.wait_for(dropped.wait_lost(), 5)
        assert not dropped.connected
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(closed_here.wait_lost(), 0.2)

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(main(Path(d) / "engine.sock"))
