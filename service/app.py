"""FastAPI app: ``create_app(settings)`` builds one service instance with its own state and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .batcher import DeadlineExceeded, Draining, Job, JobResult, QueueFull, TierQueue
from .http_body import BodyRejected, ImagePart, read_images
from .metrics import Metrics
from .model_loading import LoadedModel
from .preprocess import ImageRejected
from .runtime import Runtime
from .schemas import (
    ClassifyResponse,
    ErrorDetail,
    ErrorResponse,
    ImageResult,
    ModelDescription,
    ModelTiers,
    Prediction,
    TierDescription,
    Timings,
)
from .settings import ServiceSettings
from .tiers import Tier

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
DEADLINE_HEADER = "X-Deadline-Ms"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
RETRY_AFTER_S = "1"


class ApiError(Exception):
    """A request the service refuses; becomes a JSON error and a ``tome_rejections_total`` count."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        valid: list[str] | None = None,
        headers: dict[str, str] | None = None,
        counted: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.valid = status, code, message, valid
        self.headers = headers or {}
        self.counted = counted  # already in tome_rejections_total


class ClientGone(Exception):
    """The client disconnected before its batch started."""


@dataclass
class _Outcome:
    """Labels and status of one classify request, filled in as it is resolved."""

    request_id: str
    model: str = "none"
    tier: str = "none"
    status: int = 200
    started: float = field(default_factory=time.perf_counter)


def _request_id(request: Request) -> str:
    sent = request.headers.get(REQUEST_ID_HEADER)
    return sent if sent and _REQUEST_ID_RE.match(sent) else uuid.uuid4().hex


def _error_response(error: ApiError, request_id: str | None) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorDetail(code=error.code, message=error.message, valid=error.valid), request_id=request_id
    )
    headers = dict(error.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(body.model_dump(exclude_none=True), status_code=error.status, headers=headers)


def _top_k(probs: torch.Tensor, k: int, labels: tuple[str, ...]) -> list[Prediction]:
    scores, indices = probs.topk(k)
    return [
        Prediction(label=labels[i], index=i, score=s)
        for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
    ]


CLASSIFY_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (JPEG, PNG, WebP, BMP, GIF)",
                        }
                    },
                    "required": ["file"],
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


CLASSIFY_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "unknown tier, or raw r not allowed",
        404: "unknown model",
        413: "body over the size limit",
        415: "not an image / unsupported content type",
        422: "corrupt or empty image, too many pixels, bad parameter",
        503: "queue full, warming up or draining (see Retry-After)",
        504: "deadline passed while queued",
    }.items()
}


def create_app(settings: ServiceSettings) -> FastAPI:
    """One service instance: its own runtime, metrics registry and lifespan."""
    metrics = Metrics()
    runtime = Runtime(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="tome-serve",
        summary="Image classification with timm ViTs sped up by Token Merging, with per-request tiers.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.reject("bad_request")
        request_id = _request_id(request)
        if request.url.path == "/classify":
            metrics.requests.labels(model="none", tier="none", status="422").inc()
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return _error_response(ApiError(422, "bad_request", details), request_id)

    def resolve_model(name: str | None) -> LoadedModel:
        name = name or settings.default_model
        if name not in runtime.models:
            raise ApiError(404, "unknown_model", f"unknown model {name!r}", valid=sorted(runtime.models))
        return runtime.models[name]

    def resolve_tier(loaded: LoadedModel, tier: str | None, r: int | None) -> tuple[Tier, TierQueue]:
        if r is not None:
            if not loaded.spec.allow_raw_r:
                raise ApiError(
                    400, "bad_request", f"raw r is not enabled for model {loaded.name!r}; use tier="
                )
            if tier is not None:
                raise ApiError(400, "bad_request", "give either tier= or r=, not both")
            try:
                return runtime.raw_tier(loaded, r)
            except ValueError as e:
                raise ApiError(422, "bad_request", str(e)) from e
        name = tier or loaded.spec.default_tier
        if name not in loaded.tiers:
            raise ApiError(
                400,
                "unknown_tier",
                f"unknown tier {name!r} for model {loaded.name!r}",
                valid=list(loaded.tiers),
            )
        return loaded.tiers[name], runtime.queues[(loaded.name, name)]

    def deadline_of(request: Request, arrived: float) -> float:
        budget_ms = settings.limits.deadline_ms
        sent = request.headers.get(DEADLINE_HEADER)
        if sent is not None:
            try:
                asked = float(sent)
            except ValueError:
                asked = -1.0
            if not asked > 0:
                raise ApiError(
                    422, "bad_request", f"{DEADLINE_HEADER} must be a positive number of milliseconds"
                )
            budget_ms = min(budget_ms, asked)  # a client may shorten the deadline, never extend it
        return arrived + budget_ms / 1000

    async def preprocess(loaded: LoadedModel, parts: list[ImagePart]) -> list[torch.Tensor | ImageRejected]:
        loop = asyncio.get_running_loop()
        preprocessor = runtime.preprocessors[loaded.name]

        async def one(part: ImagePart) -> torch.Tensor | ImageRejected:
            try:
                return await loop.run_in_executor(runtime.decode_pool, preprocessor, part.data)
            except ImageRejected as e:
                metrics.reject(e.reason)
                return e

        return list(await asyncio.gather(*(one(p) for p in parts)))

    async def wait_for_jobs(request: Request, jobs: list[Job], deadline: float) -> list[JobResult]:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(disconnected())
        try:
            while not all(job.future.done() for job in jobs):
                waiting = [job for job in jobs if not job.started]
                timeout = max(0.0, deadline - time.monotonic()) if waiting else None
                pending = [job.future for job in jobs if not job.future.done()]
                done, _ = await asyncio.wait(
                    [*pending, watcher], timeout=timeout, return_when="FIRST_COMPLETED"
                )
                if watcher in done:
                    for job in waiting:
                        job.abandoned = True
                    raise ClientGone()
                if not done and any(not job.started for job in jobs):
                    for job in jobs:
                        job.abandoned = not job.started
                    raise DeadlineExceeded()
            return [job.future.result() for job in jobs]
        finally:
            watcher.cancel()

    async def classify_images(
        request: Request, outcome: _Outcome, model: str | None, tier: str | None, r: int | None, top_k: int
    ) -> ClassifyResponse:
        arrived = time.monotonic()
        if runtime.draining:
            raise ApiError(
                503, "draining", "the service is shutting down", headers={"Retry-After": RETRY_AFTER_S}
            )
        if not runtime.ready:
            raise ApiError(
                503, "warming_up", "the service is warming up", headers={"Retry-After": RETRY_AFTER_S}
            )
        loaded = resolve_model(model)
        outcome.model = loaded.name
        resolved_tier, queue = resolve_tier(loaded, tier, r)
        outcome.tier = resolved_tier.name
        if not 1 <= top_k <= loaded.num_classes:
            raise ApiError(
                422, "bad_request", f"top_k must be between 1 and {loaded.num_classes}, got {top_k}"
            )
        deadline = deadline_of(request, arrived)
        limits = settings.limits
        try:
            parts = await read_images(request, limits.max_body_bytes, limits.max_files)
        except BodyRejected as e:
            raise ApiError(e.status, e.reason, e.message) from e
        tensors = await preprocess(loaded, parts)
        if len(parts) == 1 and isinstance(tensors[0], ImageRejected):
            err = tensors[0]  # already counted in tome_rejections_total by preprocess
            raise ApiError(err.status, err.reason, err.message, counted=True)
        batcher = runtime.batcher_for(loaded)
        jobs: list[Job] = []
        try:
            for t in tensors:
                if isinstance(t, torch.Tensor):
                    jobs.append(batcher.submit(queue, t, deadline))
        except (QueueFull, Draining) as e:
            for job in jobs:
                job.abandoned = True
            if isinstance(e, Draining):
                raise ApiError(
                    503, "draining", "the service is shutting down", headers={"Retry-After": RETRY_AFTER_S}
                ) from e
            raise ApiError(
                503,
                "queue_full",
                f"the queue for {loaded.name}/{resolved_tier.name} is full; retry later",
                headers={"Retry-After": RETRY_AFTER_S},
            ) from e
        try:
            results = iter(await wait_for_jobs(request, jobs, deadline))
        except DeadlineExceeded as e:
            raise ApiError(504, "deadline", "the request's deadline passed while it was queued") from e
        total_ms = (time.perf_counter() - outcome.started) * 1000
        slots: list[ImageResult] = []
        for part, t in zip(parts, tensors, strict=True):
            if isinstance(t, ImageRejected):
                slots.append(
                    ImageResult(filename=part.filename, error=ErrorDetail(code=t.reason, message=t.message))
                )
                continue
            res = next(results)
            slots.append(
                ImageResult(
                    filename=part.filename,
                    top_k=_top_k(res.probs, top_k, runtime.labels[loaded.name]),
                    timings=Timings(
                        queue_ms=res.queue_s * 1000, inference_ms=res.inference_s * 1000, total_ms=total_ms
                    ),
                    batch_size=res.batch_size,
                )
            )
        response = ClassifyResponse(
            request_id=outcome.request_id,
            model=loaded.name,
            tier=resolved_tier.name,
            schedule=resolved_tier.describe_schedule(),
            r_per_block=list(resolved_tier.info.r_per_block),
        )
        if len(slots) == 1:
            response.top_k, response.timings, response.batch_size = (
                slots[0].top_k,
                slots[0].timings,
                slots[0].batch_size,
            )
        else:
            response.results = slots
        return response

    @app.post(
        "/classify",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        openapi_extra=CLASSIFY_OPENAPI,
        responses=CLASSIFY_ERRORS,
        summary="Classify one or more images",
    )
    async def classify(
        request: Request,
        tier: Annotated[
            str | None, Query(description="speed/accuracy tier; see GET /tiers", examples=["fast"])
        ] = None,
        top_k: Annotated[int, Query(description="how many classes to return", examples=[5])] = 5,
        model: Annotated[
            str | None, Query(description="model name; see GET /models", examples=["vit-base"])
        ] = None,
        r: Annotated[
            int | None, Query(description="raw ToMe r (only when the model's config allows it)")
        ] = None,
    ) -> Response:
        """Send the image as multipart field `file` (repeat it for several images) or as a raw body with an
        image Content-Type. A deadline can be shortened with the `X-Deadline-Ms` header."""
        outcome = _Outcome(_request_id(request))
        runtime.request_started()
        try:
            body = await classify_images(request, outcome, model, tier, r, top_k)
            response: Response = JSONResponse(body.model_dump(exclude_none=True))
            response.headers[REQUEST_ID_HEADER] = outcome.request_id
        except ApiError as e:
            if not e.counted:
                metrics.reject(e.code)
            outcome.status = e.status
            response = _error_response(e, outcome.request_id)
        except ClientGone:
            outcome.status = 499  # nginx's "client closed request": nobody reads this response
            response = Response(status_code=499)
        except Exception:  # a failed batch (e.g. out of device memory): a JSON 500, counted, logged
            log.exception("classify %s failed", outcome.request_id)
            outcome.status = 500
            response = _error_response(ApiError(500, "internal", "inference failed"), outcome.request_id)
        finally:
            runtime.request_finished()
        labels = {"model": outcome.model, "tier": outcome.tier}
        metrics.requests.labels(**labels, status=str(outcome.status)).inc()
        metrics.request_duration.labels(**labels).observe(time.perf_counter() - outcome.started)
        return response

    @app.get("/tiers", summary="Tiers of every model", response_model=dict[str, ModelTiers])
    async def tiers() -> dict[str, ModelTiers]:
        out = {}
        for name, loaded in runtime.models.items():
            speedups = runtime.speedups.get(name, {})
            out[name] = ModelTiers(
                default_tier=loaded.spec.default_tier,
                raw_r_allowed=loaded.spec.allow_raw_r,
                raw_r_max=runtime.raw_r_max(loaded),
                tiers=[
                    TierDescription(
                        name=t.name,
                        schedule=t.describe_schedule(),
                        r_per_block=list(t.info.r_per_block),
                        tokens_after_last_block=t.info.tokens_after_block[-1],
                        gflops=t.info.gflops,
                        speedup_vs_exact=speedups.get(t.name),
                    )
                    for t in loaded.tiers.values()
                ],
            )
        return out

    @app.get("/models", summary="Loaded models", response_model=list[ModelDescription])
    async def models() -> list[ModelDescription]:
        return [
            ModelDescription(
                name=m.name,
                architecture=m.spec.architecture,
                weights_source=m.weights_source,
                random_weights=m.spec.weights == "random",
                device=str(m.device),
                dtype=str(m.dtype).removeprefix("torch."),
                num_classes=m.num_classes,
                input_size=list(m.input_size),
                default=m.name == settings.default_model,
            )
            for m in runtime.models.values()
        ]

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once every model is loaded and warm; 503 while draining")
    async def readyz() -> JSONResponse:
        if runtime.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not runtime.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(runtime.cuda_devices()), media_type=CONTENT_TYPE_LATEST)

    return app
