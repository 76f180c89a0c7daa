"""``tier=auto``: meet each request's deadline by choosing how much to merge, instead of refusing it.

For an ``auto`` request the engine predicts, per tier, when the request's images would be answered:
the device's backlog (every live image queued, each queue's full and partial batches at that tier's
measured batch time, plus what is left of the batches running), then the request's own batch at the
candidate tier. It picks the most faithful tier (calibrated agreement with r=0, else fewest merged
tokens) whose prediction fits the deadline (``X-Deadline-Ms``, else the model's latency objective), never
going faster than the floor tier. Only when even the floor cannot make it is the request refused, at
once (503 + Retry-After), instead of a 504 after waiting.

Batch times per (tier, bucket) are measured at warm-up and kept current from live batches (an
exponentially weighted mean); predictions are stretched by ``safety_factor`` (a busy host runs batches
slower than an idle warm-up measured, and the estimate takes a few batches to follow). Hysteresis:
moving back to a more faithful tier needs the prediction to fit with room to spare
(``upgrade_margin``) and the last change to be ``hold_s`` old, so the choice does not flap batch to
batch. Fairness: auto adds images to a queue only while its live images (of any request) stay within
``max_queue_share`` of it, so a flood of auto requests leaves room for requests that named their tier
and auto yields to them (it moves to a faster tier with room, else 503).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .buckets import bucket_for

AUTO = "auto"
EWMA_WEIGHT = 0.3  # weight of the newest live batch in a (tier, bucket) time


class BatchTimes:
    """Seconds per batch, by tier and bucket: warm-up's measurement, then a moving mean of live batches.

    ``padded``: batches run padded to their bucket (CUDA graphs), so any batch times its whole bucket.
    Unpadded (eager, CPU), a batch of 5 in bucket 8 stands for the bucket by its time per image; taken
    as it is, the partial batches of a light load would pull the full batch's time down, and with it
    every prediction once the load rises."""

    def __init__(
        self, buckets: Sequence[int], measured: dict[str, dict[int, float]], padded: bool = True
    ) -> None:
        self.buckets = list(buckets)
        self.padded = padded
        self._seconds = {tier: dict(times) for tier, times in measured.items()}

    def observe(self, tier: str, batch_size: int, seconds: float) -> None:
        bucket = bucket_for(batch_size, self.buckets)
        if not self.padded:
            seconds *= bucket / batch_size
        times = self._seconds.setdefault(tier, {})
        old = times.get(bucket)
        times[bucket] = seconds if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * seconds

    def batch(self, tier: str, images: int) -> float:
        """Predicted seconds of one batch of ``images`` at ``tier`` (its bucket's time, else the nearest
        measured bucket scaled by size). A tier with no batch yet (a raw ``?r=`` queue: warm-up times only
        the configured tiers) counts as the slowest measured one until its first batch, not as free."""
        bucket = bucket_for(min(images, self.buckets[-1]), self.buckets)
        times = self._seconds.get(tier, {})
        if bucket in times:
            return times[bucket]
        if not times:
            measured = [t for t, seconds in self._seconds.items() if seconds]
            return max((self.batch(t, images) for t in measured), default=0.0)
        nearest = min(times, key=lambda b: abs(b - bucket))
        return times[nearest] * bucket / nearest

    def drain(self, tier: str, images: int) -> float:
        """Predicted seconds to run ``images`` queued at ``tier`` in full batches plus a partial one."""
        if images <= 0:
            return 0.0
        full, rest = divmod(images, self.buckets[-1])
        return full * self.batch(tier, self.buckets[-1]) + (self.batch(tier, rest) if rest else 0.0)


@dataclass(frozen=True)
class AutoChoice:
    tier: str | None  # None: even the floor cannot meet the deadline
    reason: str  # "fits" (the most faithful tier fits), "deadline" (degraded to fit), "floor_too_slow"
    predicted_s: float


@dataclass
class AutoPolicy:
    """One model's auto choices. ``tiers`` runs from the most faithful to the floor (inclusive).

    A tier fits when it is predicted to answer within ``target_share`` of the request's budget: the rest
    is slack for prediction error and for the requests behind it (a faithful tier allowed to fill the
    whole budget would make every later request, at any tier, wait behind its queue). When no tier fits
    that way, the floor is taken if it makes the deadline at all.
    """

    tiers: list[str]
    upgrade_margin: float = 0.7
    hold_s: float = 2.0
    target_share: float = 0.5
    current: int = 0  # index into tiers of the last choice
    changed_at: float = field(default=float("-inf"))

    def choose(self, finish_at: dict[str, float], deadline: float, now: float | None = None) -> AutoChoice:
        """``finish_at``: per tier, the predicted time (monotonic s) the request would be answered."""
        now = time.monotonic() if now is None else now
        budget = deadline - now
        target = now + self.target_share * budget
        fits = [finish_at[t] <= target for t in self.tiers]
        if not any(fits):
            floor = self.tiers[-1]
            if finish_at[floor] > deadline:
                return AutoChoice(None, "floor_too_slow", finish_at[floor] - now)
            fits[-1] = True
        best = fits.index(True)
        choice = best
        if best < self.current:  # a more faithful tier fits again: only with room to spare, after a while
            room = self.upgrade_margin * self.target_share * budget
            roomy = [i for i in range(best, self.current) if finish_at[self.tiers[i]] - now <= room]
            choice = roomy[0] if roomy and now - self.changed_at >= self.hold_s else self.current
            if not fits[choice]:
                choice = best
        if choice != self.current:
            self.current, self.changed_at = choice, now
        tier = self.tiers[choice]
        reason = "fits" if choice == 0 else "hold" if choice > best else "deadline"
        return AutoChoice(tier, reason, finish_at[tier] - now)


def faithful_order(tiers: dict[str, float], agreements: dict[str, float]) -> list[str]:
    """Tier names from the most faithful to the fastest: by calibrated agreement with r=0 where every tier
    has one, else by GFLOPs (``tiers``: name -> GFLOPs; fewer merged tokens, more faithful)."""
    if agreements and all(name in agreements for name in tiers):
        return sorted(tiers, key=lambda name: (-agreements[name], -tiers[name]))
    return sorted(tiers, key=lambda name: -tiers[name])


class DecayedMean:
    """A mean whose older values fade with ``half_life_s`` (auto traffic's effective agreement)."""

    def __init__(self, half_life_s: float = 60.0) -> None:
        self.half_life_s = half_life_s
        self._sum = self._weight = 0.0
        self._at: float | None = None

    def add(self, value: float, now: float) -> None:
        if self._at is not None:
            fade = 0.5 ** ((now - self._at) / self.half_life_s)
            self._sum, self._weight = self._sum * fade, self._weight * fade
        self._sum += value
        self._weight += 1.0
        self._at = now

    @property
    def mean(self) -> float:
        return self._sum / self._weight if self._weight else math.nan
