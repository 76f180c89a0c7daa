"""Pick a calibrated schedule for a budget: an agreement loss to stay under, or a speedup to reach.

Agreement budgets are checked against the *lower end of the 95% interval*, not the point estimate:
a schedule is admitted for ``max_agreement_loss=0.03`` only if the calibration shows, at 95%
confidence (97.5% one-sided), that it agrees with r=0 on at least 97% of such images. With the point
estimate, a schedule measured right at the budget would break it about half the time on new traffic,
and a small calibration set would look as good as a large one. The bound makes the promise the
service states ("agreement X, 95% CI [lo, hi]") one that live monitoring can hold it to: live
agreement below ``lo`` is evidence of drift, not of a tier that was chosen optimistically. The cost is
that small calibration sets admit only mild schedules (their intervals are wide): calibrate on more
images to unlock faster tiers. ``use_interval=False`` gives the point-estimate rule.

r=0 is the reference itself: its agreement is 1 by definition, so it meets every agreement budget.

Speed budgets use the median speedup over the timing rounds (timing noise is the machine's, not a
sampling error of the images, and the median is what models.bench reports).
"""

from __future__ import annotations

from .record import Calibration, ScheduleRecord


class BudgetError(ValueError):
    """No calibrated schedule meets the budget."""


def agreement_loss_bound(record: ScheduleRecord, use_interval: bool = True) -> float:
    """1 - agreement: from the interval's lower end (default) or the point estimate; 0 for r=0."""
    if record.is_exact:
        return 0.0
    agreement = record.agreement.ci_low if use_interval else record.agreement.rate
    return 1.0 - agreement


def resolve(
    calibration: Calibration,
    *,
    max_agreement_loss: float | None = None,
    min_speedup: float | None = None,
    use_interval: bool = True,
) -> ScheduleRecord:
    """The fastest schedule within ``max_agreement_loss``, or the most faithful reaching ``min_speedup``.

    Give exactly one budget. Raises ``BudgetError`` when no schedule reaches ``min_speedup``.
    Ties: the faster schedule (agreement budget) or the faster of equally faithful ones (speed budget).
    """
    if (max_agreement_loss is None) == (min_speedup is None):
        raise ValueError("give exactly one of max_agreement_loss and min_speedup")
    schedules = calibration.schedules
    if max_agreement_loss is not None:
        if not 0 <= max_agreement_loss <= 1:
            raise ValueError(f"max_agreement_loss must be within [0, 1], got {max_agreement_loss}")
        within = [s for s in schedules if agreement_loss_bound(s, use_interval) <= max_agreement_loss + 1e-12]
        if not within:  # only possible for a calibration without r=0
            raise BudgetError(f"no calibrated schedule loses at most {max_agreement_loss:.1%} agreement")
        return max(within, key=lambda s: (s.speedup.median, -agreement_loss_bound(s, use_interval)))
    assert min_speedup is not None
    fast_enough = [s for s in schedules if s.speedup.median >= min_speedup]
    if not fast_enough:
        fastest = max(schedules, key=lambda s: s.speedup.median)
        raise BudgetError(
            f"no calibrated schedule reaches {min_speedup:.2f}x; the fastest, {fastest.name}, "
            f"measured {fastest.speedup.median:.2f}x"
        )
    return min(fast_enough, key=lambda s: (agreement_loss_bound(s, use_interval), -s.speedup.median))
