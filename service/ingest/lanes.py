"""Where images are decoded: ordinary ones in a thread pool, heavy ones in a lane of their own.

An image's decode cost is known from its header (its size, after JPEG draft scaling) before any pixel
is decoded. The header itself is read in an ordinary decode thread too, never on the event loop: Pillow
parses it in Python, one JPEG segment or PNG chunk at a time (crafted files took seconds before
``ingest.preprocess`` capped Pillow's reads; up to ~50 ms for 8 MB still), and on the event loop that time
would hold every connection of the front-end, health probes included. Ordinary images go to ``threads``
decode threads. An image over ``heavy_pixels`` goes to one thread running at the lowest CPU priority Linux
has (``SCHED_IDLE``: it runs only on CPU time nobody else wants), with at most ``max_heavy`` such images
decoding or waiting per front-end; past that, 503. So a client flooding 6000x6000 PNGs (0.65 s of CPU
each) takes idle CPU, not other clients' cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from ..errors import unavailable

log = logging.getLogger(__name__)


def _lowest_priority() -> None:
    """Make the calling thread SCHED_IDLE (Linux), else as nice as possible."""
    try:
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        else:
            os.nice(19)
    except OSError as e:  # e.g. a seccomp profile that forbids it: heavy images are still bounded
        log.warning("could not lower the heavy-image decode thread's priority: %s", e)


async def _thread_done(executor: ThreadPoolExecutor, fn: Callable[..., Any], *args: Any) -> Any:
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


class DecodeLanes:
    def __init__(self, threads: int, heavy_pixels: int, max_heavy: int) -> None:
        self.heavy_pixels = heavy_pixels
        self.max_heavy = max_heavy
        self.heavy_in_progress = 0
        self._normal = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self._heavy = ThreadPoolExecutor(1, thread_name_prefix="decode-heavy", initializer=_lowest_priority)

    async def run(self, img: Image.Image, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the lane for ``img``'s decoded size; 503 when the heavy lane is full.

        A caller cancelled meanwhile gets its ``CancelledError`` only once the thread is done: a thread
        cannot be stopped, and it writes into memory the caller owns (a slot it would free at once)."""
        if not self._is_heavy(img):
            return await _thread_done(self._normal, fn, *args)
        return await self._run_heavy(fn, *args)

    async def _run_heavy(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.heavy_in_progress >= self.max_heavy:
            raise unavailable(
                "overloaded", "too many large images are being decoded on this worker; retry later"
            )
        self.heavy_in_progress += 1
        try:
            return await _thread_done(self._heavy, fn, *args)
        finally:
            self.heavy_in_progress -= 1

    async def open_and_run(
        self, open_fn: Callable[[bytes], Image.Image], data: bytes, fn: Callable[[Image.Image], Any]
    ) -> Any:
        """``fn(open_fn(data))``: the header read (``open_fn``) in an ordinary decode thread, then ``fn``
        in that same thread, or in the heavy lane for an image over ``heavy_pixels`` (503 when it is full).
        Cancelled callers wait for their thread, as in ``run``."""
        heavy, result = await _thread_done(self._normal, self._open_then, open_fn, data, fn)
        if heavy:
            return await self._run_heavy(fn, result)
        return result

    def _open_then(
        self, open_fn: Callable[[bytes], Image.Image], data: bytes, fn: Callable[[Image.Image], Any]
    ) -> tuple[bool, Any]:
        img = open_fn(data)
        if self._is_heavy(img):
            return True, img
        return False, fn(img)

    def _is_heavy(self, img: Image.Image) -> bool:
        width, height = img.size
        return width * height > self.heavy_pixels

    def shutdown(self) -> None:
        self._normal.shutdown(wait=True)
        self._heavy.shutdown(wait=True)
