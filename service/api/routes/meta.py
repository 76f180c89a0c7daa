"""``GET /tiers`` and ``GET /models``: what the engine serves, as this front-end knows it."""

from __future__ import annotations

from fastapi import APIRouter

from ..dependencies import FrontendDep
from ..schemas import AutoDescription, ModelDescription, ModelTiers, TierDescription

router = APIRouter()


@router.get("/tiers", summary="Tiers of every model", response_model=dict[str, ModelTiers])
async def tiers(frontend: FrontendDep) -> dict[str, ModelTiers]:
    speedups, batch_ms = frontend.engine.state.speedups, frontend.engine.state.batch_ms
    out = {}
    for name, served in frontend.models.items():
        measured = speedups.get(name, {})
        out[name] = ModelTiers(
            calibration=served.info["calibration"],
            default_tier=served.info["default_tier"],
            raw_r_allowed=served.info["allow_raw_r"],
            raw_r_max=served.info["raw_r_max"],
            tiers=[
                TierDescription(
                    name=t["name"],
                    schedule=t["schedule"],
                    r_per_block=t["r_per_block"],
                    tokens_after_last_block=t["tokens_after_last_block"],
                    gflops=t["gflops"],
                    speedup_vs_exact=measured.get(t["name"]),
                    batch_ms=batch_ms.get(name, {}).get(t["name"]),
                    calibrated=t["calibrated"],
                    budget=t["budget"],
                    agreement_with_exact=t["agreement_with_exact"],
                    top1_accuracy=t["top1_accuracy"],
                    calibrated_speedup=t["calibrated_speedup"],
                    calibrated_schedule=t["calibrated_schedule"],
                )
                for t in served.tiers.values()
            ],
            auto=AutoDescription(**served.info["auto"]) if served.info["auto"] else None,
        )
    return out


@router.get("/models", summary="Loaded models", response_model=list[ModelDescription])
async def models(frontend: FrontendDep) -> list[ModelDescription]:
    return [
        ModelDescription(
            name=name,
            architecture=m.info["architecture"],
            weights_source=m.info["weights_source"],
            random_weights=m.info["random_weights"],
            device=m.info["device"],
            dtype=m.info["dtype"],
            num_classes=m.info["num_classes"],
            input_size=m.info["input_size"],
            default=name == frontend.default_model,
        )
        for name, m in frontend.models.items()
    ]
