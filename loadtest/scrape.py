"""The service's ``/metrics`` as samples, and the sums the benchmarks read from them."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, dict[str, str], float]  # name, labels, value


def scrape(url: str) -> list[Sample]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(value for n, got, value in samples if n == name and labels.items() <= got.items())


def by_label(samples: list[Sample], name: str, label: str) -> dict[str, float]:
    """Sum of ``name``'s samples per value of ``label``."""
    out: dict[str, float] = {}
    for n, labels, value in samples:
        if n == name and label in labels:
            out[labels[label]] = out.get(labels[label], 0.0) + value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """What changed between two ``by_label`` readings (unchanged keys left out)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
