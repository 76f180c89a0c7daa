"""Runs batches of one model: shared-memory slots -> device -> normalize -> model at the tier's r -> top-k.

Only ``[B, k]`` top-k indices and scores come back to the host. On CPU a batch runs eagerly, start to
finish, on the device thread. On CUDA the device thread only *launches*: it gathers the batch's slots
into a pinned staging buffer, uploads it on the engine's stream, replays the (tier, bucket) CUDA graph
(or runs eagerly), and queues the copy of the top-k into pinned output buffers; a completion thread waits
for the batch's event and hands the results back. So the launching thread never blocks on a copy back to
the host, and the next batch is staged and launched while the previous one runs (``pipeline_depth``).

With CUDA graphs, a batch is padded to its bucket (powers of two up to max_batch_size): a tier fixes
every block's token count, so each (tier, bucket) has static shapes. Padding rows are computed and
dropped; every image is processed independently (no op mixes images), so they never change a real
image's result.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .batcher import BatchOutput, RunBatch
from .buckets import batch_buckets, bucket_for
from .faults import FatalDeviceError, is_fatal
from .graphs import GraphCache
from .loading import LoadedModel
from .normalize import Normalize
from .tiers import Tier

log = logging.getLogger(__name__)


class DeviceThreads:
    """The device's launch thread (every model call, warm-up included, runs here: nothing overlaps) and,
    on CUDA, the completion thread that waits for batches to finish."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.launch = ThreadPoolExecutor(1, thread_name_prefix=f"launch-{device}")
        self.complete = ThreadPoolExecutor(1, thread_name_prefix=f"complete-{device}")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    async def call(self, fn: Callable[[], object]) -> object:
        return await asyncio.get_running_loop().run_in_executor(self.launch, self._in_stream(fn))

    def _in_stream(self, fn: Callable[[], object]) -> Callable[[], object]:
        if self.stream is None:
            return fn

        def run() -> object:
            with torch.cuda.stream(self.stream):
                return fn()

        return run

    def shutdown(self) -> None:
        self.launch.shutdown(wait=True)
        self.complete.shutdown(wait=True)


class _Buffers:
    """One in-flight batch's pinned host buffers (CUDA)."""

    def __init__(self, max_batch: int, height: int, width: int, k: int) -> None:
        self.staging = torch.empty((max_batch, height, width, 3), dtype=torch.uint8).pin_memory()
        self.scores = torch.empty((max_batch, k), dtype=torch.float32).pin_memory()
        self.indices = torch.empty((max_batch, k), dtype=torch.int64).pin_memory()


class ModelRunner:
    """Batches of one model on its device; ``runner_for(tier)`` is what the batcher calls."""

    def __init__(
        self,
        loaded: LoadedModel,
        slots: torch.Tensor,
        threads: DeviceThreads,
        max_batch_size: int,
        top_k: int,
        cuda_graphs: bool = True,
        pipeline_depth: int = 2,
        pad_to_bucket: bool | None = None,
    ) -> None:
        self.loaded = loaded
        self.slots = slots  # uint8 [count, H, W, 3] over the shared file
        self.threads = threads
        self.top_k = top_k
        self.buckets = batch_buckets(max_batch_size)
        self.cuda = loaded.device.type == "cuda"
        self.graphs = GraphCache(self._forward, loaded.device) if self.cuda and cuda_graphs else None
        self.pad_to_bucket = self.graphs is not None if pad_to_bucket is None else pad_to_bucket
        mean, std = loaded.data_config["mean"], loaded.data_config["std"]
        self.normalize = Normalize(mean, std, loaded.device, loaded.dtype)
        self._free: queue.SimpleQueue[_Buffers] = queue.SimpleQueue()
        if self.cuda:
            _, h, w = loaded.input_size
            for _ in range(pipeline_depth):
                self._free.put(_Buffers(max_batch_size, h, w, top_k))

    # ---- the computation ------------------------------------------------------------------------
    def _forward(self, images: torch.Tensor, r: object) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 BHWC on the device -> (top-k scores, top-k indices), both ``[B, k]``."""
        logits = self.loaded.model(self.normalize(images), r=r)
        return logits.float().softmax(dim=-1).topk(self.top_k, dim=-1)

    def forward(self, images: torch.Tensor, tier: Tier) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager or graph-replayed forward of uint8 images already on the device (pads to a bucket when
        graphs or ``pad_to_bucket`` are on, and drops the padding rows again)."""
        n = images.shape[0]
        if not self.pad_to_bucket:
            with torch.inference_mode():
                return self._forward(images, tier.r)
        bucket = bucket_for(n, self.buckets)
        if self.graphs is not None and self.graphs.has(tier.name, bucket):
            scores, indices = self.graphs.replay(tier.name, bucket, images)
            return scores[:n], indices[:n]
        if bucket > n:
            pad = images.new_zeros((bucket - n, *images.shape[1:]))
            images = torch.cat([images, pad])
        with torch.inference_mode():
            scores, indices = self._forward(images, tier.r)
        return scores[:n], indices[:n]

    # ---- batches ----------------------------------------------------------------------------------
    def runner_for(self, tier: Tier) -> RunBatch:
        async def run(slots: Sequence[int]) -> BatchOutput:
            try:
                if not self.cuda:
                    return await self.threads.call(lambda: self._run_cpu(slots, tier))  # type: ignore[return-value]
                done: Future[BatchOutput] = await self.threads.call(lambda: self._launch_cuda(slots, tier))  # type: ignore[assignment]
                return await asyncio.wrap_future(done)
            except Exception as e:
                if is_fatal(e):
                    raise FatalDeviceError(str(e)) from e
                raise

        return run

    async def run_exact(self, images: torch.Tensor) -> list[int]:
        """Top-1 at r=0 of uint8 images (the fidelity monitor's shadow batches; eager, rare, idle time)."""

        def run() -> list[int]:
            with torch.inference_mode():
                logits = self.loaded.model(self.normalize(images.to(self.loaded.device)), r=0)
            return logits.argmax(dim=-1).tolist()

        return await self.threads.call(run)  # type: ignore[return-value]

    def _gather(self, slots: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        index = torch.as_tensor(slots, dtype=torch.int64)
        if out is None:
            return torch.index_select(self.slots, 0, index)
        return torch.index_select(self.slots, 0, index, out=out[: len(slots)])

    def _run_cpu(self, slots: Sequence[int], tier: Tier) -> BatchOutput:
        start = time.perf_counter()
        scores, indices = self.forward(self._gather(slots), tier)
        return BatchOutput(indices.tolist(), scores.tolist(), time.perf_counter() - start)

    def _launch_cuda(self, slots: Sequence[int], tier: Tier) -> Future[BatchOutput]:
        """On the launch thread (inside the engine stream): stage, upload, run, queue the copy back."""
        n = len(slots)
        buffers = self._free.get()
        self._gather(slots, out=buffers.staging)  # reads the shared slots now: they may be reused after
        started = torch.cuda.Event(enable_timing=True)
        finished = torch.cuda.Event(enable_timing=True)
        started.record()
        images = buffers.staging[:n].to(self.loaded.device, non_blocking=True)
        scores, indices = self.forward(images, tier)
        buffers.scores[:n].copy_(scores, non_blocking=True)
        buffers.indices[:n].copy_(indices, non_blocking=True)
        finished.record()
        return self.threads.complete.submit(self._finish, buffers, n, started, finished)

    def _finish(
        self, buffers: _Buffers, n: int, started: torch.cuda.Event, finished: torch.cuda.Event
    ) -> BatchOutput:
        """On the completion thread: wait for the batch, read its pinned outputs, free the buffers."""
        try:
            finished.synchronize()
            return BatchOutput(
                buffers.indices[:n].tolist(),
                buffers.scores[:n].tolist(),
                started.elapsed_time(finished) / 1000,
            )
        finally:
            self._free.put(buffers)
