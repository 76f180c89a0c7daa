"""Decode lanes: a cancelled request gives its slots back only after the thread writing them is done."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from PIL import Image

from service.ingest.lanes import DecodeLanes


@pytest.mark.parametrize("pixels", [100, 10_000], ids=["ordinary", "heavy"])
def test_a_cancelled_caller_waits_for_its_decode_thread(pixels: int) -> None:
    lanes = DecodeLanes(threads=1, heavy_pixels=1_000, max_heavy=1)
    img = Image.new("RGB", (pixels, 1))
    finished = threading.Event()

    def decode() -> None:
        time.sleep(0.3)
        finished.set()

    async def main() -> None:
        task = asyncio.create_task(lanes.run(img, decode))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()  # the slot is still being written until then
        assert lanes.heavy_in_progress == 0

    try:
        asyncio.run(main())
    finally:
        lanes.shutdown()
