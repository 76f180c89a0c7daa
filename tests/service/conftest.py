"""Shared fixtures: tiny random-weight ViT settings, an in-process service, image bytes.

The in-process service is the real thing minus the process boundaries: the engine runs in a thread of
the test process (``EngineThread``) and the front-end app talks to it over the same Unix socket and
shared-memory slots as in production, through Starlette's TestClient.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import CollectorRegistry

from service.api.app import create_app
from service.engine.engine import Engine
from service.ipc.rundir import RunDir
from service.lifecycle.engine_process import EngineThread
from service.settings import ServiceSettings

TINY_MODEL: dict[str, Any] = {
    "name": "tiny",
    "timm_name": "vit_tiny_patch16_224",
    "weights": "random",
    "model_kwargs": {"img_size": 64, "depth": 2},
}


def tiny_settings(**overrides: Any) -> ServiceSettings:
    """Settings for one tiny random-weight ViT (16 patches, 2 blocks) on CPU; no file, no env."""
    values: dict[str, Any] = {
        "device": "cpu",
        "models": [TINY_MODEL],
        "batching": {"max_batch_size": 8, "max_wait_ms": 2, "max_queue_size": 64},
        "limits": {"max_body_bytes": 256 * 1024, "max_files": 4, "max_image_pixels": 1_000_000},
        "server": {"max_scrapes_per_s": 0},  # tests read /metrics after nearly every request
    }
    values.update(overrides)
    return ServiceSettings(**values)


@pytest.fixture(autouse=True)
def _no_tome_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's TOME_* environment out of the tests."""
    import os

    for key in list(os.environ):
        if key.startswith("TOME_"):
            monkeypatch.delenv(key)


class ServiceClient(TestClient):
    """A TestClient on a front-end app, with the in-process ``engine`` it talks to."""

    engine: Engine
    fatal_reasons: list[str]  # what the engine would have ended its process for


@contextmanager
def in_process_service(settings: ServiceSettings) -> Iterator[ServiceClient]:
    """Engine thread + front-end app over a fresh run directory; everything stopped and removed after."""
    rundir = RunDir.create()
    registry = CollectorRegistry()
    engine = EngineThread(settings, rundir, registry)
    try:
        engine.start()
        with ServiceClient(create_app(settings, rundir, 0, registry)) as client:
            client.engine = engine.engine
            client.fatal_reasons = engine.fatal_reasons
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200:  # warming up, as a real client would see
                assert time.monotonic() < deadline, "the in-process service never became ready"
                time.sleep(0.01)
            yield client
    finally:
        engine.stop()
        rundir.remove()


@pytest.fixture
def make_client() -> Iterator[Callable[..., ServiceClient]]:
    """Factory: ``make_client(**settings_overrides)`` -> a started client (engine and lifespan running)."""
    with contextlib.ExitStack() as stack:
        yield lambda **overrides: stack.enter_context(in_process_service(tiny_settings(**overrides)))


@pytest.fixture(scope="module")
def client() -> Iterator[ServiceClient]:
    with in_process_service(tiny_settings()) as c:
        yield c


def image_bytes(fmt: str = "PNG", mode: str = "RGB", size: tuple[int, int] = (80, 60), **save: Any) -> bytes:
    """A deterministic gradient image in ``mode``, encoded as ``fmt``."""
    img = Image.linear_gradient("L").resize(size).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` in Prometheus text whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total
