"""A served request leaves no reference cycle in the engine: refcounting frees its bookkeeping as soon as
it is answered, so the garbage collector has nothing to find per request (and the engine's processes can
collect rarely; ``lifecycle.process.settle_heap``)."""

from __future__ import annotations

import gc
import time

from service.engine import engine as engine_module

from .conftest import ServiceClient, image_bytes

PNG = image_bytes()


def _live_requests() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is engine_module._Request)


def test_answered_requests_are_freed_without_the_garbage_collector(client: ServiceClient) -> None:
    for _ in range(2):  # warm: the first requests may create long-lived state
        assert client.post("/classify", content=PNG, headers={"content-type": "image/png"}).status_code == 200
    gc.collect()
    gc.disable()
    try:
        for _ in range(8):
            r = client.post("/classify", content=PNG, headers={"content-type": "image/png"})
            assert r.status_code == 200
        deadline = time.monotonic() + 10
        while (live := _live_requests()) > 1 and time.monotonic() < deadline:  # the engine thread lets go
            time.sleep(0.05)
        # one at most: the batcher's loop holds its latest batch's jobs until the next batch
        assert live <= 1, f"{live} answered requests are still alive: only a collection would free them"
    finally:
        gc.enable()
