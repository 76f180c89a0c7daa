"""Load shedding before FastAPI runs: a classify request that would be refused before any of its work
(the front-end full, draining, the engine down or warming up) gets its 503 without routing.

Under overload most requests are such refusals, and each one costs the CPU that admitted requests need.
Through the route they pay for Starlette's request object, FastAPI's parameter validation and
dependencies, and the exception handler. Two places answer them earlier, rendered and counted the same
way (``api.errors``) by ``early_refusal``:

- ``api.http_guard``'s protocol, as soon as a request's headers are in: no ASGI task, scope or
  middleware; it writes the answer and discards the body (measured: ``loadtest.reliability --probes
  refusal_cost``, RELIABILITY.md);
- ``ShedBeforeRouting``, this ASGI middleware, for what reaches the app anyway (a request pipelined
  behind another, or the app served by another server or a test client).

The route still checks again when it admits the request, so both are only faster paths to its answer.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Outcome, refusal
from .http_guard import EarlyAnswer
from .request_ids import REQUEST_ID_HEADER, sane
from .state import Frontend

_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


def early_refusal(frontend: Frontend, headers: list[tuple[bytes, bytes]]) -> Response | None:
    """The 503 a classify request with these (lower-cased) headers gets before any of its work, counted;
    None when it may go on."""
    error = frontend.early_refusal()
    if error is None:
        return None
    outcome = Outcome(_request_id(frontend, headers))
    return refusal(frontend.metrics, error, outcome, outcome.request_id)


def protocol_shedder(frontend: Frontend) -> EarlyAnswer:
    """``early_refusal`` for ``http_guard.guarded_protocol(answer_early=...)``: POST /classify only."""

    def answer_early(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> Response | None:
        if path != b"/classify" or method != b"POST":
            return None
        return early_refusal(frontend, headers)

    return answer_early


class ShedBeforeRouting:
    """Pure ASGI middleware (no ``BaseHTTPMiddleware``: it would cost more than it saves)."""

    def __init__(self, app: ASGIApp, frontend: Frontend) -> None:
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/classify" and scope["method"] == "POST":
            response = early_refusal(self.frontend, scope["headers"])
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _request_id(frontend: Frontend, headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == _REQUEST_ID_KEY:
            return sane(value.decode("latin-1")) or frontend.new_request_id()
    return frontend.new_request_id()
