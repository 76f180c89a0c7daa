"""Prometheus metrics: the engine's (queues, batches, tiers, device) and the front-ends' (requests).

Across processes, prometheus_client's multiprocess mode aggregates them: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before any process starts, every process writes its values there, and any
front-end's ``/metrics`` reads them all (counters and histograms summed over processes, dead ones too;
gauges over live processes). Without that variable (tests running engine and app in one process) each
metrics object registers on the ``registry`` it is given and ``render`` reads that registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from .processes import ProcessTreeCollector

disable_created_metrics()  # no *_created series: they double the exposition and no dashboard reads them

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
REJECTION_REASONS = (
    "queue_full",
    "deadline",
    "bad_image",
    "too_large",
    "unknown_tier",
    "unknown_model",
    "bad_request",
    "draining",
    "warming_up",
    "overloaded",
    "engine_down",
    "timeout",
    "rate_limited",
    "not_found",
    "method_not_allowed",
)


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class EngineMetrics:
    """Written by the engine process."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.queue_wait = Histogram(
            "tome_queue_wait_seconds",
            "Time an image waited in its queue before its batch started",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "tome_batch_duration_seconds",
            "Device time of one batch",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tome_batch_size", "Images per batch", ["model", "tier"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.images = Counter("tome_images", "Images classified", ["model", "tier"], registry=r)
        self.queue_depth = Gauge(
            "tome_queue_depth",
            "Live images waiting per queue",
            ["model", "tier"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.tier_info = Gauge(
            "tome_tier_info",
            "Tier schedule (value is always 1)",
            ["model", "tier", "schedule"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tier_gflops = Gauge(
            "tome_tier_gflops",
            "GFLOPs per image of a tier",
            ["model", "tier"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tier_speedup = Gauge(
            "tome_tier_speedup",
            "Tier speedup over r=0 measured at warm-up on this device",
            ["model", "tier"],
            registry=r,
            multiprocess_mode="livemax",
        )
        calibrated = ["model", "tier"]
        self.tier_agreement = Gauge(
            "tome_tier_agreement",
            "Calibrated share of images whose top-1 equals r=0's (calibrated tiers only)",
            calibrated,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tier_agreement_low = Gauge(
            "tome_tier_agreement_low",
            "Lower end of its 95% interval",
            calibrated,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tier_agreement_high = Gauge(
            "tome_tier_agreement_high",
            "Upper end of its 95% interval",
            calibrated,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tier_accuracy = Gauge(
            "tome_tier_accuracy",
            "Calibrated top-1 accuracy (calibrations with labels only)",
            calibrated,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tier_calibrated_speedup = Gauge(
            "tome_tier_calibrated_speedup",
            "Median speedup over r=0 measured by the calibration (its device, dtype and batch size)",
            calibrated,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.device_memory = Gauge(
            "tome_device_memory_bytes",
            "CUDA memory allocated by tensors",
            ["device"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.shadow_checks = Counter(
            "tome_shadow_checks",
            "Served images re-run at r=0 by the fidelity monitor",
            ["model", "tier"],
            registry=r,
        )
        self.shadow_agreements = Counter(
            "tome_shadow_agreements",
            "Shadow checks whose r=0 top-1 equals the top-1 the tier served",
            ["model", "tier"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "tome_shadow_dropped",
            "Shadow samples dropped because the shadow queue was full",
            ["model", "tier"],
            registry=r,
        )
        self.auto_decisions = Counter(
            "tome_auto_tier",
            "tier=auto requests by the tier chosen (none: refused) and why",
            ["model", "tier", "reason"],
            registry=r,
        )
        self.auto_agreement = Gauge(
            "tome_auto_effective_agreement",
            "Calibrated agreement with r=0 of the tiers auto chose, averaged over the last minutes",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.device_decodes = Counter(
            "tome_device_decodes",
            "JPEGs decoded on the engine's device (limits.device_jpeg_decode), by result (decoded, failed)",
            ["model", "result"],
            registry=r,
        )
        self.parallel_batches = Gauge(
            "tome_device_parallel_batches",
            "Batches the device runs at once (CPU: batching.cpu_parallel_batches, at most one per torch "
            "thread; CUDA: 1, batches queue on the device): rate(tome_batch_duration_seconds_sum) over "
            "this is the device's busy share",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.engine_ready = Gauge(
            "tome_engine_ready",
            "1 once every model is loaded and warm",
            registry=r,
            multiprocess_mode="livemax",
        )

    def for_queue(self, model: str, tier: str) -> QueueMetrics:
        """One queue's series, resolved once (``labels()`` costs a lookup and a lock per call) and exported
        at zero from the start (rate() and dashboards need them before traffic)."""
        labels = {"model": model, "tier": tier}
        series = QueueMetrics(
            self.queue_depth.labels(**labels),
            self.queue_wait.labels(**labels),
            self.batch_duration.labels(**labels),
            self.batch_size.labels(**labels),
            self.images.labels(**labels),
        )
        series.depth.set(0)
        return series

    def init_device_decode(self, model: str) -> None:
        for result in ("decoded", "failed"):
            self.device_decodes.labels(model=model, result=result)

    def init_auto(self, model: str, tiers: list[str]) -> None:
        for tier in tiers:
            self.auto_decisions.labels(model=model, tier=tier, reason="fits")

    def init_shadow(self, model: str, tier: str) -> None:
        for counter in (self.shadow_checks, self.shadow_agreements, self.shadow_dropped):
            counter.labels(model=model, tier=tier)


@dataclass(frozen=True)
class QueueMetrics:
    depth: Gauge
    wait: Histogram
    batch_duration: Histogram
    batch_size: Histogram
    images: Counter


class FrontendMetrics:
    """Written by the front-end processes."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.requests = Counter(
            "tome_requests", "Classify requests by HTTP status", ["model", "tier", "status"], registry=r
        )
        self.request_duration = Histogram(
            "tome_request_duration_seconds",
            "End-to-end latency of answered (200) classify requests",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "tome_preprocess_seconds",
            "Decode + resize time of one image",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "tome_in_flight_requests",
            "Classify requests admitted and not yet answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.decode_backlog = Gauge(
            "tome_decode_backlog_images",
            "Images admitted for decoding and not yet handed to the engine",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejections = Counter("tome_rejections", "Rejected requests or images", ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)  # export zeros so rate() works from the start

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def init_tier(self, model: str, tier: str) -> None:
        """Export a tier's request series at zero from the start."""
        self.requests.labels(model=model, tier=tier, status="200")
        self.request_duration.labels(model=model, tier=tier)
        self.preprocess_duration.labels(model=model)


def render(registry: CollectorRegistry, process_roles: Callable[[], dict[str, int]]) -> bytes:
    """The text exposition: every process's values in multiprocess mode, else ``registry``; plus the CPU
    and memory of every process of the service (``process_roles``: role -> pid)."""
    if multiprocess():
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    exposition = generate_latest(registry)
    extra = CollectorRegistry()
    PlatformCollector(registry=extra)
    ProcessTreeCollector(process_roles, registry=extra)
    return exposition + generate_latest(extra)
