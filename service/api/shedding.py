"""Load shedding before FastAPI runs: a classify request that would be refused before any of its work
(the front-end full, draining, the engine down or warming up) gets its 503 from this ASGI middleware.

Under overload most requests are such refusals, and each one costs the CPU that admitted requests need.
Through the route they pay for Starlette's request object, FastAPI's parameter validation and
dependencies, and the exception handler; here they cost a look at the front-end's counters and one
small response (measured: ``loadtest.reliability --probes overload``, RELIABILITY.md). The body is
never read: uvicorn discards it on a kept-alive connection, as for any early answer. The route still
checks again when it admits the request, so this is only a faster path to the same answer, rendered
and counted the same way (``api.errors``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Outcome, refusal
from .request_ids import REQUEST_ID_HEADER, sane
from .state import Frontend

_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower().encode()


class ShedBeforeRouting:
    """Pure ASGI middleware (no ``BaseHTTPMiddleware``: it would cost more than it saves)."""

    def __init__(self, app: ASGIApp, frontend: Frontend) -> None:
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/classify" and scope["method"] == "POST":
            error = self.frontend.early_refusal()
            if error is not None:
                outcome = Outcome(self._request_id(scope))
                response = refusal(self.frontend.metrics, error, outcome, outcome.request_id)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _request_id(self, scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == _REQUEST_ID_KEY:
                return sane(value.decode("latin-1")) or self.frontend.new_request_id()
        return self.frontend.new_request_id()
