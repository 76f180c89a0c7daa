"""``X-Request-ID``: echoed when the client sends a sane one, generated otherwise."""

from __future__ import annotations

import itertools
import re
import uuid

from fastapi import Request

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class RequestIds:
    """Unique ids without a syscall per request: a random 16-hex-digit prefix per front-end, then a
    counter (uuid4 reads /dev/urandom every time). One per ``Frontend``."""

    def __init__(self) -> None:
        self.prefix = uuid.uuid4().hex[:16]
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


def sane(sent: str | None) -> str | None:
    """The client's request id if it is one we echo."""
    return sent if sent and _REQUEST_ID_RE.match(sent) else None


def request_id(request: Request) -> str:
    return sane(request.headers.get(REQUEST_ID_HEADER)) or request.app.state.frontend.new_request_id()
