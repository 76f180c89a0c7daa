"""Request-scoped values the routes depend on (FastAPI dependencies)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from ..errors import ServiceError
from .state import Frontend, ServedModel

DEADLINE_HEADER = "X-Deadline-Ms"


async def get_frontend(request: Request) -> Frontend:
    """``async`` on purpose: FastAPI runs a plain ``def`` dependency in a worker thread."""
    return request.app.state.frontend


FrontendDep = Annotated[Frontend, Depends(get_frontend)]


def deadline(request: Request, frontend: Frontend, objective_ms: float | None = None) -> float:
    """Absolute ``time.monotonic()`` deadline: the configured budget, shortened by ``X-Deadline-Ms``, else
    by ``objective_ms`` (tier=auto's latency objective: auto's deadline when the request sends none)."""
    budget_ms = frontend.settings.limits.deadline_ms
    sent = request.headers.get(DEADLINE_HEADER)
    if sent is not None:
        try:
            asked = float(sent)
        except ValueError:
            asked = -1.0
        if not asked > 0:
            raise ServiceError(
                422, "bad_request", f"{DEADLINE_HEADER} must be a positive number of milliseconds"
            )
        budget_ms = min(budget_ms, asked)  # a client may shorten the deadline, never extend it
    elif objective_ms is not None:
        budget_ms = min(budget_ms, objective_ms)
    return time.monotonic() + budget_ms / 1000


def resolve_model(frontend: Frontend, name: str | None) -> ServedModel:
    name = name or frontend.default_model
    if name not in frontend.models:
        raise ServiceError(404, "unknown_model", f"unknown model {name!r}", valid=sorted(frontend.models))
    return frontend.models[name]


AUTO = "auto"


def resolve_tier(model: ServedModel, tier: str | None, r: int | None) -> tuple[str | int, dict | None]:
    """The engine's key for the tier (a name, ``auto``, or an int for a raw ``?r=``) and its description
    (None for ``auto``: the engine picks the tier)."""
    if r is not None:
        if not model.info["allow_raw_r"]:
            raise ServiceError(
                400, "bad_request", f"raw r is not enabled for model {model.name!r}; use tier="
            )
        if tier is not None:
            raise ServiceError(400, "bad_request", "give either tier= or r=, not both")
        if r not in model.raw_tiers:
            limit = model.info["raw_r_max"]
            raise ServiceError(422, "bad_request", f"r must be between 0 and {limit} for this model, got {r}")
        return r, model.raw_tiers[r]
    name = tier or model.info["default_tier"]
    if name == AUTO and model.info.get("auto"):
        return AUTO, None
    if name not in model.tiers:
        raw = f" (or a raw ?r= from 0 to {model.info['raw_r_max']})" if model.info["allow_raw_r"] else ""
        raise ServiceError(
            400,
            "unknown_tier",
            f"unknown tier {name!r} for model {model.name!r}{raw}",
            valid=[*model.tiers, AUTO],
        )
    return name, model.tiers[name]


def resolve_top_k(model: ServedModel, top_k: int | None) -> int:
    if top_k is None:
        return model.default_top_k
    if not 1 <= top_k <= model.max_top_k:
        raise ServiceError(422, "bad_request", f"top_k must be between 1 and {model.max_top_k}, got {top_k}")
    return top_k
