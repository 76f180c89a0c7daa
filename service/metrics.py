"""Prometheus metrics of one app, on the app's own registry (several apps can share a process)."""

from __future__ import annotations

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
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
)


class Metrics:
    """The service's metrics (names fixed by the deployment's dashboards and alerts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=r)  # python_info
        self.requests = Counter(
            "tome_requests", "Classify requests by HTTP status", ["model", "tier", "status"], registry=r
        )
        self.request_duration = Histogram(
            "tome_request_duration_seconds",
            "End-to-end classify latency",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "tome_queue_wait_seconds",
            "Time an image waited in its queue before its batch started",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "tome_batch_duration_seconds",
            "Compute time of one batch",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tome_batch_size", "Images per batch", ["model", "tier"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.images = Counter("tome_images", "Images classified", ["model", "tier"], registry=r)
        self.queue_depth = Gauge(
            "tome_queue_depth", "Images waiting per queue", ["model", "tier"], registry=r
        )
        self.in_flight = Gauge("tome_in_flight_requests", "Classify requests being handled", registry=r)
        self.rejections = Counter("tome_rejections", "Rejected requests or images", ["reason"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason=reason)  # export zeros so rate() works from the start
        self.tier_info = Gauge(
            "tome_tier_info", "Tier schedule (value is always 1)", ["model", "tier", "schedule"], registry=r
        )
        self.tier_gflops = Gauge(
            "tome_tier_gflops", "GFLOPs per image of a tier", ["model", "tier"], registry=r
        )
        self.device_memory = Gauge(
            "tome_device_memory_bytes", "CUDA memory allocated by tensors", ["device"], registry=r
        )

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def render(self, cuda_devices: list[torch.device]) -> bytes:
        """Text exposition; reads CUDA memory at scrape time (absent on CPU)."""
        for device in cuda_devices:
            self.device_memory.labels(device=str(device)).set(torch.cuda.memory_allocated(device))
        return generate_latest(self.registry)
