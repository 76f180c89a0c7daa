"""The engine's dynamic batcher on its own: batch closing, fairness, live-job bounds, all-or-none
admission, deadlines, pipelining, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from prometheus_client import CollectorRegistry

from service.engine.auto import BatchTimes
from service.engine.batcher import (
    Batcher,
    BatchOutput,
    DeadlineExceeded,
    Draining,
    Job,
    JobResult,
    QueueFull,
)
from service.engine.faults import FatalDeviceError, is_fatal
from service.observability.metrics import EngineMetrics

FAR = 1e12


class Recorder:
    """A RunBatch that records (tier, slots) per batch, answers slot*2 as its 'index', and can block
    (in a worker thread, like the device thread) until a gate opens."""

    def __init__(
        self, name: str, log: list[tuple[str, list[int]]], gate: threading.Event | None = None
    ) -> None:
        self.name, self.log, self.gate = name, log, gate

    async def __call__(self, slots: Sequence[int], jpeg: Sequence[bool]) -> BatchOutput:
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 5)
        self.log.append((self.name, list(slots)))
        return BatchOutput([[s * 2] for s in slots], [[1.0] for _ in slots], 0.001)


class Results:
    """Collects job outcomes; ``wait(n)`` until n arrived."""

    def __init__(self) -> None:
        self.by_slot: dict[int, JobResult | BaseException] = {}
        self.event = asyncio.Event()

    def __call__(self, job: Job, result: JobResult | BaseException) -> None:
        assert job.slot not in self.by_slot, "done called twice"
        self.by_slot[job.slot] = result
        self.event.set()

    async def wait(self, n: int, timeout: float = 5) -> None:
        async def until() -> None:
            while len(self.by_slot) < n:
                self.event.clear()
                await self.event.wait()

        await asyncio.wait_for(until(), timeout)


def make(
    max_batch: int = 4,
    wait_ms: float = 1000,
    queue: int = 16,
    depth: int = 1,
    timeout_s: float = 60,
    lanes: int = 1,
) -> Batcher:
    """A batcher whose ``fatal`` records its reasons in ``batcher.fatal_reasons``."""
    reasons: list[str] = []
    metrics = EngineMetrics(CollectorRegistry())
    b = Batcher(max_batch, wait_ms / 1000, queue, depth, metrics, reasons.append, timeout_s, lanes=lanes)
    b.fatal_reasons = reasons  # type: ignore[attr-defined]
    return b


def test_batch_closes_when_full_before_max_wait() -> None:
    async def main() -> None:
        log: list = []
        b, done = make(max_batch=4, wait_ms=10_000), Results()
        q = b.add_queue("m", "t", Recorder("t", log))
        b.start()
        b.submit(q, [0, 1, 2, 3], FAR, done)
        await done.wait(4)
        assert log == [("t", [0, 1, 2, 3])]
        assert {s: r.indices for s, r in done.by_slot.items()} == {0: [0], 1: [2], 2: [4], 3: [6]}
        assert all(r.batch_size == 4 for r in done.by_slot.values())
        await b.close()

    asyncio.run(main())


def test_batch_closes_after_max_wait_when_not_full() -> None:
    async def main() -> None:
        log: list = []
        b, done = make(max_batch=8, wait_ms=50), Results()
        q = b.add_queue("m", "t", Recorder("t", log))
        b.start()
        start = time.monotonic()
        b.submit(q, [0, 1, 2], FAR, done)
        await done.wait(3)
        assert 0.04 <= time.monotonic() - start < 1.0
        assert log == [("t", [0, 1, 2])]
        await b.close()

    asyncio.run(main())


def test_oldest_head_first_across_tiers() -> None:
    async def main() -> None:
        log: list = []
        gate = threading.Event()
        b, done = make(max_batch=2, wait_ms=0), Results()
        qa = b.add_queue("m", "a", Recorder("a", log, gate))
        qb = b.add_queue("m", "b", Recorder("b", log, gate))
        b.start()
        b.submit(qa, [0], FAR, done)  # occupies the device until the gate opens
        await asyncio.sleep(0.05)
        b.submit(qb, [1], FAR, done)  # b's head is now the oldest waiting
        await asyncio.sleep(0.01)
        b.submit(qa, [2, 3], FAR, done)
        b.submit(qb, [4], FAR, done)
        gate.set()
        await done.wait(5)
        assert log == [("a", [0]), ("b", [1, 4]), ("a", [2, 3])]
        await b.close()

    asyncio.run(main())


def test_queue_bound_counts_live_jobs_and_admits_all_or_none() -> None:
    async def main() -> None:
        b, done = make(max_batch=2, queue=3), Results()
        q = b.add_queue("m", "t", Recorder("t", []))
        jobs = b.submit(q, [0, 1], FAR, done)
        with pytest.raises(QueueFull):
            b.submit(q, [2, 3], FAR, done)  # 2 + 2 > 3: neither image is queued
        assert q.live == 2 and len(q.jobs) == 2
        assert b.abandon(q, jobs[:1]) == 1  # a cancelled image stops counting at once
        b.submit(q, [4, 5], FAR, done)
        assert q.live == 3
        b.start()
        await b.close()  # drains the live jobs
        assert set(done.by_slot) == {1, 4, 5}

    asyncio.run(main())


def test_abandoned_and_expired_jobs_never_run() -> None:
    async def main() -> None:
        log: list = []
        b, done = make(max_batch=8, wait_ms=20), Results()
        q = b.add_queue("m", "t", Recorder("t", log))
        gone = b.submit(q, [0], FAR, done)
        b.abandon(q, gone)  # client went away
        b.submit(q, [1], time.monotonic() - 1, done)  # deadline already passed
        b.submit(q, [2], FAR, done)
        b.start()
        await done.wait(2)
        assert log == [("t", [2])]
        assert isinstance(done.by_slot[1], DeadlineExceeded)
        assert 0 not in done.by_slot
        await b.close()

    asyncio.run(main())


def test_a_job_that_cannot_finish_before_its_deadline_gets_its_504_without_running() -> None:
    """With a measured batch time of 1 s, a job due in 0.3 s would be answered too late: it is refused
    when its batch forms and the device runs only the jobs that can still make it."""

    async def main() -> None:
        log: list = []
        b, done = make(max_batch=8, wait_ms=20), Results()
        q = b.add_queue("m", "t", Recorder("t", log))
        b.batch_times["m"] = BatchTimes([1, 2, 4, 8], {"t": {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}})
        b.submit(q, [1], time.monotonic() + 0.3, done)
        b.submit(q, [2], time.monotonic() + 30, done)
        b.start()
        await done.wait(2)
        assert log == [("t", [2])]
        assert isinstance(done.by_slot[1], DeadlineExceeded)
        await b.close()

    asyncio.run(main())


def test_pipeline_depth_overlaps_batches() -> None:
    async def main() -> None:
        gate = threading.Event()
        log: list = []
        for depth, overlapped in ((1, False), (2, True)):
            b, done = make(max_batch=1, wait_ms=0, depth=depth), Results()
            q = b.add_queue("m", "t", Recorder("t", log, gate))
            b.start()
            b.submit(q, [0, 1], FAR, done)
            await asyncio.sleep(0.1)
            assert (not q.jobs) is overlapped, depth  # depth 2: the second batch was launched too
            gate.set()
            await done.wait(2)
            gate.clear()
            await b.close()

    asyncio.run(main())


def test_side_by_side_lanes_share_the_backlog_and_a_batch_on_a_free_lane_is_not_behind_others() -> None:
    """With two CPU lanes, two batches run at once: the backlog is their work shared between the lanes,
    a request's predicted finish is list scheduling's bound (the work ahead shared, its own batch whole on
    one lane), and a batch formed while another runs has a lane of its own, so it is not 504'd for the
    other's time (with one lane it would be: the test below)."""

    async def main() -> None:
        gates = [threading.Event() for _ in range(3)]

        async def run(slots: Sequence[int], jpeg: Sequence[bool]) -> BatchOutput:
            await asyncio.to_thread(gates[slots[0]].wait, 5)
            return BatchOutput([[0]], [[1.0]], 2.0)

        b, done = make(max_batch=1, wait_ms=0, depth=2, lanes=2), Results()
        q = b.add_queue("m", "t", run)
        other = b.add_queue("m", "u", run)
        b.batch_times["m"] = BatchTimes([1], {"t": {1: 2.0}, "u": {1: 1.0}})
        b.start()
        b.submit(q, [0, 1], FAR, done)
        started = time.monotonic()
        await asyncio.sleep(0.3)  # both running on their lanes for ~0.3 s: ~1.7 s left each
        assert len(b._running) == 2
        now = time.monotonic()
        left = 2.0 - (now - started)  # from the clock: a loaded host oversleeps
        assert b.backlog_s(now) == pytest.approx(left, abs=0.1)  # (left + left) / 2
        b.submit(other, [5], FAR, done)  # waits for a lane: 1 s of work at tier u
        # ahead of a new image at t: 2 x left running, 1.0 queued at u; its own batch 2.0 on one lane
        assert b.finish_s(q, 1, now) == pytest.approx((left + left + 1.0) / 2 + 2.0, abs=0.1)
        b.abandon(other, [j for j in other.jobs])
        b.submit(q, [2], time.monotonic() + 3.0, done)
        # a lane frees; slot 2's batch takes it: ends in 2 s, within its 3 s deadline (behind the other
        # batch on one lane it would end in ~3.7 s, and be refused)
        gates[0].set()
        await done.wait(1)
        await asyncio.sleep(0.1)
        assert 2 not in done.by_slot and len(b._running) == 2  # running, not refused
        gates[1].set()
        gates[2].set()
        await done.wait(3)
        assert isinstance(done.by_slot[2], JobResult)
        await b.close()

    asyncio.run(main())


def test_pipelined_batches_wait_for_each_other_in_the_backlog_and_the_deadline_check() -> None:
    """With pipeline_depth 2 the second batch in flight runs on the device after the first: the backlog
    tier=auto predicts from is both batches' time less what has run of the first (not each batch less its
    own time in flight), and a batch formed behind one in flight ends after it."""

    async def main() -> None:
        gates = [threading.Event() for _ in range(3)]

        async def run(slots: Sequence[int], jpeg: Sequence[bool]) -> BatchOutput:
            await asyncio.to_thread(gates[slots[0]].wait, 5)
            return BatchOutput([[0]], [[1.0]], 2.0)  # each batch takes 2 s of device time

        b, done = make(max_batch=1, wait_ms=0, depth=2), Results()
        q = b.add_queue("m", "t", run)
        b.batch_times["m"] = BatchTimes([1], {"t": {1: 2.0}})
        b.start()
        b.submit(q, [0, 1], FAR, done)
        started = time.monotonic()
        await asyncio.sleep(0.3)  # both launched ~0.3 s ago; the first has run that much of its 2 s
        assert len(b._running) == 2
        now = time.monotonic()
        ran = now - started  # from the clock: a loaded host oversleeps
        assert b.backlog_s(now) == pytest.approx(4.0 - ran, abs=0.1)  # not 2 * (2.0 - ran)
        b.submit(q, [2], time.monotonic() + 2.5, done)  # waits for a pipeline slot
        gates[0].set()  # the first ends; slot 2's batch forms behind the second (due ~1.7 s from now)
        await done.wait(2)
        assert isinstance(done.by_slot[2], DeadlineExceeded)  # ~3.7 s from now: past its 2.5 s
        gates[1].set()
        await done.wait(3)
        await b.close()

    asyncio.run(main())


def test_a_batch_whose_time_is_not_representative_leaves_the_predicted_times_alone() -> None:
    """A CPU batch that ran alone on every thread is faster than one under load: its time must not lower
    what the batcher predicts (deadlines, tier=auto); a representative batch's time does move it."""

    async def main() -> None:
        outputs = [BatchOutput([[0]], [[1.0]], 0.1, representative=False), BatchOutput([[0]], [[1.0]], 0.1)]

        async def run(slots: Sequence[int], jpeg: Sequence[bool]) -> BatchOutput:
            return outputs.pop(0)

        b, done = make(max_batch=1, wait_ms=0), Results()
        q = b.add_queue("m", "t", run)
        b.batch_times["m"] = BatchTimes([1], {"t": {1: 2.0}})
        b.start()
        b.submit(q, [0], FAR, done)
        await done.wait(1)
        assert b.batch_times["m"].batch("t", 1) == 2.0
        b.submit(q, [1], FAR, done)
        await done.wait(2)
        assert b.batch_times["m"].batch("t", 1) < 2.0
        await b.close()

    asyncio.run(main())


def test_close_runs_queued_jobs_then_refuses() -> None:
    async def main() -> None:
        log: list = []
        b, done = make(max_batch=2, wait_ms=10_000), Results()
        q = b.add_queue("m", "t", Recorder("t", log))
        b.start()
        b.submit(q, [0, 1, 2, 3, 4], FAR, done)
        await b.close()
        assert all(isinstance(r, JobResult) for r in done.by_slot.values()) and len(done.by_slot) == 5
        assert sum(len(s) for _, s in log) == 5
        with pytest.raises(Draining):
            b.submit(q, [5], FAR, done)

    asyncio.run(main())


def test_failed_batch_fails_its_jobs_only() -> None:
    async def main() -> None:
        async def boom(slots: Sequence[int], jpeg: Sequence[bool]) -> BatchOutput:
            raise RuntimeError("boom")

        b, done = make(max_batch=2, wait_ms=0), Results()
        bad = b.add_queue("m", "bad", boom)
        good = b.add_queue("m", "good", Recorder("good", []))
        b.start()
        b.submit(bad, [0], FAR, done)
        b.submit(good, [1], FAR, done)
        await done.wait(2)
        assert isinstance(done.by_slot[0], RuntimeError)
        assert isinstance(done.by_slot[1], JobResult) and done.by_slot[1].batch_size == 1
        await b.close()

    asyncio.run(main())


def test_a_device_error_fails_its_batch_and_ends_the_engine() -> None:
    async def main() -> None:
        async def broken(slots: Sequence[int], jpeg: Sequence[bool]) -> BatchOutput:
            raise FatalDeviceError("CUDA error: an illegal memory access was encountered")

        b, done = make(max_batch=2, wait_ms=0), Results()
        q = b.add_queue("m", "t", broken)
        b.start()
        b.submit(q, [0], FAR, done)
        await done.wait(1)
        assert isinstance(done.by_slot[0], FatalDeviceError)
        assert b.fatal_reasons and "illegal memory access" in b.fatal_reasons[0]
        await b.close()

    asyncio.run(main())


def test_an_ordinary_batch_failure_does_not_end_the_engine() -> None:
    """Out of memory, a bad input: that batch fails (500), the engine serves on."""

    async def main() -> None:
        async def oom(slots: Sequence[int], jpeg: Sequence[bool]) -> BatchOutput:
            raise RuntimeError("out of memory")

        b, done = make(max_batch=2, wait_ms=0), Results()
        q = b.add_queue("m", "t", oom)
        b.start()
        b.submit(q, [0], FAR, done)
        await done.wait(1)
        assert isinstance(done.by_slot[0], RuntimeError) and b.fatal_reasons == []
        await b.close()

    asyncio.run(main())


def test_a_batch_that_hangs_ends_the_engine() -> None:
    async def main() -> None:
        gate = threading.Event()
        b, done = make(max_batch=1, wait_ms=0, timeout_s=0.3), Results()
        q = b.add_queue("m", "t", Recorder("t", [], gate))
        b.start()
        b.submit(q, [0], FAR, done)
        deadline = time.monotonic() + 5
        while not b.fatal_reasons:
            assert time.monotonic() < deadline, "the watchdog never fired"
            await asyncio.sleep(0.05)
        assert "batch_timeout_s" in b.fatal_reasons[0]
        gate.set()
        await b.close()

    asyncio.run(main())


async def _first_fatal_after_a_fidelity_check(b: Batcher, run_exact: Callable, never: str) -> str:
    """Start ``b`` with a sampling fidelity monitor whose r=0 runs are ``run_exact``, serve one image (the
    idle device then runs its fidelity check) and return the first reason the engine would end for."""
    import torch

    from service.engine.shadow import ShadowMonitor

    done = Results()
    slots = torch.zeros((4, 2, 2, 3), dtype=torch.uint8)
    shadow = ShadowMonitor("m", slots, run_exact, b.metrics, sample_rate=1.0, capacity=4, batch_size=2)
    q = b.add_queue("m", "fast", Recorder("fast", []), shadow)
    b.start()
    b.submit(q, [0], FAR, done)
    await done.wait(1)
    deadline = time.monotonic() + 5
    while not b.fatal_reasons:
        assert time.monotonic() < deadline, never
        await asyncio.sleep(0.05)
    return b.fatal_reasons[0]


def test_a_fidelity_batch_that_hangs_ends_the_engine() -> None:
    """A shadow batch runs on the device like any batch: hung there, it holds up every queue behind it, so
    the watchdog ends the engine as for a hung live batch."""
    import torch

    async def main() -> None:
        gate = threading.Event()

        async def run_exact(images: torch.Tensor) -> list[int]:
            await asyncio.to_thread(gate.wait, 5)
            return [0] * len(images)

        b = make(max_batch=1, wait_ms=0, timeout_s=0.3)
        reason = await _first_fatal_after_a_fidelity_check(b, run_exact, "the watchdog never fired")
        assert "fidelity checks" in reason and "batch_timeout_s" in reason
        gate.set()
        await b.close()

    asyncio.run(main())


def test_a_device_error_in_a_fidelity_batch_ends_the_engine() -> None:
    """A sticky device error is as fatal in a shadow batch at r=0 as in a live one: the next live batch
    would fail on the same broken device."""
    import torch

    async def main() -> None:
        async def run_exact(images: torch.Tensor) -> list[int]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        b = make(max_batch=1, wait_ms=0)
        reason = await _first_fatal_after_a_fidelity_check(
            b, run_exact, "the device error did not end the engine"
        )
        assert "illegal memory access" in reason
        await b.close()

    asyncio.run(main())


def test_the_batcher_loop_dying_ends_the_engine() -> None:
    async def main() -> None:
        b = make()
        b.add_queue("m", "t", Recorder("t", []))

        def broken_pick(now: float) -> tuple:
            raise KeyError("bug")

        b._pick = broken_pick  # type: ignore[method-assign]
        b.start()
        await asyncio.sleep(0.05)
        assert b.fatal_reasons and "KeyError" in b.fatal_reasons[0]

    asyncio.run(main())


def test_which_errors_are_fatal() -> None:
    import torch

    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"))
    assert not is_fatal(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_fatal(RuntimeError("shape mismatch"))
    assert not is_fatal(ValueError("CUDA error"))


def test_shadow_work_runs_only_when_nothing_live_is_queued_or_running() -> None:
    """The fidelity monitor's r=0 re-runs: sampled from merging-tier batches, run only on an idle
    device, and dropped (counted) when their queue is full."""
    import torch

    from service.engine.shadow import ShadowMonitor

    async def main() -> None:
        b, done = make(max_batch=2, wait_ms=0), Results()
        seen_busy: list[tuple[int, int]] = []

        async def run_exact(images: torch.Tensor) -> list[int]:
            seen_busy.append((sum(q.live for q in b.queues), len(b._in_flight)))  # the shadow task itself: 1
            return [int(x) for x in images[:, 0, 0, 0]]

        slots = torch.arange(16, dtype=torch.uint8).view(16, 1, 1, 1).expand(16, 2, 2, 3).contiguous()
        shadow = ShadowMonitor(
            "m", slots, run_exact, b.metrics, sample_rate=1.0, capacity=4, batch_size=2, seed=0
        )
        gate = threading.Event()
        q = b.add_queue("m", "fast", Recorder("fast", [], gate), shadow)
        b.start()
        b.submit(q, list(range(8)), FAR, done)  # 4 batches of 2: every image is sampled, 4 fit
        await asyncio.sleep(0.05)
        gate.set()
        await done.wait(8)
        deadline = time.monotonic() + 5
        while shadow.pending or b._in_flight:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert seen_busy and all(busy == (0, 1) for busy in seen_busy), seen_busy
        checks = b.metrics.shadow_checks.labels(model="m", tier="fast")._value.get()
        dropped = b.metrics.shadow_dropped.labels(model="m", tier="fast")._value.get()
        agreements = b.metrics.shadow_agreements.labels(model="m", tier="fast")._value.get()
        # all 8 are queued at once, so nothing is idle until they are served: slots 0-3 fill the
        # 4-image shadow ring, 4-7 are dropped
        assert (checks, dropped) == (4, 4)
        # Recorder served slot*2 as the top-1, this r=0 answers the slot: only slot 0 agrees
        assert agreements == 1
        await b.close()

    asyncio.run(main())
