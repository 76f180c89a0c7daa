"""The dynamic batcher on its own: batch closing, fairness, backpressure, deadlines, drain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from service.batcher import DeadlineExceeded, DeviceBatcher, Draining, QueueFull
from service.metrics import Metrics

FAR = 1e9


class Recorder:
    """A RunBatch that records batch sizes and optionally blocks until released."""

    def __init__(self, name: str, log: list[tuple[str, int]], gate: threading.Event | None = None) -> None:
        self.name, self.log, self.gate = name, log, gate

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(5)
        self.log.append((self.name, len(tensors)))
        return torch.stack(tensors) * 2


def make(max_batch: int = 4, wait_ms: float = 1000, queue: int = 16) -> DeviceBatcher:
    return DeviceBatcher("cpu", max_batch, wait_ms / 1000, queue, Metrics())


def test_batch_closes_when_full_before_max_wait() -> None:
    async def main() -> None:
        log: list = []
        b = make(max_batch=4, wait_ms=10_000)
        q = b.add_queue("m", "t", Recorder("t", log))
        b.start()
        jobs = [b.submit(q, torch.full((2,), float(i)), FAR) for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), 2)
        assert log == [("t", 4)]
        assert [r.batch_size for r in results] == [4] * 4
        assert [r.probs[0].item() for r in results] == [0, 2, 4, 6]  # each caller gets its own row
        await b.close()

    asyncio.run(main())


def test_batch_closes_after_max_wait_when_not_full() -> None:
    async def main() -> None:
        log: list = []
        b = make(max_batch=8, wait_ms=50)
        q = b.add_queue("m", "t", Recorder("t", log))
        b.start()
        start = time.monotonic()
        jobs = [b.submit(q, torch.zeros(1), FAR) for _ in range(3)]
        await asyncio.gather(*(j.future for j in jobs))
        assert 0.04 <= time.monotonic() - start < 1.0
        assert log == [("t", 3)]
        await b.close()

    asyncio.run(main())


def test_oldest_head_first_across_tiers() -> None:
    async def main() -> None:
        log: list = []
        gate = threading.Event()
        b = make(max_batch=2, wait_ms=0)
        qa = b.add_queue("m", "a", Recorder("a", log, gate))
        qb = b.add_queue("m", "b", Recorder("b", log, gate))
        b.start()
        first = b.submit(qa, torch.zeros(1), FAR)  # occupies the executor until the gate opens
        await asyncio.sleep(0.05)
        jobs = [b.submit(qb, torch.zeros(1), FAR)]  # b's head is now the oldest waiting
        await asyncio.sleep(0.01)
        jobs += [b.submit(qa, torch.zeros(1), FAR) for _ in range(2)]
        jobs += [b.submit(qb, torch.zeros(1), FAR)]
        gate.set()
        await asyncio.gather(first.future, *(j.future for j in jobs))
        assert log == [("a", 1), ("b", 2), ("a", 2)]
        await b.close()

    asyncio.run(main())


def test_queue_full_rejects_at_once() -> None:
    async def main() -> None:
        b = make(max_batch=2, queue=3)
        q = b.add_queue("m", "t", Recorder("t", []))
        for _ in range(3):
            b.submit(q, torch.zeros(1), FAR)
        with pytest.raises(QueueFull):
            b.submit(q, torch.zeros(1), FAR)
        b.start()
        await b.close()  # drains the three accepted jobs

    asyncio.run(main())


def test_abandoned_and_expired_jobs_never_run() -> None:
    async def main() -> None:
        log: list = []
        b = make(max_batch=8, wait_ms=20)
        q = b.add_queue("m", "t", Recorder("t", log))
        gone = b.submit(q, torch.zeros(1), FAR)
        gone.abandoned = True  # client went away
        expired = b.submit(q, torch.zeros(1), time.monotonic() - 1)
        kept = b.submit(q, torch.zeros(1), FAR)
        b.start()
        await kept.future
        assert log == [("t", 1)]
        with pytest.raises(DeadlineExceeded):
            expired.future.result()
        assert not gone.future.done()
        await b.close()

    asyncio.run(main())


def test_close_runs_queued_jobs_then_refuses() -> None:
    async def main() -> None:
        log: list = []
        b = make(max_batch=2, wait_ms=10_000)
        q = b.add_queue("m", "t", Recorder("t", log))
        b.start()
        jobs = [b.submit(q, torch.zeros(1), FAR) for _ in range(5)]
        await b.close()
        assert all(j.future.done() and j.future.exception() is None for j in jobs)
        assert sum(n for _, n in log) == 5
        with pytest.raises(Draining):
            b.submit(q, torch.zeros(1), FAR)

    asyncio.run(main())


def test_failed_batch_fails_its_jobs_only() -> None:
    async def main() -> None:
        def boom(tensors: list[torch.Tensor]) -> torch.Tensor:
            raise RuntimeError("boom")

        b = make(max_batch=2, wait_ms=0)
        bad = b.add_queue("m", "bad", boom)
        good = b.add_queue("m", "good", Recorder("good", []))
        b.start()
        j1 = b.submit(bad, torch.zeros(1), FAR)
        j2 = b.submit(good, torch.zeros(1), FAR)
        with pytest.raises(RuntimeError):
            await j1.future
        assert (await j2.future).batch_size == 1
        await b.close()

    asyncio.run(main())
