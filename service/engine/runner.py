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

With device JPEG decode (``device_decode``), a slot may hold a JPEG's bytes instead of pixels: the batch's
JPEGs are decoded and resized on the device after the upload, into their rows of the batch (decode time
counts in the batch's time), and their pixels are written back into the slots once the batch is done, so
the fidelity monitor (and anything else reading a served slot) sees pixels as for any other image.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from ..ipc.slots import read_encoded
from .batcher import BatchOutput, RunBatch
from .buckets import batch_buckets, bucket_for
from .device_decode import JpegDecoder
from .faults import FatalDeviceError, is_fatal
from .graphs import GraphCache
from .loading import LoadedModel
from .normalize import Normalize
from .tiers import Tier

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _start_cpu_lane(threads: int, niceness: int) -> None:
    """A CPU lane's thread: its share of torch's threads, and a lower priority than the rest of the host
    (Linux nice applies per thread; the OpenMP workers it starts inherit it)."""
    torch.set_num_threads(threads)
    if niceness:
        try:
            os.setpriority(
                os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + niceness
            )
        except OSError as e:  # e.g. a seccomp profile that forbids it: the lane still runs
            log.warning("could not lower the CPU batch thread's priority: %s", e)


class DeviceThreads:
    """The device's launch threads (every model call, warm-up included, runs on one) and, on CUDA, the
    completion thread that waits for batches to finish.

    CUDA has one launch thread: batches queue on the device anyway. A CPU has ``lanes`` of them, each
    running whole batches with torch's threads divided among them (``batching.cpu_parallel_batches``).
    One batch on every thread stalls whenever any of its threads is preempted (by decoding, HTTP, the
    OS): each op ends at its slowest thread's pace. Measured on 2 cores under load, two one-thread batches
    at once served 0.92–0.98 of the bare model's throughput against 0.74–0.87 for one two-thread batch
    (BENCHMARKS.md). A batch that starts while no other lane runs one takes every thread
    (``call_batch``): at low load a lone request gets the whole CPU. CPU lanes run
    ``cpu_batch_niceness`` below the rest of the host: accepting connections, refusing what cannot be
    admitted, health checks and decoding admitted images come first, the model takes the rest
    (RELIABILITY.md: under 3x overload on 2 cores, without it refusals took seconds and the main port's
    /healthz up to 5 s)."""

    def __init__(
        self, device: torch.device, cpu_parallel_batches: int = 1, cpu_batch_niceness: int = 0
    ) -> None:
        self.device = device
        threads = torch.get_num_threads()
        cpu = device.type == "cpu"
        self.lanes = max(1, min(cpu_parallel_batches, threads)) if cpu else 1
        self.threads = threads
        self.threads_per_lane = threads // self.lanes if cpu else threads
        self._busy_lanes = 0
        self._busy_lock = threading.Lock()
        init = functools.partial(_start_cpu_lane, self.threads_per_lane, cpu_batch_niceness) if cpu else None
        self.launch = ThreadPoolExecutor(self.lanes, thread_name_prefix=f"launch-{device}", initializer=init)
        self.complete = ThreadPoolExecutor(1, thread_name_prefix=f"complete-{device}")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    async def call(self, fn: Callable[[], object]) -> object:
        """``fn`` on a launch thread (on a CPU with several lanes: on the lane's share of the threads)."""
        result, _ = await self._run(functools.partial(self._on_lane, fn, False))
        return result

    async def call_batch(self, fn: Callable[[], _T]) -> tuple[_T, bool]:
        """Run a CPU batch on a lane: on every thread when no other lane is busy, else on the lane's
        share. Returns the result and whether it ran alone on every thread (with several lanes only):
        such a batch is faster than one under load, so its time must not teach the batcher what a batch
        of that size takes (measured on a pool thread, batch 1 on 2 cores: ViT-S 71 ms on both threads
        against 115 ms on one; BENCHMARKS.md)."""
        return await self._run(functools.partial(self._on_lane, fn, True))  # type: ignore[return-value]

    def _on_lane(self, fn: Callable[[], _T], whole_cpu_when_alone: bool) -> tuple[_T, bool]:
        if self.lanes == 1:
            return fn(), False
        with self._busy_lock:
            alone = whole_cpu_when_alone and self._busy_lanes == 0
            self._busy_lanes += 1
        torch.set_num_threads(self.threads if alone else self.threads_per_lane)
        try:
            return fn(), alone
        finally:
            with self._busy_lock:
                self._busy_lanes -= 1

    async def _run(self, fn: Callable[[], object]) -> object:
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


_Encoded = tuple[int, int, torch.Tensor | str]
"""A batch's JPEG: its row, its slot, and its bytes (CPU uint8) or why they could not be read."""


class _Buffers:
    """One in-flight batch's pinned host buffers (CUDA)."""

    def __init__(self, max_batch: int, height: int, width: int, k: int) -> None:
        self.staging = torch.empty((max_batch, height, width, 3), dtype=torch.uint8).pin_memory()
        self.decoded: list[tuple[int, int]] = []  # (row, slot) of JPEGs decoded into the batch's rows
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
        decoder: JpegDecoder | None = None,
    ) -> None:
        self.loaded = loaded
        self.slots = slots  # uint8 [count, H, W, 3] over the shared file
        self.threads = threads
        self.decoder = decoder  # None: every slot holds pixels
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
        async def run(slots: Sequence[int], jpeg: Sequence[bool] | None = None) -> BatchOutput:
            jpeg = jpeg if jpeg is not None else [False] * len(slots)
            try:
                if not self.cuda:
                    out, alone = await self.threads.call_batch(lambda: self._run_cpu(slots, jpeg, tier))
                    return dataclasses.replace(out, representative=not alone)
                launch = functools.partial(self._launch_cuda, slots, jpeg, tier)
                done: Future[BatchOutput] = await self.threads.call(launch)  # type: ignore[assignment]
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

    def _encoded(self, slots: Sequence[int], jpeg: Sequence[bool]) -> list[_Encoded]:
        """(row, slot, bytes) of the batch's JPEGs, copied out of their slots; a bad slot gets its error."""
        encoded: list[_Encoded] = []
        for row, (slot, is_jpeg) in enumerate(zip(slots, jpeg, strict=True)):
            if not is_jpeg:
                continue
            if self.decoder is None:
                encoded.append((row, slot, "JPEG pass-through is off on this engine"))
                continue
            try:
                encoded.append((row, slot, torch.from_numpy(read_encoded(self.slots[slot].numpy()))))
            except ValueError as e:
                encoded.append((row, slot, str(e)))
        return encoded

    def _decode_into(
        self, images: torch.Tensor, encoded: list[_Encoded]
    ) -> tuple[list[str | None] | None, list[tuple[int, int]]]:
        """Decode the JPEGs into their rows of ``images`` (on its device). Returns per row None or why not
        (None when the batch holds no JPEG) and the (row, slot) pairs that were decoded."""
        if not encoded:
            return None, []
        errors: list[str | None] = [None] * images.shape[0]
        ok = [(row, slot, data) for row, slot, data in encoded if not isinstance(data, str)]
        for row, _, data in encoded:
            if isinstance(data, str):
                errors[row] = data
        pixels = self.decoder([data for _, _, data in ok]) if ok and self.decoder is not None else []
        decoded = []
        for (row, slot, _), out in zip(ok, pixels, strict=True):
            if isinstance(out, str):
                errors[row] = out
                images[row].zero_()  # computed and dropped, like a padding row
            else:
                images[row].copy_(out)
                decoded.append((row, slot))
        return errors, decoded

    def _run_cpu(self, slots: Sequence[int], jpeg: Sequence[bool], tier: Tier) -> BatchOutput:
        start = time.perf_counter()
        images = self._gather(slots)
        errors, decoded = self._decode_into(images, self._encoded(slots, jpeg))
        scores, indices = self.forward(images, tier)
        for row, slot in decoded:  # pixels back into the slot, as if the front-end had decoded it
            self.slots[slot].copy_(images[row])
        return BatchOutput(indices.tolist(), scores.tolist(), time.perf_counter() - start, errors)

    def _launch_cuda(self, slots: Sequence[int], jpeg: Sequence[bool], tier: Tier) -> Future[BatchOutput]:
        """On the launch thread (inside the engine stream): stage, upload, decode the JPEGs, run, queue the
        copy back."""
        n = len(slots)
        buffers = self._free.get()
        started = torch.cuda.Event(enable_timing=True)
        finished = torch.cuda.Event(enable_timing=True)
        try:
            self._gather(slots, out=buffers.staging)  # reads the shared slots now: they may be reused after
            encoded = self._encoded(slots, jpeg)
            started.record()
            images = buffers.staging[:n].to(self.loaded.device, non_blocking=True)
            errors, buffers.decoded = self._decode_into(images, encoded)
            scores, indices = self.forward(images, tier)
            if buffers.decoded:  # the decoded pixels come back with the results, for the slots
                buffers.staging[:n].copy_(images, non_blocking=True)
            buffers.scores[:n].copy_(scores, non_blocking=True)
            buffers.indices[:n].copy_(indices, non_blocking=True)
            finished.record()
        except BaseException:  # e.g. out of memory: the batch fails, its buffers stay in the pool
            with contextlib.suppress(Exception):  # once the device is done with them
                torch.cuda.current_stream(self.loaded.device).synchronize()
            buffers.decoded = []
            self._free.put(buffers)
            raise
        return self.threads.complete.submit(self._finish, buffers, n, started, finished, errors)

    def _finish(
        self,
        buffers: _Buffers,
        n: int,
        started: torch.cuda.Event,
        finished: torch.cuda.Event,
        errors: list[str | None] | None = None,
    ) -> BatchOutput:
        """On the completion thread: wait for the batch, read its pinned outputs, write decoded JPEGs'
        pixels into their slots, free the buffers."""
        try:
            finished.synchronize()
            for row, slot in buffers.decoded:
                self.slots[slot].copy_(buffers.staging[row])
            return BatchOutput(
                buffers.indices[:n].tolist(),
                buffers.scores[:n].tolist(),
                started.elapsed_time(finished) / 1000,
                errors,
            )
        finally:
            buffers.decoded = []
            self._free.put(buffers)
