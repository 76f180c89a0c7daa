"""An open-loop run's figures from its per-request records: counts per status, goodput, latency
percentiles measured from each request's intended send time, and whether the generator kept its schedule.
"""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Outcomes that are not an HTTP status (records keep them as negative "statuses").
TIMEOUT = -1  # no answer within the client timeout
CONNECTION_ERROR = -2  # refused, reset, closed before an answer
BAD_BODY = -3  # a 200 whose body is not the answer that was asked for
OTHER_ERROR = -4
OUTCOME_NAMES = {
    TIMEOUT: "timeout",
    CONNECTION_ERROR: "connection_error",
    BAD_BODY: "bad_body",
    OTHER_ERROR: "error",
}
REFUSALS = (429, 503)  # the service's backpressure: asked to come back later
PERCENTILES = (50, 90, 95, 99, 99.9)
_FLOAT_FIELDS = ("intended", "lag", "latency", "service")
_INT_FIELDS = ("status", "tier")


@dataclass
class Records:
    """One row per request, in arrays so that a generator's memory stays small at thousands per second."""

    intended: array[float] = field(default_factory=lambda: array("d"))  # s from the start of the schedule
    lag: array[float] = field(default_factory=lambda: array("d"))  # actual send start - intended, s
    latency: array[float] = field(default_factory=lambda: array("d"))  # done - intended, s
    service: array[float] = field(default_factory=lambda: array("d"))  # done - actual send start, s
    status: array[int] = field(default_factory=lambda: array("i"))  # HTTP status or an outcome above
    tier: array[int] = field(default_factory=lambda: array("i"))  # index into the run's tier list

    def add(
        self, intended: float, lag: float, latency: float, service: float, status: int, tier: int
    ) -> None:
        self.intended.append(intended)
        self.lag.append(lag)
        self.latency.append(latency)
        self.service.append(service)
        self.status.append(status)
        self.tier.append(tier)

    def __len__(self) -> int:
        return len(self.intended)

    def extend(self, other: Records) -> None:
        for name in _FLOAT_FIELDS + _INT_FIELDS:
            getattr(self, name).extend(getattr(other, name))

    def save(self, path: Path) -> None:
        with path.open("wb") as f:
            for name in _FLOAT_FIELDS + _INT_FIELDS:
                getattr(self, name).tofile(f)

    @classmethod
    def load(cls, path: Path, count: int) -> Records:
        out = cls()
        with path.open("rb") as f:
            for name in _FLOAT_FIELDS + _INT_FIELDS:
                getattr(out, name).fromfile(f, count)
        return out


def status_name(status: int) -> str:
    return OUTCOME_NAMES.get(status, str(status))


def _status_order(status: int) -> tuple[bool, int]:
    """HTTP statuses in order, then the outcomes that are not one."""
    return status < 0, abs(status)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """count, mean, p50...p99.9 and max of ``values`` times ``scale`` (linear interpolation between
    order statistics); only the count when there are none."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    out: dict[str, float] = {"count": len(ordered), "mean": scale * math.fsum(ordered) / len(ordered)}
    for q in PERCENTILES:
        pos = (len(ordered) - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out[f"p{q:g}"] = scale * (ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    out["max"] = scale * ordered[-1]
    return out


@dataclass(frozen=True)
class Window:
    """Requests whose *intended* send time falls in [start, end) are measured (the rest is warm-up)."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def summarize(
    records: Records,
    window: Window,
    rate: float,
    tiers: list[str],
    images_per_request: int = 1,
    late_threshold_s: float = 0.010,
) -> dict[str, Any]:
    """The run's report over ``window``. Latency is from the intended send time, so time a request
    spent waiting for the generator (or for a connection) counts against the service, as it would for a
    real client arriving then; ``service_latency_ms`` is from the actual send, for comparison."""
    rows = [i for i in range(len(records)) if window.start <= records.intended[i] < window.end]
    by_status: dict[int, list[int]] = {}
    for i in rows:
        by_status.setdefault(records.status[i], []).append(i)
    ok = by_status.get(200, [])
    refused = [i for s in REFUSALS for i in by_status.get(s, [])]
    lags = [records.lag[i] for i in rows if not math.isnan(records.lag[i])]  # NaN: never ran
    late = sum(1 for lag in lags if lag > late_threshold_s)
    answered = [i for i in rows if records.status[i] > 0]

    def lat(idx: list[int]) -> dict[str, float]:
        return percentiles([records.latency[i] for i in idx])

    report: dict[str, Any] = {
        "offered_rate": rate,
        "window_s": window.seconds,
        "scheduled": len(rows),
        "counts": {status_name(s): len(by_status[s]) for s in sorted(by_status, key=_status_order)},
        "goodput_rps": len(ok) / window.seconds,
        "goodput_images_per_s": len(ok) * images_per_request / window.seconds,
        "answered_rps": len(answered) / window.seconds,
        "latency_ms": {
            "ok": lat(ok),
            "refused": lat(refused),
            "by_status": {status_name(s): lat(by_status[s]) for s in sorted(by_status, key=_status_order)},
        },
        "service_latency_ms": {"ok": percentiles([records.service[i] for i in ok])},
        "schedule": {
            "lag_ms": percentiles(lags),
            "late": late,
            "late_threshold_ms": 1000 * late_threshold_s,
        },
        "by_tier": {},
    }
    for t, name in enumerate(tiers):
        idx = [i for i in rows if records.tier[i] == t]
        tier_ok = [i for i in idx if records.status[i] == 200]
        counts = Counter(records.status[i] for i in idx)
        report["by_tier"][name] = {
            "scheduled": len(idx),
            "counts": {status_name(s): counts[s] for s in sorted(counts, key=_status_order)},
            "goodput_rps": len(tier_ok) / window.seconds,
            "latency_ms_ok": lat(tier_ok),
        }
    return report


def write_json(path: Path, report: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
