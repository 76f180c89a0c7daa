"""One exception handler renders every refusal as JSON and counts it; validation errors become ours."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ServiceError
from ..observability.metrics import FrontendMetrics
from .request_ids import REQUEST_ID_HEADER, request_id
from .schemas import ErrorDetail, ErrorResponse

NOT_REJECTIONS = frozenset({"internal", "client_closed"})  # a server fault, or nobody is listening


@dataclass
class Outcome:
    """Labels of one classify request as it is resolved (``request.state.outcome``), counted once."""

    request_id: str
    model: str = "none"
    tier: str = "none"
    started: float = field(default_factory=time.perf_counter)


def error_response(error: ServiceError, request_id: str | None) -> Response:
    body = ErrorResponse(
        error=ErrorDetail(code=error.code, message=error.message, valid=error.valid), request_id=request_id
    )
    headers = dict(error.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return Response(
        body.model_dump_json(exclude_none=True),
        status_code=error.status,
        headers=headers,
        media_type="application/json",
    )


def count_request(request: Request, outcome: Outcome, status: int) -> None:
    count(request.app.state.frontend.metrics, outcome, status)


def count(metrics: FrontendMetrics, outcome: Outcome, status: int) -> None:
    labels = {"model": outcome.model, "tier": outcome.tier}
    metrics.requests.labels(**labels, status=str(status)).inc()
    if status == 200:
        metrics.request_duration.labels(**labels).observe(time.perf_counter() - outcome.started)


def refusal(
    metrics: FrontendMetrics, error: ServiceError, outcome: Outcome | None, request_id: str | None
) -> Response:
    """Count ``error`` (as a rejection unless it is a server fault or nobody listens; as the classify
    request ``outcome`` when there is one) and render it."""
    if error.code not in NOT_REJECTIONS:
        metrics.reject(error.code)
    if outcome is not None:
        count(metrics, outcome, error.status)
    return error_response(error, request_id)


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    outcome: Outcome | None = getattr(request.state, "outcome", None)
    rid = outcome.request_id if outcome else request_id(request)  # the client's if sane, else generated
    return refusal(request.app.state.frontend.metrics, exc, outcome, rid)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    if request.url.path == "/classify" and getattr(request.state, "outcome", None) is None:
        request.state.outcome = Outcome(request_id(request))
    return await service_error(request, ServiceError(422, "bad_request", details))


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such path, a method the path does not take): our shape, counted."""
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    error = ServiceError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))
    return await service_error(request, error)


async def internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: the same JSON 500, counted like every answer (Starlette's
    ServerErrorMiddleware runs this, then re-raises so the server still logs the traceback)."""
    return await service_error(request, ServiceError(500, "internal", "internal server error"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
