"""A measured rate (count out of n) with its Wilson confidence interval."""

from __future__ import annotations

from dataclasses import dataclass

from scipy.stats import binomtest

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Rate:
    """``count`` of ``n`` images, the rate, and its two-sided Wilson interval at ``CONFIDENCE``."""

    count: int
    n: int
    rate: float
    ci_low: float
    ci_high: float

    @classmethod
    def measure(cls, count: int, n: int, confidence: float = CONFIDENCE) -> Rate:
        if n <= 0 or not 0 <= count <= n:
            raise ValueError(f"need 0 <= count <= n and n > 0, got count={count}, n={n}")
        interval = binomtest(count, n).proportion_ci(confidence_level=confidence, method="wilson")
        return cls(count, n, count / n, float(interval.low), float(interval.high))

    def __str__(self) -> str:
        interval = f"[{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}]"
        return f"{100 * self.rate:.1f}% {interval} ({self.count}/{self.n})"
