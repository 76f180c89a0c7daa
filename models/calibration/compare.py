"""Do searched schedules beat constant r? Compared on the images a calibration measured.

The target: at equal measured speed (within ``speed_tolerance``) a searched schedule agrees with r=0 on
at least ``min_points`` percentage points more images than the best constant r, or at equal agreement
it is at least ``min_speed_gain`` faster. Only meaningful on a calibration whose figures come from
images the search did not see (``calibrate(..., search=...)`` sets those aside).
"""

from __future__ import annotations

from dataclasses import dataclass

from .record import Calibration, ScheduleRecord


@dataclass(frozen=True)
class SearchComparison:
    searched: ScheduleRecord
    equal_speed: ScheduleRecord | None  # the most agreeing constant within the speed tolerance
    points_gained: float | None  # agreement of searched minus that constant's, in percentage points
    equal_agreement: ScheduleRecord  # the fastest constant agreeing at least as often
    speed_gained: float  # searched speedup / that constant's speedup - 1
    meets_target: bool


def compare_search(
    calibration: Calibration,
    speed_tolerance: float = 0.03,
    min_points: float = 1.0,
    min_speed_gain: float = 0.10,
) -> list[SearchComparison]:
    constants = [s for s in calibration.schedules if s.kind == "constant"]
    if not any(s.is_exact for s in constants):
        raise ValueError("the calibration has no r=0 schedule to compare against")
    comparisons = []
    for searched in (s for s in calibration.schedules if s.kind == "searched"):
        speed = searched.speedup.median
        near = [c for c in constants if abs(c.speedup.median / speed - 1) <= speed_tolerance]
        equal_speed = max(near, key=lambda c: c.agreement.count, default=None)
        points = None
        if equal_speed is not None:
            points = 100 * (searched.agreement.rate - equal_speed.agreement.rate)
        as_good = [c for c in constants if c.agreement.count >= searched.agreement.count]
        equal_agreement = max(as_good, key=lambda c: c.speedup.median)
        gain = speed / equal_agreement.speedup.median - 1
        meets = (points is not None and points >= min_points) or gain >= min_speed_gain
        comparisons.append(SearchComparison(searched, equal_speed, points, equal_agreement, gain, meets))
    return comparisons


def format_comparison(comparisons: list[SearchComparison], speed_tolerance: float = 0.03) -> str:
    near_title = f"constant at ±{speed_tolerance:.0%}"
    header = (
        f"{'searched':<14}{'speedup':>8}{'agree %':>9} | {near_title:<17}"
        f"{'speedup':>8}{'agree %':>9}{'gain pts':>9} | {'fastest const >= agree':<23}{'speedup':>8}"
        f"{'speed gain':>11} | target"
    )
    lines = [header, "-" * len(header)]
    for c in comparisons:
        s = c.searched
        if c.equal_speed is None:
            near = f"{'(none)':<17}{'':>8}{'':>9}{'':>9}"
        else:
            e = c.equal_speed
            near = (
                f"{e.name:<17}{e.speedup.median:>7.2f}x{100 * e.agreement.rate:>9.1f}{c.points_gained:>+9.1f}"
            )
        q = c.equal_agreement
        lines.append(
            f"{s.name:<14}{s.speedup.median:>7.2f}x{100 * s.agreement.rate:>9.1f} | {near} | "
            f"{q.name:<23}{q.speedup.median:>7.2f}x{100 * c.speed_gained:>+10.1f}% | "
            f"{'met' if c.meets_target else 'not met'}"
        )
    met = sum(c.meets_target for c in comparisons)
    lines.append(f"target met by {met} of {len(comparisons)} searched schedules")
    return "\n".join(lines)
