"""Dynamic batching: one bounded queue per (model, tier), one executor thread per device.

Everything except the model call runs on the event loop thread, so queue state needs no locks. The
executor takes, among the queues whose batch is closed (full, or its head waited ``max_wait``), the one
whose head has waited longest, so no tier starves; batches run one at a time per device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .metrics import Metrics

log = logging.getLogger(__name__)

RunBatch = Callable[[list[torch.Tensor]], torch.Tensor]
"""Runs in the device thread: preprocessed images -> class probabilities ``[B, C]`` on the CPU."""


class QueueFull(Exception):
    """The (model, tier) queue is at max_queue_size."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before its batch started."""


class Draining(Exception):
    """The service is shutting down and accepts no new work."""


@dataclass(frozen=True)
class JobResult:
    probs: torch.Tensor  # [num_classes] float32
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(eq=False)
class Job:
    """One image waiting for its batch. ``abandoned`` jobs (deadline passed, client gone) are skipped."""

    tensor: torch.Tensor
    future: asyncio.Future[JobResult]
    enqueued: float
    deadline: float
    started: bool = False
    abandoned: bool = False


@dataclass(eq=False)
class TierQueue:
    model: str
    tier: str
    run: RunBatch
    jobs: deque[Job] = field(default_factory=deque)


class DeviceBatcher:
    """Groups queued images into batches and runs them, one batch at a time, on one device."""

    def __init__(
        self, device: str, max_batch_size: int, max_wait_s: float, max_queue_size: int, metrics: Metrics
    ) -> None:
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self.queues: list[TierQueue] = []
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tome-{device}")
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def add_queue(self, model: str, tier: str, run: RunBatch) -> TierQueue:
        queue = TierQueue(model, tier, run)
        self.queues.append(queue)
        self.metrics.queue_depth.labels(model=model, tier=tier).set(0)
        return queue

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.device}")

    async def close(self) -> None:
        """Run every queued job, then stop (new submissions raise ``Draining``)."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    async def run_in_device_thread(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on this device's thread (warm-up uses it, so no CUDA work ever overlaps)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def submit(self, queue: TierQueue, tensor: torch.Tensor, deadline: float) -> Job:
        """Enqueue one image; raises ``QueueFull`` or ``Draining`` at once instead of waiting."""
        if self._closing:
            raise Draining()
        if len(queue.jobs) >= self.max_queue_size:
            raise QueueFull()
        job = Job(tensor, asyncio.get_running_loop().create_future(), time.monotonic(), deadline)
        queue.jobs.append(job)
        self._set_depth(queue)
        self._wakeup.set()
        return job

    def _set_depth(self, queue: TierQueue) -> None:
        self.metrics.queue_depth.labels(model=queue.model, tier=queue.tier).set(len(queue.jobs))

    def _prune_head(self, queue: TierQueue) -> None:
        while queue.jobs and (queue.jobs[0].abandoned or queue.jobs[0].future.done()):
            queue.jobs.popleft()
        self._set_depth(queue)

    def _pick(self, now: float) -> tuple[TierQueue | None, float | None]:
        """The closed queue with the oldest head, else how long until the next one closes."""
        best: TierQueue | None = None
        next_close: float | None = None
        for queue in self.queues:
            self._prune_head(queue)
            if not queue.jobs:
                continue
            head = queue.jobs[0].enqueued
            closes_at = head + self.max_wait_s
            closed = self._closing or len(queue.jobs) >= self.max_batch_size or now >= closes_at
            if closed:
                if best is None or head < best.jobs[0].enqueued:
                    best = queue
            elif next_close is None or closes_at < next_close:
                next_close = closes_at
        return best, (None if next_close is None else max(0.0, next_close - now))

    def _take(self, queue: TierQueue, now: float) -> list[Job]:
        jobs: list[Job] = []
        while queue.jobs and len(jobs) < self.max_batch_size:
            job = queue.jobs.popleft()
            if job.abandoned or job.future.done():
                continue
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded())
                continue
            job.started = True
            jobs.append(job)
        self._set_depth(queue)
        return jobs

    async def _loop(self) -> None:
        while True:
            now = time.monotonic()
            queue, wait = self._pick(now)
            if queue is None:
                if self._closing:
                    return
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                continue
            jobs = self._take(queue, now)
            if jobs:
                await self._execute(queue, jobs)

    async def _execute(self, queue: TierQueue, jobs: list[Job]) -> None:
        labels = {"model": queue.model, "tier": queue.tier}
        start = time.monotonic()
        for job in jobs:
            self.metrics.queue_wait.labels(**labels).observe(start - job.enqueued)
        tensors = [job.tensor for job in jobs]
        loop = asyncio.get_running_loop()
        try:
            probs = await loop.run_in_executor(self._thread, queue.run, tensors)
        except Exception as e:
            log.exception("batch of %d failed on %s %s", len(jobs), queue.model, queue.tier)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        elapsed = time.monotonic() - start
        self.metrics.batch_duration.labels(**labels).observe(elapsed)
        self.metrics.batch_size.labels(**labels).observe(len(jobs))
        self.metrics.images.labels(**labels).inc(len(jobs))
        for i, job in enumerate(jobs):
            if not job.future.done():
                job.future.set_result(JobResult(probs[i], start - job.enqueued, elapsed, len(jobs)))
