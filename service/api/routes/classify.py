"""``POST /classify``: admit -> read the body -> take slots -> decode into them -> engine -> response.

With device JPEG decode on, a JPEG's bytes go into its slot undecoded (``ingest.passthrough``) and the
engine decodes it; one it cannot decode comes back as that image's error, like a front-end decode error.

Every refusal is a ``ServiceError`` raised on the way and rendered by ``api.errors``; the request is
counted once, there or at the end of ``classify``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from PIL import Image

from ...errors import ServiceError, unavailable
from ...ingest.body import ImagePart, read_images
from ...ingest.passthrough import pass_through
from ...ipc.client import EngineGone
from ...ipc.protocol import ImageOutcome, Reject, Result
from ..dependencies import DEADLINE_HEADER, FrontendDep, deadline, resolve_model, resolve_tier, resolve_top_k
from ..errors import NOT_REJECTIONS, Outcome, count_request
from ..request_ids import REQUEST_ID_HEADER, request_id
from ..schemas import ClassifyResponse, ErrorDetail, ErrorResponse, ImageResult, Prediction, Timings
from ..state import Frontend, ServedModel

AUTO_DECISION_GRACE_S = 0.25  # tier=auto waits at least this long for the engine's answer (maybe a 503)

log = logging.getLogger(__name__)
router = APIRouter()

CLASSIFY_OPENAPI: dict[str, Any] = {
    # Headers read straight from the request (``dependencies.deadline``, ``request_ids``): no per-request
    # validation cost, documented here.
    "parameters": [
        {
            "name": DEADLINE_HEADER,
            "in": "header",
            "required": False,
            "description": "shortens the request's deadline (limits.deadline_ms; for tier=auto, its latency "
            "objective) to this many milliseconds; never extends it. Not a positive number: 422",
            "schema": {"type": "number", "exclusiveMinimum": 0},
            "example": 250,
        },
        {
            "name": REQUEST_ID_HEADER,
            "in": "header",
            "required": False,
            "description": "echoed in the response's X-Request-ID and the logs; one is generated when "
            "absent or not 1-128 characters of [A-Za-z0-9._:/+=@-]",
            "schema": {"type": "string", "maxLength": 128},
        },
    ],
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
            **{  # a raw body: any image/* or application/octet-stream type (ingest.body), the image sniffed
                media_type: {"schema": {"type": "string", "format": "binary"}}
                for media_type in (
                    "image/jpeg",
                    "image/png",
                    "image/webp",
                    "image/bmp",
                    "image/gif",
                    "application/octet-stream",
                )
            },
        },
    },
}

_REQUEST_ID_OUT = {REQUEST_ID_HEADER: {"description": "the request's id", "schema": {"type": "string"}}}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}

CLASSIFY_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"headers": _REQUEST_ID_OUT},
    **{
        status: {
            "model": ErrorResponse,
            "description": text,
            "headers": {**_REQUEST_ID_OUT, **(_RETRY_AFTER if status == 503 else {})},
        }
        for status, text in {
            400: "unknown tier, or raw r not allowed",
            404: "unknown model",
            408: "the body did not arrive within limits.body_timeout_s (connection closed)",
            413: "body over the size limit",
            415: "not an image / unsupported content type",
            422: "corrupt or empty image, too many pixels, bad parameter",
            500: "inference failed",
            503: "overloaded, queue full, warming up, draining or engine down (see Retry-After)",
            504: "deadline passed (spent on the body, or while queued)",
        }.items()
    },
}

_REJECT_STATUS = {"deadline": 504, "internal": 500, "bad_request": 400}


def _refusal(reject: Reject) -> ServiceError:
    status = _REJECT_STATUS.get(reject.code)
    if status is None:  # queue_full, draining, warming_up: the client should retry
        return unavailable(reject.code, reject.message)
    return ServiceError(status, reject.code, reject.message)


async def _decode(
    frontend: Frontend, model: ServedModel, parts: list[ImagePart], slots: list[int]
) -> list[ServiceError | bool]:
    """Decode each part into its slot (``ingest.lanes`` picks the thread), or pass a JPEG's bytes through
    it when the engine decodes on its device; per image, why not, or whether its slot holds a JPEG."""
    metrics = frontend.metrics
    assert frontend.decode is not None

    heavy = frontend.settings.limits.heavy_image_pixels
    short = model.preprocessor.resize_short

    async def one(part: ImagePart, slot: int) -> ServiceError | bool:
        start = time.perf_counter()

        def into_slot(img: Image.Image) -> bool:  # in a decode thread, once the header says which lane
            jpeg = model.device_jpeg and pass_through(img, part.data, model.slots[slot], heavy, short)
            if not jpeg:
                model.preprocessor.into(img, model.slots[slot])
            return jpeg

        try:
            jpeg = await frontend.decode.open_and_run(model.preprocessor.open, part.data, into_slot)
        except ServiceError as e:
            return e
        except Exception:  # a bug or MemoryError: this image fails alone, its siblings keep their slots
            log.exception("preprocessing an image failed")
            return ServiceError(500, "internal", "the image could not be preprocessed (server error)")
        finally:
            metrics.decode_backlog.dec()
        metrics.preprocess_duration.labels(model=model.name).observe(time.perf_counter() - start)
        return jpeg

    metrics.decode_backlog.inc(len(parts))
    if len(parts) == 1:
        return [await one(parts[0], slots[0])]
    return list(await asyncio.gather(*(one(p, s) for p, s in zip(parts, slots, strict=True))))


async def _wait(
    request: Request, frontend: Frontend, engine_id: int, answer: asyncio.Future, until: float, auto: bool
) -> Result:
    """The engine's answer, unless the client leaves (499) or the deadline passes (504) first. tier=auto
    refuses at once (503) a deadline it cannot meet, one that passed while the body was read and decoded
    included: its answer is awaited at least ``AUTO_DECISION_GRACE_S``, past the deadline if need be, not
    given up on with a 504 (the engine answers within that: a queued job whose deadline passes gets its
    504 when its batch forms)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    left = until - time.monotonic()
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait(
            [answer, watcher],
            timeout=max(left, AUTO_DECISION_GRACE_S) if auto else max(0.0, left),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        watcher.cancel()
    if answer in done:
        try:
            reply = answer.result()
        except EngineGone as e:
            raise unavailable("engine_down", "the inference engine stopped") from e
        if isinstance(reply, Reject):
            raise _refusal(reply)
        return reply
    frontend.engine.cancel(engine_id)  # its slots come back with the engine's final answer
    if watcher in done:
        raise ServiceError(499, "client_closed", "the client closed the connection")
    raise ServiceError(504, "deadline", "the request's deadline passed while it was queued")


def _predictions(model: ServedModel, indices: list[int], scores: list[float]) -> list[Prediction]:
    labels = model.labels
    return [Prediction(label=labels[i], index=i, score=s) for i, s in zip(indices, scores, strict=True)]


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    openapi_extra=CLASSIFY_OPENAPI,
    responses=CLASSIFY_ERRORS,
    summary="Classify one or more images",
)
async def classify(
    request: Request,
    frontend: FrontendDep,
    tier: Annotated[
        str | None, Query(description="speed/accuracy tier; see GET /tiers", examples=["fast"])
    ] = None,
    top_k: Annotated[
        int | None,
        Query(description="how many classes to return (default 5, at most limits.max_top_k)", examples=[5]),
    ] = None,
    model: Annotated[
        str | None, Query(description="model name; see GET /models", examples=["vit-base"])
    ] = None,
    r: Annotated[int | None, Query(description="raw ToMe r (only when the model's config allows it)")] = None,
) -> Response:
    """Send the image as multipart field `file` (repeat it for several images) or as a raw body with an
    image Content-Type. A deadline can be shortened with the `X-Deadline-Ms` header."""
    outcome = request.state.outcome = Outcome(request_id(request))
    frontend.check_serving()
    with frontend.admitted():
        served = resolve_model(frontend, model)
        outcome.model = served.name
        tier_key, tier_info = resolve_tier(served, tier, r)
        outcome.tier = tier_info["name"] if tier_info else str(tier_key)
        k = resolve_top_k(served, top_k)
        objective = served.info["auto"]["latency_objective_ms"] if tier_info is None else None
        until = deadline(request, frontend, objective)
        limits = frontend.settings.limits
        parts = await read_images(request, limits.max_body_bytes, limits.max_files, limits.body_timeout_s)
        auto = tier_info is None
        if not auto and time.monotonic() >= until:  # spent on the body: decoding it would serve nobody
            raise ServiceError(504, "deadline", "the deadline passed before its images were decoded")
        if auto and len(parts) > served.free.limited_size:  # never admissible: not worth a retry
            raise ServiceError(
                400,
                "bad_request",
                f"tier=auto takes at most {served.free.limited_size} images per request here "
                "(auto.max_queue_share x server.max_pending_images); send fewer, or name a tier",
            )
        slots = served.free.acquire(len(parts), limited=auto)
        if slots is None:
            raise unavailable("overloaded", "too many images decoding or queued on this worker; retry later")
        try:
            decoded = await _decode(frontend, served, parts, slots)
        except BaseException:
            served.free.release(slots)
            raise
        ok = [slot for slot, d in zip(slots, decoded, strict=True) if not isinstance(d, ServiceError)]
        jpeg = [d for d in decoded if not isinstance(d, ServiceError)]
        errors = [d if isinstance(d, ServiceError) else None for d in decoded]
        served.free.release([slot for slot, error in zip(slots, errors, strict=True) if error is not None])
        if len(parts) == 1 and errors[0] is not None:
            raise errors[0]
        for error in errors:
            if error is not None and error.code not in NOT_REJECTIONS:
                frontend.metrics.reject(error.code)
        result: Result | None = None
        if ok:
            try:
                engine_id, answer = frontend.engine.submit(
                    served.name, tier_key, until, k, ok, on_final=lambda: served.free.release(ok), jpeg=jpeg
                )
            except EngineGone as e:
                raise unavailable("engine_down", "the inference engine is not running") from e
            result = await _wait(request, frontend, engine_id, answer, until, auto=auto)
            outcome.tier = result.tier
            tier_info = tier_info or served.tiers[result.tier]
        answers = _per_image(errors, result)
        if len(parts) == 1 and isinstance(answers[0], ServiceError):  # the engine could not decode it
            raise answers[0]
        for answer_or_error, error in zip(answers, errors, strict=True):
            if isinstance(answer_or_error, ServiceError) and error is None:
                frontend.metrics.reject(answer_or_error.code)
        response = _respond(outcome, served, tier_info, parts, answers, result)
    count_request(request, outcome, 200)
    return response


def _per_image(errors: list[ServiceError | None], result: Result | None) -> list[ServiceError | ImageOutcome]:
    """Per part, in upload order: its front-end error, its engine decode error, or its outcome."""
    images = iter(result.images if result is not None else [])
    answers: list[ServiceError | ImageOutcome] = []
    for error in errors:
        if error is not None:
            answers.append(error)
            continue
        image = next(images)
        if image.error is not None:  # the same 422 a front-end decode error gives
            answers.append(ServiceError(422, "bad_image", image.error))
        else:
            answers.append(image)
    return answers


def _respond(
    outcome: Outcome,
    served: ServedModel,
    tier_info: dict | None,
    parts: list[ImagePart],
    answers: list[ServiceError | ImageOutcome],
    result: Result | None,
) -> Response:
    total_ms = (time.perf_counter() - outcome.started) * 1000
    slots: list[ImageResult] = []
    for part, image in zip(parts, answers, strict=True):
        if isinstance(image, ServiceError):
            slots.append(
                ImageResult(filename=part.filename, error=ErrorDetail(code=image.code, message=image.message))
            )
            continue
        slots.append(
            ImageResult(
                filename=part.filename,
                top_k=_predictions(served, image.indices, image.scores),
                timings=Timings(
                    queue_ms=image.queue_s * 1000, inference_ms=image.inference_s * 1000, total_ms=total_ms
                ),
                batch_size=image.batch_size,
            )
        )
    if tier_info is None:  # tier=auto and no image reached the engine: the default tier describes it
        tier_info = served.tiers.get(served.info["auto"]["tiers"][0]) or next(iter(served.tiers.values()))
    body = ClassifyResponse(
        request_id=outcome.request_id,
        model=served.name,
        tier=outcome.tier if result is not None else tier_info["name"],
        schedule=tier_info["schedule"],
        r_per_block=tier_info["r_per_block"],
        auto_reason=result.reason if result is not None else None,
    )
    if len(slots) == 1:
        body.top_k, body.timings, body.batch_size = slots[0].top_k, slots[0].timings, slots[0].batch_size
    else:
        body.results = slots
    return Response(
        body.model_dump_json(exclude_none=True),
        media_type="application/json",
        headers={REQUEST_ID_HEADER: outcome.request_id},
    )
