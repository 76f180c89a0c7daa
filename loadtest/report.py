"""Summaries of a load test: per-tier figures from locust's CSV, batch sizes from the service's /metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:  # importing locust monkey-patches the process with gevent: only the locust run may
    from locust.stats import RequestStats

REJECTED = "REJECTED"  # request type the locustfile gives 503 answers
_TIER_NAME = re.compile(r"^/classify \[(?P<tier>[^\]]+)\]$")


@dataclass
class TierStats:
    tier: str
    requests: int = 0  # answered 2xx or failed (rejections excluded)
    failures: int = 0
    rejections: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def attempts(self) -> int:
        return self.requests + self.rejections

    @property
    def ok(self) -> int:
        return self.requests - self.failures

    def failure_rate(self) -> float:
        return self.failures / self.attempts if self.attempts else 0.0

    def rejection_rate(self) -> float:
        return self.rejections / self.attempts if self.attempts else 0.0


def final_stats(stats: RequestStats) -> dict[str, list[dict[str, object]]]:
    """locust's final figures per (request type, name) and its failure messages, taken at exit."""
    entries = [
        {
            "type": e.method,
            "name": e.name,
            "requests": e.num_requests,
            "failures": e.num_failures,
            "rps": e.total_rps,
            "p50_ms": e.get_response_time_percentile(0.50),
            "p95_ms": e.get_response_time_percentile(0.95),
            "p99_ms": e.get_response_time_percentile(0.99),
        }
        for e in stats.entries.values()
    ]
    errors = [
        {"type": e.method, "name": e.name, "error": str(e.error), "occurrences": e.occurrences}
        for e in stats.errors.values()
    ]
    return {"entries": entries, "errors": errors}


def read_summary(path: Path) -> dict[str, TierStats]:
    """Per-tier figures from the locustfile's ``--summary-json`` (entries named ``/classify [<tier>]``)."""
    tiers: dict[str, TierStats] = {}
    for entry in json.loads(path.read_text())["entries"]:
        match = _TIER_NAME.match(entry["name"])
        if not match:
            continue
        stats = tiers.setdefault(match["tier"], TierStats(match["tier"]))
        if entry["type"] == REJECTED:
            stats.rejections += entry["requests"]
            continue
        stats.requests += entry["requests"]
        stats.failures += entry["failures"]
        stats.rps += entry["rps"]
        stats.p50_ms, stats.p95_ms, stats.p99_ms = entry["p50_ms"], entry["p95_ms"], entry["p99_ms"]
    return tiers


@dataclass
class BatchSizes:
    """Batch-size histogram of one (model, tier): images-per-batch bucket bounds -> batches."""

    model: str
    tier: str
    buckets: dict[float, float]  # cumulative, as Prometheus exposes it
    batches: float
    images: float

    def mean(self) -> float:
        return self.images / self.batches if self.batches else 0.0

    def per_bucket(self) -> list[tuple[str, float]]:
        """Non-cumulative counts labelled ``<=1``, ``2``, ``3-4``, ... ``>256``."""
        out, prev_bound, prev_count = [], 0.0, 0.0
        for bound in sorted(self.buckets):
            count = self.buckets[bound]
            if bound == float("inf"):
                label = f">{prev_bound:g}"
            elif bound - prev_bound <= 1:
                label = f"{bound:g}"
            else:
                label = f"{prev_bound + 1:g}-{bound:g}"
            out.append((label, count - prev_count))
            prev_bound, prev_count = bound, count
        return out


def fetch_metrics(base_url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def batch_sizes(metrics_text: str) -> dict[tuple[str, str], BatchSizes]:
    """``tome_batch_size`` per (model, tier) from a /metrics exposition."""
    out: dict[tuple[str, str], BatchSizes] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = defaultdict(dict)
    sums: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "tome_batch_size":
            continue
        for sample in family.samples:
            key = (sample.labels.get("model", ""), sample.labels.get("tier", ""))
            if sample.name.endswith("_bucket"):
                buckets[key][float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):
                sums[key] = sample.value
            elif sample.name.endswith("_count"):
                counts[key] = sample.value
    for key, b in buckets.items():
        out[key] = BatchSizes(key[0], key[1], b, counts.get(key, 0.0), sums.get(key, 0.0))
    return out


def batch_sizes_delta(
    before: dict[tuple[str, str], BatchSizes], after: dict[tuple[str, str], BatchSizes]
) -> dict[tuple[str, str], BatchSizes]:
    """What happened between two scrapes (counters only grow while the service keeps running)."""
    out = {}
    for key, a in after.items():
        b = before.get(key)
        if b is None:
            out[key] = a
            continue
        out[key] = BatchSizes(
            a.model,
            a.tier,
            {le: v - b.buckets.get(le, 0.0) for le, v in a.buckets.items()},
            a.batches - b.batches,
            a.images - b.images,
        )
    return {k: v for k, v in out.items() if v.batches > 0}


def format_summary(
    tiers: dict[str, TierStats], images_per_request: int, batches: dict[tuple[str, str], BatchSizes]
) -> str:
    lines = [
        f"{'tier':<10} {'requests':>8} {'req/s':>8} {'images/s':>9} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'fail %':>7} {'503 %':>7}"
    ]
    for s in sorted(tiers.values(), key=lambda s: s.tier):
        ok_rps = s.rps * (s.ok / s.requests) if s.requests else 0.0
        lines.append(
            f"{s.tier:<10} {s.requests:>8d} {s.rps:>8.2f} {ok_rps * images_per_request:>9.2f} "
            f"{s.p50_ms:>8.0f} {s.p95_ms:>8.0f} {s.p99_ms:>8.0f} "
            f"{100 * s.failure_rate():>7.2f} {100 * s.rejection_rate():>7.2f}"
        )
    lines.append("")
    lines.append("service batch sizes during the run (tome_batch_size, from /metrics):")
    if not batches:
        lines.append("  (no batches recorded)")
    for (model, tier), b in sorted(batches.items()):
        dist = ", ".join(f"{label}: {count:g}" for label, count in b.per_bucket() if count)
        lines.append(f"  {model}/{tier}: {b.batches:g} batches, mean {b.mean():.2f} images; {dist}")
    return "\n".join(lines)
