"""Messages between front-ends and the engine: 4-byte big-endian length, then a msgpack array.

Front-end -> engine: ``Hello`` once, then ``Submit`` per request and ``Cancel`` when its client left or its
deadline passed. Engine -> front-end: ``Welcome`` (what the engine serves) once, ``State`` whenever
readiness, drain or measured speedups change, and exactly one final answer per ``Submit``: ``Result`` or
``Reject``. The front-end frees the request's slots on that final answer, never earlier.
"""

from __future__ import annotations

import asyncio
from enum import IntEnum
from typing import Any, NamedTuple

import msgpack

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Kind(IntEnum):
    HELLO = 1
    SUBMIT = 2
    CANCEL = 3
    WELCOME = 10
    STATE = 11
    RESULT = 12
    REJECT = 13


class Hello(NamedTuple):
    frontend_id: int
    pid: int


class Submit(NamedTuple):
    request_id: int
    model: str
    tier: str | int  # a configured tier's name, "auto", or an int for a raw ?r=
    deadline: float  # time.monotonic() seconds: CLOCK_MONOTONIC, the same clock in every process
    top_k: int
    slots: list[int]
    jpeg: list[bool] | None = None  # per slot: holds a JPEG's bytes for the engine to decode (ipc.slots)


class Cancel(NamedTuple):
    request_id: int


class Welcome(NamedTuple):
    description: dict[str, Any]  # service.engine.description: models, tiers, labels, slot files


class State(NamedTuple):
    ready: bool
    draining: bool
    speedups: dict[str, dict[str, float]]  # model -> tier -> measured speedup over exact
    batch_ms: dict[str, dict[str, dict[int, float]]]  # model -> tier -> batch size -> ms, at warm-up


class ImageOutcome(NamedTuple):
    queue_s: float
    inference_s: float
    batch_size: int
    indices: list[int]
    scores: list[float]
    error: str | None = None  # the engine could not decode this image (a pass-through JPEG): 422 for it


class Result(NamedTuple):
    request_id: int
    tier: str  # the tier that served it (auto's choice, for tier=auto)
    reason: str | None  # why auto chose that tier; None otherwise
    images: list[ImageOutcome]


class Reject(NamedTuple):
    """``code``: queue_full, draining, warming_up, deadline, cancelled, internal, bad_request."""

    request_id: int
    code: str
    message: str


Message = Hello | Submit | Cancel | Welcome | State | Result | Reject
_TYPES: dict[Kind, type] = {
    Kind.HELLO: Hello,
    Kind.SUBMIT: Submit,
    Kind.CANCEL: Cancel,
    Kind.WELCOME: Welcome,
    Kind.STATE: State,
    Kind.RESULT: Result,
    Kind.REJECT: Reject,
}
_KINDS = {cls: kind for kind, cls in _TYPES.items()}


def encode(message: Message) -> bytes:
    """One frame: length prefix + msgpack ``[kind, *fields]``."""
    body = msgpack.packb([_KINDS[type(message)], *message])
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes) -> Message:
    kind, *fields = msgpack.unpackb(body, strict_map_key=False)
    cls = _TYPES[Kind(kind)]
    if cls is Result:
        request_id, tier, reason, images = fields
        return Result(request_id, tier, reason, [ImageOutcome(*image) for image in images])
    return cls(*fields)


async def read_message(reader: asyncio.StreamReader) -> Message:
    """The next message; raises ``asyncio.IncompleteReadError`` at end of stream."""
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {size} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    return decode(await reader.readexactly(size))
