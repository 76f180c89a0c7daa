"""Shared fixtures: tiny random-weight ViT settings, an in-process client, image bytes."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
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


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """Factory: ``make_client(**settings_overrides)`` -> a started TestClient (lifespan runs)."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(tiny_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(tiny_settings())) as c:
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
