"""Operations: liveness, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ...errors import RETRY_AFTER_S, ServiceError
from ...observability.metrics import render
from ..dependencies import FrontendDep
from ..schemas import ErrorResponse

router = APIRouter()


@router.head("/healthz", include_in_schema=False)  # uptime checkers and some load balancers use HEAD
@router.get(
    "/healthz",
    summary="Liveness: 200 while this process and the engine run",
    responses={503: {"description": 'the engine is gone: {"status": "engine_down"}'}},
)
async def healthz(frontend: FrontendDep) -> JSONResponse:
    if not frontend.engine.connected:
        return JSONResponse({"status": "engine_down"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    summary="Readiness: 200 once every model is loaded and warm; 503 while starting, draining or engine down",
    responses={503: {"description": 'not ready: {"status": "starting" | "draining" | "engine_down"}'}},
)
async def readyz(frontend: FrontendDep) -> JSONResponse:
    if frontend.draining or frontend.engine.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if not frontend.engine.connected:
        return JSONResponse({"status": "engine_down"}, status_code=503)
    if not frontend.engine.state.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get(
    "/metrics",
    summary="Prometheus metrics of every process of the service",
    description="At most `server.max_scrapes_per_s` answers per second per front-end; more get 429.",
    response_class=PlainTextResponse,
    responses={
        429: {  # JSON like every refusal ("model" would document it under the route's text/plain)
            "description": "over server.max_scrapes_per_s (see Retry-After)",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}}
            },
        }
    },
)
async def metrics(frontend: FrontendDep) -> Response:
    if frontend.scrapes is not None and not frontend.scrapes.take():
        raise ServiceError(
            429,
            "rate_limited",
            f"/metrics answers at most {frontend.scrapes.rate:g} scrapes per second per process "
            "(server.max_scrapes_per_s)",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    return Response(render(frontend.registry, frontend.process_roles), media_type=CONTENT_TYPE_LATEST)
