"""``create_app``: one front-end's FastAPI app, wired to the engine through the run directory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from ..ipc.rundir import RunDir
from ..settings import ServiceSettings
from . import errors, shedding
from .routes import classify, meta, ops
from .state import Frontend

ENGINE_CONNECT_TIMEOUT_S = 60.0


def create_app(
    settings: ServiceSettings, rundir: RunDir, frontend_id: int = 0, registry: CollectorRegistry | None = None
) -> FastAPI:
    """The app of front-end ``frontend_id``: it owns that front-end's slot range and decode threads.

    ``registry`` is where its metrics register when they are not in multiprocess mode (tests pass the
    registry the in-process engine uses, so ``/metrics`` shows both).
    """
    frontend = Frontend(settings, rundir, frontend_id, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await frontend.start(timeout=ENGINE_CONNECT_TIMEOUT_S)
        try:
            yield
        finally:
            await frontend.stop()

    app = FastAPI(
        title="tome-serve",
        summary="Image classification with timm ViTs sped up by Token Merging, with per-request tiers.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.frontend = frontend
    errors.install(app)
    app.add_middleware(shedding.ShedBeforeRouting, frontend=frontend)
    app.include_router(classify.router)
    app.include_router(meta.router)
    app.include_router(ops.router)
    return app
