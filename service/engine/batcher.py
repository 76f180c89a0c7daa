"""Dynamic batching on one device: one bounded queue per (model, tier), batches run by a ``Runner``.

Everything here runs on the engine's event-loop thread, so queue state needs no locks. Among the queues
whose batch is closed (full, or its head waited ``max_wait``), the one whose head has waited longest goes
next, so no tier starves. Up to ``pipeline_depth`` batches are in flight: on CUDA the next batch is
staged and launched while the previous one runs (they run one after another on the device); on a CPU
with ``lanes`` > 1, that many batches run side by side, one per lane.

A queue's bound counts *live* images only: an image whose request was cancelled (client gone, deadline
passed) stops counting at once, and is skipped when it reaches the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..observability.metrics import EngineMetrics, QueueMetrics
from .auto import BatchTimes
from .faults import Fatal, FatalDeviceError, Watchdog, is_fatal
from .shadow import ShadowMonitor

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Admitting these images would take the (model, tier) queue over max_queue_size."""


class Draining(Exception):
    """The engine is shutting down and accepts no new work."""


class DeadlineExceeded(Exception):
    """The job's deadline passed before its batch started."""


@dataclass(frozen=True)
class BatchOutput:
    """What a runner returns for one batch: per image, its top-k indices and scores; ``errors`` (when
    not None) per image None or why it could not be decoded (device JPEG decode: that image fails alone,
    its top-k is meaningless); ``representative`` False: ``inference_s`` is not what such a batch takes
    under load (a CPU batch that ran alone on every thread), so it does not update the predicted times."""

    indices: list[list[int]]
    scores: list[list[float]]
    inference_s: float
    errors: list[str | None] | None = None
    representative: bool = True


RunBatch = Callable[[Sequence[int], Sequence[bool]], Awaitable[BatchOutput]]
"""Runs one batch given its images' slot indices and, per slot, whether it holds a JPEG's bytes for
the device to decode rather than pixels (the queue's tier is bound into it)."""


@dataclass(frozen=True)
class JobResult:
    indices: list[int]
    scores: list[float]
    queue_s: float
    inference_s: float
    batch_size: int
    error: str | None = None  # the image could not be decoded on the device (indices, scores empty)


@dataclass(eq=False)
class Job:
    """One image waiting for its batch; ``done`` is called exactly once, with a result or an exception,
    unless the job was abandoned before it started."""

    slot: int
    enqueued: float
    deadline: float
    done: Callable[[Job, JobResult | BaseException], None]
    jpeg: bool = False  # the slot holds a JPEG's bytes, decoded on the device
    started: bool = False
    abandoned: bool = False


@dataclass(eq=False)
class TierQueue:
    model: str
    tier: str
    run: RunBatch
    metrics: QueueMetrics
    shadow: ShadowMonitor | None = None  # merging tiers: sampled for the fidelity monitor
    jobs: deque[Job] = field(default_factory=deque)
    live: int = 0  # jobs neither started nor abandoned


class Batcher:
    """Groups queued images into batches and runs them on one device."""

    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        pipeline_depth: int,
        metrics: EngineMetrics,
        fatal: Fatal,
        batch_timeout_s: float = 120.0,
        lanes: int = 1,
    ) -> None:
        self.fatal = fatal
        self.lanes = lanes  # batches the device runs side by side (CPU lanes); 1: one after another
        self.watchdog = Watchdog(batch_timeout_s, fatal)
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self.queues: list[TierQueue] = []
        self.batch_times: dict[str, BatchTimes] = {}  # per model, for tier=auto's predictions
        self._running: dict[int, tuple[float, str, str, int]] = {}  # started, model, tier, images
        self._pipeline = asyncio.Semaphore(pipeline_depth)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def add_queue(
        self, model: str, tier: str, run: RunBatch, shadow: ShadowMonitor | None = None
    ) -> TierQueue:
        queue = TierQueue(model, tier, run, self.metrics.for_queue(model, tier), shadow)
        self.queues.append(queue)
        return queue

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if self._closing and not task.cancelled() and task.exception() is None:
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        self.fatal(f"the batcher's loop ended while serving: {reason}")

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        return not self._in_flight and not any(q.live for q in self.queues)

    async def close(self) -> None:
        """Run every live queued job, then stop (new submissions raise ``Draining``)."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._in_flight:
            await asyncio.wait(self._in_flight)
        self.watchdog.stop()

    def submit(
        self,
        queue: TierQueue,
        slots: Sequence[int],
        deadline: float,
        done: Callable[[Job, JobResult | BaseException], None],
        jpeg: Sequence[bool] | None = None,
    ) -> list[Job]:
        """Enqueue a request's images, all or none; raises ``QueueFull`` or ``Draining`` at once.
        ``jpeg``: per slot, whether it holds a JPEG's bytes (default: all pixels)."""
        if self._closing:
            raise Draining()
        if queue.live + len(slots) > self.max_queue_size:
            raise QueueFull()
        now = time.monotonic()
        flags = jpeg if jpeg is not None else [False] * len(slots)
        jobs = [Job(slot, now, deadline, done, bool(j)) for slot, j in zip(slots, flags, strict=True)]
        queue.jobs.extend(jobs)
        queue.live += len(jobs)
        self._set_depth(queue)
        self._wakeup.set()
        return jobs

    def abandon(self, queue: TierQueue, jobs: Sequence[Job]) -> int:
        """Skip the jobs that have not started; returns how many were still waiting."""
        waiting = [job for job in jobs if not job.started and not job.abandoned]
        for job in waiting:
            job.abandoned = True
        queue.live -= len(waiting)
        self._set_depth(queue)
        return len(waiting)

    def backlog_s(self, now: float) -> float:
        """Predicted seconds until the device has run every running batch and every live queued image."""
        return self._work_s(now) / self.lanes

    def finish_s(self, queue: TierQueue, images: int, now: float) -> float:
        """Predicted seconds until ``images`` more added to ``queue`` would have run: every batch ahead of
        them and the queue's own, shared among the lanes, with their own (last) batch whole on one lane.
        However free lanes take the batches, the last one ends within (work - last) / lanes + last (list
        scheduling's bound); with one lane that is all the work, one batch after another."""
        times = self.batch_times.get(queue.model)
        if times is None:
            return 0.0
        total = queue.live + images
        last = times.batch(queue.tier, total % self.max_batch_size or min(total, self.max_batch_size))
        work = self._work_s(now, leave_out=queue) + times.drain(queue.tier, total)
        return (work - last) / self.lanes + last

    def _work_s(self, now: float, leave_out: TierQueue | None = None) -> float:
        """Device seconds of work ahead: every live queued image (but ``leave_out``'s) at its tier's
        measured batch times, and what is left of the batches running."""
        total = 0.0
        for queue in self.queues:
            times = self.batch_times.get(queue.model)
            if times is not None and queue.live and queue is not leave_out:
                total += times.drain(queue.tier, queue.live)
        if self.lanes == 1:
            return total + self._busy_s(now)
        return total + sum(max(0.0, started + s - now) for started, s in self._running_s())  # side by side

    def _running_s(self) -> list[tuple[float, float]]:
        """(start, predicted seconds) of each batch in flight whose model has batch times, by start."""
        running = []
        for started, model, tier, images in sorted(self._running.values()):
            times = self.batch_times.get(model)
            if times is not None:
                running.append((started, times.batch(tier, images)))
        return running

    def _busy_s(self, now: float) -> float:
        """Predicted seconds until a one-lane device has run the batches in flight. They run one after
        another: with ``pipeline_depth`` > 1 a batch launched behind another waits for it on the device,
        so crediting each with the time since its launch would count the overlap twice."""
        end = -math.inf
        for started, seconds in self._running_s():  # one past its predicted end ends no earlier than now
            end = max(now, max(end, started) + seconds)
        return max(0.0, end - now)

    def _set_depth(self, queue: TierQueue) -> None:
        queue.metrics.depth.set(queue.live)

    @staticmethod
    def _prune_head(queue: TierQueue) -> None:
        while queue.jobs and queue.jobs[0].abandoned:
            queue.jobs.popleft()

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
            closed = self._closing or queue.live >= self.max_batch_size or now >= closes_at
            if closed:
                if best is None or head < best.jobs[0].enqueued:
                    best = queue
            elif next_close is None or closes_at < next_close:
                next_close = closes_at
        return best, (None if next_close is None else max(0.0, next_close - now))

    def _take(self, queue: TierQueue, now: float) -> list[Job]:
        """The next batch of ``queue``. A job whose deadline falls before this batch can end (behind the
        batches in flight, at the measured batch times) gets its 504 now instead of device time: under
        overload a FIFO queue otherwise spends the device on answers nobody waits for any more."""
        times = self.batch_times.get(queue.model)
        runs_s = times.batch(queue.tier, min(queue.live, self.max_batch_size)) if times is not None else 0.0
        # one lane: behind the batches in flight, if any; several: this batch has a lane of its own
        ends_at = now + (self._busy_s(now) if self.lanes == 1 else 0.0) + runs_s
        jobs: list[Job] = []
        while queue.jobs and len(jobs) < self.max_batch_size:
            job = queue.jobs.popleft()
            if job.abandoned:
                continue
            queue.live -= 1
            job.started = True
            if ends_at > job.deadline:
                job.done(job, DeadlineExceeded())
                continue
            jobs.append(job)
        self._set_depth(queue)
        return jobs

    async def _loop(self) -> None:
        while True:
            await self._pipeline.acquire()  # at most pipeline_depth batches in flight
            while True:
                now = time.monotonic()
                queue, wait = self._pick(now)
                if queue is not None or self._closing:
                    break
                shadow = self._idle_shadow()
                if shadow is not None:  # the device is idle: one small batch of fidelity checks
                    self._launch(self._shadow_batch(shadow))
                    await self._pipeline.acquire()
                    continue
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
            if queue is None:
                self._pipeline.release()
                return
            jobs = self._take(queue, now)
            if not jobs:
                self._pipeline.release()
                continue
            self._launch(self._execute(queue, jobs))

    def _launch(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as an in-flight batch (it holds one pipeline slot until it ends)."""

        async def holding_a_slot() -> None:
            try:
                await work
            except Exception:  # _execute answers its own jobs: this is shadow work failing
                log.exception("a fidelity-monitor batch failed")
            finally:  # not in flight any more before the slot frees: the loop must see the device idle
                self._in_flight.discard(asyncio.current_task())  # type: ignore[arg-type]
                self._pipeline.release()
                self._wakeup.set()

        self._in_flight.add(asyncio.get_running_loop().create_task(holding_a_slot()))

    async def _shadow_batch(self, shadow: ShadowMonitor) -> None:
        """A batch of fidelity checks, watched like any batch (a device hung in it hangs every queue), and
        a sticky device error in it is as fatal."""
        token = self.watchdog.begin(f"of fidelity checks on {shadow.model}")
        try:
            await shadow.run_one_batch()
        except Exception as e:
            if is_fatal(e):  # the next live batch would fail on the same broken device
                self.fatal(f"device error: {e}")
            raise
        finally:
            self.watchdog.end(token)

    def _idle_shadow(self) -> ShadowMonitor | None:
        """A shadow queue with work, if nothing live is queued or running."""
        if self._in_flight or any(q.live for q in self.queues):
            return None
        return next((q.shadow for q in self.queues if q.shadow is not None and q.shadow.pending), None)

    async def _execute(self, queue: TierQueue, jobs: list[Job]) -> None:
        series = queue.metrics
        start = time.monotonic()
        for job in jobs:
            series.wait.observe(start - job.enqueued)
        token = self.watchdog.begin(f"of {len(jobs)} on {queue.model}/{queue.tier}")
        self._running[token] = (start, queue.model, queue.tier, len(jobs))
        try:
            out = await queue.run([job.slot for job in jobs], [job.jpeg for job in jobs])
        except Exception as e:
            log.exception("batch of %d failed on %s %s", len(jobs), queue.model, queue.tier)
            for job in jobs:
                job.done(job, e)
            if isinstance(e, FatalDeviceError):
                self.fatal(f"device error: {e}")
            return
        finally:
            self.watchdog.end(token)
            del self._running[token]
        times = self.batch_times.get(queue.model)
        if times is not None and out.representative:
            times.observe(queue.tier, len(jobs), out.inference_s)
        series.batch_duration.observe(out.inference_s)
        series.batch_size.observe(len(jobs))
        series.images.inc(len(jobs))
        errors = out.errors or [None] * len(jobs)
        self._count_device_decodes(queue.model, jobs, errors)
        if queue.shadow is not None:  # before answering: the slots are still these requests'
            served = [i for i, error in enumerate(errors) if error is None]
            top1 = [out.indices[i][0] for i in served]
            queue.shadow.offer(queue.tier, [jobs[i].slot for i in served], top1)
        for i, job in enumerate(jobs):
            queue_s = start - job.enqueued
            if errors[i] is not None:
                job.done(job, JobResult([], [], queue_s, out.inference_s, len(jobs), errors[i]))
                continue
            job.done(job, JobResult(out.indices[i], out.scores[i], queue_s, out.inference_s, len(jobs)))

    def _count_device_decodes(self, model: str, jobs: Sequence[Job], errors: Sequence[str | None]) -> None:
        decoded = sum(1 for job, error in zip(jobs, errors, strict=True) if job.jpeg and error is None)
        failed = sum(1 for job, error in zip(jobs, errors, strict=True) if job.jpeg and error is not None)
        if decoded:
            self.metrics.device_decodes.labels(model=model, result="decoded").inc(decoded)
        if failed:
            self.metrics.device_decodes.labels(model=model, result="failed").inc(failed)
