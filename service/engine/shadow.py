"""The fidelity monitor: does a merging tier still agree with r=0 on production images as calibrated?

A fraction (``fidelity.sample_rate``) of the images served at a merging tier is copied, with the top-1
the tier answered, into a bounded shadow queue. The batcher runs the queue at r=0 only when the device is
idle (no live image queued, no batch in flight), a few images at a time; when the queue is full a new
sample is dropped and counted. So under load shadow work costs nothing, and when idle it costs at most
one small batch of latency to a request that arrives mid-shadow-batch.

Counts: ``tome_shadow_checks_total{model,tier}`` and ``tome_shadow_agreements_total{model,tier}`` (their
ratio is the live agreement, to compare with the calibrated ``tome_tier_agreement``) and
``tome_shadow_dropped_total{model,tier}``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from ..observability.metrics import EngineMetrics

RunExact = Callable[[torch.Tensor], Awaitable[list[int]]]
"""uint8 images ``[n, H, W, 3]`` -> their top-1 at r=0 (on the device thread)."""


@dataclass(frozen=True)
class _Sample:
    row: int  # in the pixel ring
    tier: str
    served_top1: int


class ShadowMonitor:
    """One model's shadow queue: a ring of ``capacity`` uint8 images and what each tier answered."""

    def __init__(
        self,
        model: str,
        slots: torch.Tensor,
        run_exact: RunExact,
        metrics: EngineMetrics,
        sample_rate: float,
        capacity: int,
        batch_size: int,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.slots = slots
        self.run_exact = run_exact
        self.metrics = metrics
        self.sample_rate = sample_rate
        self.batch_size = batch_size
        self.pixels = torch.empty((capacity, *slots.shape[1:]), dtype=torch.uint8)
        self._free: deque[int] = deque(range(capacity))
        self._pending: deque[_Sample] = deque()
        self._random = random.Random(seed)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def offer(self, tier: str, slots: Sequence[int], top1: Sequence[int]) -> None:
        """After a merging tier's batch: sample some of its images (their slots are still the request's)."""
        for slot, served in zip(slots, top1, strict=True):
            if self._random.random() >= self.sample_rate:
                continue
            if not self._free:
                self.metrics.shadow_dropped.labels(model=self.model, tier=tier).inc()
                continue
            row = self._free.popleft()
            self.pixels[row].copy_(self.slots[slot])
            self._pending.append(_Sample(row, tier, served))

    async def run_one_batch(self) -> None:
        """Re-run up to ``batch_size`` samples at r=0 and count agreements (call only when idle)."""
        batch = [self._pending.popleft() for _ in range(min(self.batch_size, len(self._pending)))]
        if not batch:
            return
        try:
            exact = await self.run_exact(self.pixels[[s.row for s in batch]])
        finally:
            self._free.extend(s.row for s in batch)
        for sample, top1 in zip(batch, exact, strict=True):
            labels = {"model": self.model, "tier": sample.tier}
            self.metrics.shadow_checks.labels(**labels).inc()
            if top1 == sample.served_top1:
                self.metrics.shadow_agreements.labels(**labels).inc()
