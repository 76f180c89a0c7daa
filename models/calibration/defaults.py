"""Default tiers: fixed schedules for a model nobody calibrated, and budgets for one somebody did.

Measured on the real AugReg ViT-Ti/16 (N/L = 196/12) and the 200 shared ImageNet photos, CPU fp32,
batch 16 (``out/vit_tiny_fp32_all200.json``; top-1, agreement with r=0, speedup over r=0):

    r=0        86.0%   100%    1.00x
    r=8        86.0%   95.0%   1.22x     balanced  (0.5 N/L)
    r=13       83.5%   95.0%   1.48x     fast      (0.8 N/L)
    r=16       83.0%   92.0%   1.76x     fastest   (N/L)
    r=17       80.0%   86.0%   1.92x     past N/L the loss grows fast: r=18 75.5%, r=20 68.0%
    r=(16,-1)  56.5%   63.0%   2.45x     the former ``fastest`` (decreasing from 2N/L): -29.5 points

The paper's off-the-shelf tables agree that constant r = N/L is the most a default should merge: on
ImageNet-val it costs 4.71 / 4.40 / 4.20 top-1 points for AugReg ViT-Ti / S / B at r=16 (N/L = 16.3),
2.27 for ViT-L/16 at r=8 (N/L = 8.2) and 0.78 for ViT-L/16@384 at r=23 (N/L = 24); its decreasing
schedule was chosen on ViT-B and costs the small ViT-Ti far more.
"""

from __future__ import annotations

from dataclasses import dataclass

from models import tome

from .record import Calibration, ScheduleRecord
from .resolve import resolve


def default_tier_schedules(depth: int, unprotected_tokens: int) -> dict[str, tome.RSpec]:
    """Uncalibrated tiers: exact r=0, balanced r=0.5N/L, fast r=0.8N/L, fastest r=N/L, all constant.

    N = mergeable tokens entering the first block, L = depth (ViT-*/16 at 224 px: 8, 13, 16).
    """
    per_block = unprotected_tokens / depth
    return {
        "exact": 0,
        "balanced": round(0.5 * per_block),
        "fast": round(0.8 * per_block),
        "fastest": round(per_block),
    }


@dataclass(frozen=True)
class Budget:
    """One of: the agreement loss a tier may cost, or the speedup it must reach."""

    max_agreement_loss: float | None = None
    min_speedup: float | None = None


def default_budgets() -> dict[str, Budget]:
    """Tier budgets once a calibration exists: at most 0, 5, 10, 15% of top-1 predictions may differ
    from r=0's, shown at 95% confidence (``resolve`` checks the interval's lower end).

    On the 200-photo ViT-Ti calibration above they resolve to r=0, r=0, r=13 and r=16: the same
    fast and fastest as the uncalibrated defaults; balanced stays exact only because 200 images cannot
    show 95% agreement at 95% confidence for anything short of 197/200 (r=6 had 196). From about 1000
    calibration images on, the interval is narrow enough for balanced to merge (970/1000 agreeing has a
    lower end of 95.7%). 15% agreement loss is about what r=17 costs ViT-Ti (14.0%, -6 top-1 points).
    """
    return {
        "exact": Budget(max_agreement_loss=0.0),
        "balanced": Budget(max_agreement_loss=0.05),
        "fast": Budget(max_agreement_loss=0.10),
        "fastest": Budget(max_agreement_loss=0.15),
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
