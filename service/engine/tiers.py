"""Named speed/accuracy tiers: each maps to a ToMe ``r`` schedule for one model."""

from __future__ import annotations

from dataclasses import dataclass

from models import tome

from ..settings import TierSpec

DEFAULT_TIER_NAMES = ("exact", "balanced", "fast", "fastest")


@dataclass(frozen=True)
class Tier:
    """A resolved tier: its schedule and what it costs (from ``schedule_info``, without running)."""

    name: str
    r: int | list[int] | tuple[int, float]
    info: tome.ScheduleInfo

    def describe_schedule(self) -> str:
        """A short, stable text form of ``r`` (used in responses and the tome_tier_info metric)."""
        if isinstance(self.r, tuple):
            return f"r={self.r[0]},inflection={self.r[1]:g}"
        if isinstance(self.r, list):
            return "r=[" + ",".join(str(v) for v in self.r) + "]"
        return f"r={self.r}"


def default_tier_specs(depth: int, unprotected_tokens: int) -> dict[str, TierSpec]:
    """exact r=0, balanced r=0.5N/L, fast r=0.8N/L, fastest decreasing from 2N/L (ViT-B/16: 8, 13, 16)."""
    per_block = unprotected_tokens / depth
    return {
        "exact": TierSpec(r=0),
        "balanced": TierSpec(r=round(0.5 * per_block)),
        "fast": TierSpec(r=round(0.8 * per_block)),
        "fastest": TierSpec(r=round(per_block), inflection=-1),
    }


def unprotected_tokens(model: tome.ToMeVisionTransformer) -> int:
    """Tokens entering the first block that may merge (all but class/distillation/register tokens)."""
    return model.schedule_info(0).tokens_in - model.num_prefix_tokens


def max_raw_r(model: tome.ToMeVisionTransformer) -> int:
    """Largest useful constant r: the first block can merge at most half the unprotected tokens."""
    return unprotected_tokens(model) // 2


def build_tiers(model: tome.ToMeVisionTransformer, specs: dict[str, TierSpec] | None) -> dict[str, Tier]:
    """Resolve tier specs (or the defaults) against ``model``; raises ValueError on a bad schedule."""
    if specs is None:
        specs = default_tier_specs(model.depth, unprotected_tokens(model))
    if not specs:
        raise ValueError("a model needs at least one tier")
    tiers = {}
    for name, spec in specs.items():
        r = spec.schedule()
        tome.parse_r(model.depth, r)  # raises on a list longer than the depth
        tiers[name] = Tier(name, r, model.schedule_info(r))
    return tiers


def raw_r_tier(model: tome.ToMeVisionTransformer, r: int) -> Tier:
    """A tier for a raw ``?r=`` value; raises ValueError outside ``0..max_raw_r``."""
    limit = max_raw_r(model)
    if not 0 <= r <= limit:
        raise ValueError(f"r must be between 0 and {limit} for this model, got {r}")
    return Tier(f"r{r}", r, model.schedule_info(r))
