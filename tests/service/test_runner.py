"""The engine's runner: uint8 slots in, top-k out; padding to buckets; CUDA graphs and the async CUDA path."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from service.engine.buckets import batch_buckets, bucket_for
from service.engine.loading import LoadedModel, load_model
from service.engine.runner import DeviceThreads, ModelRunner
from service.settings import ModelSpec

from .conftest import TINY_MODEL

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _loaded(device: str = "cpu", **spec: object) -> LoadedModel:
    torch.manual_seed(0)
    values = {**TINY_MODEL, "model_kwargs": {"img_size": 64, "depth": 3}, **spec}
    return load_model(ModelSpec(**values), torch.device(device))


def _slots(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_buckets() -> None:
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(n, batch_buckets(12)) for n in (1, 3, 5, 9, 12)] == [1, 4, 8, 12, 12]


def test_cpu_lanes_run_batches_side_by_side_on_a_share_of_the_threads_each() -> None:
    """``cpu_parallel_batches`` on a CPU: that many launch threads (never more than torch's threads), each
    running its batches on an equal share of torch's threads, two at once; results equal the direct model's;
    on CUDA there is one launch thread whatever the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        threads = DeviceThreads(torch.device("cpu"), cpu_parallel_batches=2)
        assert (threads.lanes, threads.threads_per_lane) == (2, 2)
        assert DeviceThreads(torch.device("cpu"), cpu_parallel_batches=8).lanes == 4  # a thread each at most
        barrier = threading.Barrier(2, timeout=5)

        def on_a_lane() -> tuple[str, int]:
            barrier.wait()  # both calls must be running at once to pass it
            return threading.current_thread().name, torch.get_num_threads()

        async def both() -> list[tuple[str, int]]:
            return list(await asyncio.gather(threads.call(on_a_lane), threads.call(on_a_lane)))

        ran = asyncio.run(both())
        assert len({name for name, _ in ran}) == 2 and [n for _, n in ran] == [2, 2]
        assert torch.get_num_threads() == 4  # this thread keeps its own
        loaded = _loaded()
        runner = ModelRunner(loaded, _slots(), threads, max_batch_size=8, top_k=5)
        tier = next(iter(loaded.tiers.values()))

        async def two_batches() -> list[list[int]]:
            run = runner.runner_for(tier)
            first, second = await asyncio.gather(run(range(0, 4), None), run(range(4, 8), None))
            return first.indices + second.indices

        with torch.inference_mode():
            expected = loaded.model(runner.normalize(_slots()[:8]), r=tier.r).topk(5, dim=-1).indices
        assert asyncio.run(two_batches()) == expected.tolist()
        threads.shutdown()
    finally:
        torch.set_num_threads(before)
    if CUDA:
        assert DeviceThreads(torch.device("cuda"), cpu_parallel_batches=2).lanes == 1


def test_a_cpu_batch_alone_takes_every_thread_and_its_time_does_not_teach_the_predictor() -> None:
    """With several CPU lanes, a batch that starts while no other lane is busy runs on every thread (a lone
    request at low load gets the whole CPU) and says so, since its time is not what a batch takes under
    load; one that starts beside another runs on its lane's share; warm-up and other calls always on the
    share. With one lane nothing changes."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        threads = DeviceThreads(torch.device("cpu"), cpu_parallel_batches=2)
        running, release = threading.Event(), threading.Event()

        def first() -> int:
            running.set()
            assert release.wait(5)
            return torch.get_num_threads()

        def second() -> int:
            release.set()
            return torch.get_num_threads()

        async def scenario() -> list[object]:
            alone = await threads.call_batch(torch.get_num_threads)
            plain = await threads.call(torch.get_num_threads)
            one = asyncio.ensure_future(threads.call_batch(first))
            await asyncio.get_running_loop().run_in_executor(None, running.wait, 5)
            other = await threads.call_batch(second)  # starts while the first batch runs
            return [alone, plain, await one, other]

        alone, plain, first_out, second_out = asyncio.run(scenario())
        assert alone == (4, True) and plain == 2
        assert first_out == (4, True) and second_out == (2, False)
        threads.shutdown()

        single = DeviceThreads(torch.device("cpu"), cpu_parallel_batches=1)
        assert asyncio.run(single.call_batch(torch.get_num_threads)) == (4, False)
        single.shutdown()

        loaded = _loaded()
        threads = DeviceThreads(torch.device("cpu"), cpu_parallel_batches=2)
        runner = ModelRunner(loaded, _slots(), threads, max_batch_size=8, top_k=5)
        out = asyncio.run(runner.runner_for(next(iter(loaded.tiers.values())))(range(2), None))
        assert out.representative is False
        threads.shutdown()
    finally:
        torch.set_num_threads(before)


def test_cpu_batches_run_below_the_rest_of_the_service() -> None:
    """``cpu_batch_niceness``: each CPU lane thread runs that much nicer than the thread that started the
    engine (one lane or several), so front-ends and the engine's own event loop come first under load."""
    base = os.getpriority(os.PRIO_PROCESS, 0)  # Linux: this thread's
    for lanes in (1, 2):
        threads = DeviceThreads(torch.device("cpu"), cpu_parallel_batches=lanes, cpu_batch_niceness=3)
        niceness = asyncio.run(threads.call(lambda: os.getpriority(os.PRIO_PROCESS, 0)))
        assert niceness == min(19, base + 3), lanes
        threads.shutdown()
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
    plain = DeviceThreads(torch.device("cpu"))
    assert asyncio.run(plain.call(lambda: os.getpriority(os.PRIO_PROCESS, 0))) == base
    plain.shutdown()


def test_padding_to_a_bucket_never_changes_a_real_image() -> None:
    """Rows added to reach a bucket are computed and dropped; no op mixes images, so each real image's
    logits are those it gets alone (the same kernels up to float summation order)."""
    loaded = _loaded()
    slots = _slots()
    threads = DeviceThreads(loaded.device)
    padded = ModelRunner(loaded, slots, threads, max_batch_size=8, top_k=5, pad_to_bucket=True)
    for tier in loaded.tiers.values():
        for n in (1, 3, 5, 7):
            x = slots[:n]
            bucket = bucket_for(n, padded.buckets)
            filler = torch.zeros((bucket - n, 64, 64, 3), dtype=torch.uint8)
            with torch.inference_mode():
                alone = loaded.model(padded.normalize(x), r=tier.r)
                in_bucket = loaded.model(padded.normalize(torch.cat([x, filler])), r=tier.r)[:n]
            torch.testing.assert_close(in_bucket, alone, rtol=1e-5, atol=1e-5)
            assert torch.equal(in_bucket.argmax(-1), alone.argmax(-1))
            scores, indices = padded.forward(x, tier)
            assert scores.shape == (n, 5) and torch.equal(indices[:, 0], alone.argmax(-1))
    threads.shutdown()


def test_runner_batch_equals_the_model_on_its_slots() -> None:
    """runner_for(tier) gathers the slots it is given and returns each image's top-k of softmax(model(x))."""
    loaded = _loaded()
    slots = _slots()
    threads = DeviceThreads(loaded.device)
    runner = ModelRunner(loaded, slots, threads, max_batch_size=8, top_k=3)
    tier = loaded.tiers["fast"]
    out = asyncio.run(runner.runner_for(tier)([9, 2, 14]))
    with torch.inference_mode():
        probs = loaded.model(runner.normalize(slots[[9, 2, 14]]), r=tier.r).softmax(-1)
    scores, indices = probs.topk(3)
    assert out.indices == indices.tolist()
    torch.testing.assert_close(torch.tensor(out.scores), scores, rtol=0, atol=1e-6)
    assert out.inference_s > 0
    threads.shutdown()


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_graph_replay_equals_eager(dtype: str) -> None:
    loaded = _loaded("cuda", dtype=dtype)
    threads = DeviceThreads(loaded.device)
    slots = _slots()
    graphed = ModelRunner(loaded, slots, threads, max_batch_size=8, top_k=5, cuda_graphs=True)
    eager = ModelRunner(
        loaded, slots, threads, max_batch_size=8, top_k=5, cuda_graphs=False, pad_to_bucket=True
    )
    assert graphed.graphs is not None

    def compare() -> None:
        for tier in loaded.tiers.values():
            for bucket in graphed.buckets:
                assert graphed.graphs.capture(tier.name, tier.r, bucket, 64, 64), (tier.name, bucket)
            for n in (1, 3, 8):
                x = slots[:n].cuda()
                g_scores, g_indices = graphed.forward(x, tier)
                e_scores, e_indices = eager.forward(x, tier)
                torch.testing.assert_close(g_scores, e_scores, rtol=2e-2, atol=2e-3)  # bf16/fp16 tolerance
                assert (g_indices[:, 0] == e_indices[:, 0]).float().mean() == 1.0

    asyncio.run(threads.call(compare))
    threads.shutdown()


@needs_cuda
def test_cuda_async_path_returns_what_eager_computes() -> None:
    """Pinned staging, upload on the engine stream, graph replay, copy back, completion thread."""
    loaded = _loaded("cuda", dtype="bfloat16")
    threads = DeviceThreads(loaded.device)
    slots = _slots()
    runner = ModelRunner(loaded, slots, threads, max_batch_size=8, top_k=5, pipeline_depth=2)
    tier = loaded.tiers["fast"]

    async def main() -> None:
        await threads.call(
            lambda: [runner.graphs.capture(tier.name, tier.r, b, 64, 64) for b in runner.buckets]
        )
        run = runner.runner_for(tier)
        batches = [[0, 1, 2], [3, 4, 5, 6, 7], [8]]
        outs = await asyncio.gather(*(run(batch) for batch in batches))
        for batch, out in zip(batches, outs, strict=True):  # each batch as it ran: same bucket, same graph
            _, expected = await threads.call(lambda b=batch: runner.forward(slots[b].cuda(), tier))
            assert [row[0] for row in out.indices] == expected[:, 0].tolist()

    asyncio.run(main())
    threads.shutdown()
