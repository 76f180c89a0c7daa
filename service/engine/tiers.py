"""Named speed/accuracy tiers: each maps to a ToMe ``r`` schedule for one model.

A tier is explicit (``r``) or declared by budget (``max_agreement_loss`` / ``min_speedup``), resolved at
start-up against the model's calibration file (``models.calibration.resolve``). Every tier whose
schedule the calibration measured carries its figures (agreement with r=0 and its interval, accuracy,
speedup), which /tiers and the ``tome_tier_agreement*`` gauges report.

Defaults: without a calibration, exact / balanced / fast / fastest at constant r = 0, 0.5, 0.8 and 1.0
x N/L (``models.calibration.default_tier_schedules``: on the real ViT-Ti at most 3 top-1 points lost,
where the former decreasing ``fastest`` lost 29.5); with one, ``default_budgets`` (agreement loss at
most 0, 5, 10, 15%).
"""

from __future__ import annotations

from dataclasses import dataclass

from models import tome
from models.calibration import (
    BudgetError,
    Calibration,
    ScheduleRecord,
    default_budgets,
    default_tier_schedules,
)
from models.calibration import resolve as resolve_budget
from models.calibration import unprotected_tokens as _unprotected

from ..settings import TierSpec

DEFAULT_TIER_NAMES = ("exact", "balanced", "fast", "fastest")


@dataclass(frozen=True)
class Tier:
    """A resolved tier: its schedule, what it costs (from ``schedule_info``, without running), and what
    the calibration measured for it (None: uncalibrated)."""

    name: str
    r: int | list[int] | tuple[int, float]
    info: tome.ScheduleInfo
    calibration: ScheduleRecord | None = None
    budget: dict[str, float] | None = None  # the declared budget, for tiers declared by one

    def describe_schedule(self) -> str:
        """A short, stable text form of ``r`` (used in responses and the tome_tier_info metric)."""
        if isinstance(self.r, tuple):
            return f"r={self.r[0]},inflection={self.r[1]:g}"
        if isinstance(self.r, list):
            return "r=[" + ",".join(str(v) for v in self.r) + "]"
        return f"r={self.r}"


def default_tier_specs(model: tome.ToMeVisionTransformer, calibrated: bool) -> dict[str, TierSpec]:
    """The default tiers: budgets when a calibration file exists, else constant-r schedules."""
    if calibrated:
        return {
            name: TierSpec(max_agreement_loss=b.max_agreement_loss, min_speedup=b.min_speedup)
            for name, b in default_budgets().items()
        }
    schedules = default_tier_schedules(model.depth, unprotected_tokens(model))
    return {name: TierSpec(r=r) for name, r in schedules.items()}  # type: ignore[arg-type]


def unprotected_tokens(model: tome.ToMeVisionTransformer) -> int:
    """Tokens entering the first block that may merge (all but class/distillation/register tokens)."""
    return _unprotected(model)


def max_raw_r(model: tome.ToMeVisionTransformer) -> int:
    """Largest useful constant r: the first block can merge at most half the unprotected tokens."""
    return unprotected_tokens(model) // 2


def _measured(
    model: tome.ToMeVisionTransformer, r: object, calibration: Calibration | None
) -> ScheduleRecord | None:
    """The calibration's record of the schedule ``r`` really applies, if it measured that one."""
    if calibration is None:
        return None
    applied = model.schedule_info(r).r_per_block
    return next((s for s in calibration.schedules if tuple(s.r_per_block) == applied), None)


def build_tiers(
    model: tome.ToMeVisionTransformer,
    specs: dict[str, TierSpec] | None,
    calibration: Calibration | None = None,
) -> dict[str, Tier]:
    """Resolve tier specs (or the defaults) against ``model`` and its calibration; raises ValueError on a
    bad schedule, a budget without a calibration, or a budget no calibrated schedule meets."""
    if specs is None:
        specs = default_tier_specs(model, calibrated=calibration is not None)
    if not specs:
        raise ValueError("a model needs at least one tier")
    tiers = {}
    for name, spec in specs.items():
        if spec.by_budget:
            if calibration is None:
                raise ValueError(
                    f"tier {name!r} is declared by a budget but the model has no calibration file"
                )
            budget = {
                k: v
                for k, v in (
                    ("max_agreement_loss", spec.max_agreement_loss),
                    ("min_speedup", spec.min_speedup),
                )
                if v is not None
            }
            try:
                record = resolve_budget(calibration, **budget)  # type: ignore[arg-type]
            except BudgetError as e:
                raise ValueError(f"tier {name!r}: {e}") from e
            r: int | list[int] | tuple[int, float] = list(record.r_per_block)
            if not any(r):
                r = 0
            tiers[name] = Tier(name, r, model.schedule_info(r), record, budget)
            continue
        r = spec.schedule()
        tome.parse_r(model.depth, r)  # raises on a list longer than the depth
        tiers[name] = Tier(name, r, model.schedule_info(r), _measured(model, r, calibration))
    return tiers


def raw_r_tier(model: tome.ToMeVisionTransformer, r: int) -> Tier:
    """A tier for a raw ``?r=`` value; raises ValueError outside ``0..max_raw_r``."""
    limit = max_raw_r(model)
    if not 0 <= r <= limit:
        raise ValueError(f"r must be between 0 and {limit} for this model, got {r}")
    return Tier(f"r{r}", r, model.schedule_info(r))
