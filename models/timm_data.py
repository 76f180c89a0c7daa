"""timm's data config for a model as it was created."""

from __future__ import annotations

from typing import Any

from timm.data import resolve_data_config
from torch import nn


def model_data_config(vit: nn.Module) -> dict[str, Any]:
    """``resolve_data_config`` with the model's real input size.

    timm's pretrained config keeps its default size (e.g. 224) when ``img_size`` is overridden at
    creation, so trust the patch embedding instead.
    """
    config = resolve_data_config({}, model=vit)
    config["input_size"] = (3, *vit.patch_embed.img_size)
    return config
