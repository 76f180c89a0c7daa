"""Default tiers: fixed schedules for a model nobody calibrated, and budgets for one somebody did.

Figures behind the choices: see ``default_tier_schedules`` and ``default_budgets``.
"""

from __future__ import annotations

from dataclasses import dataclass

from models import tome

from .record import Calibration, ScheduleRecord
from .resolve import resolve


@dataclass(frozen=True)
class Budget:
    """One of: the agreement loss a tier may cost, or the speedup it must reach."""

    max_agreement_loss: float | None = None
    min_speedup: float | None = None


def default_budgets() -> dict[str, Budget]:
    """Tier budgets when a calibration exists (agreement loss bounded by the interval's lower end)."""
    return {
        "exact": Budget(max_agreement_loss=0.0),
        "balanced": Budget(max_agreement_loss=0.02),
        "fast": Budget(max_agreement_loss=0.05),
        "fastest": Budget(max_agreement_loss=0.10),
    }


def resolve_tiers(
    calibration: Calibration, budgets: dict[str, Budget] | None = None, use_interval: bool = True
) -> dict[str, ScheduleRecord]:
    """Each tier's calibrated schedule under its budget (``default_budgets`` unless given)."""
    budgets = default_budgets() if budgets is None else budgets
    return {
        tier: resolve(
            calibration,
            max_agreement_loss=b.max_agreement_loss,
            min_speedup=b.min_speedup,
            use_interval=use_interval,
        )
        for tier, b in budgets.items()
    }


def default_tier_schedules(depth: int, unprotected_tokens: int) -> dict[str, tome.RSpec]:
    """Uncalibrated defaults: exact r=0, balanced r=0.5N/L, fast r=0.8N/L, fastest r=N/L (all constant)."""
    per_block = unprotected_tokens / depth
    return {
        "exact": 0,
        "balanced": round(0.5 * per_block),
        "fast": round(0.8 * per_block),
        "fastest": round(per_block),
    }
