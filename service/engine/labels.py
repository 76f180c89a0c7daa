"""Class names for a model's output indices."""

from __future__ import annotations

from functools import cache

from timm.data import ImageNetInfo

IMAGENET_CLASSES = 1000


@cache
def _imagenet_names() -> tuple[str, ...]:
    info = ImageNetInfo("imagenet-1k")
    return tuple(info.index_to_description(i) for i in range(IMAGENET_CLASSES))


def class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet-1k descriptions (timm's own metadata) for 1000-class models, else ``class_<i>``."""
    if num_classes == IMAGENET_CLASSES:
        return _imagenet_names()
    return tuple(f"class_{i}" for i in range(num_classes))
