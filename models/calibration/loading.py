"""Load a timm ViT from a local weights file and patch it for ToMe, for the calibration CLI."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from models import tome


def load_patched(
    architecture: str,
    weights: Path,
    device: torch.device,
    dtype: torch.dtype,
    prop_attn: bool = True,
    float32_merge: bool = True,
) -> tome.ToMeVisionTransformer:
    """``architecture`` (a timm name; its tag picks the data config) with ``weights`` loaded strictly.

    ``.safetensors`` load through safetensors, anything else through ``torch.load(weights_only=True)``
    (timm's loader): never arbitrary pickle.
    """
    vit = timm.create_model(architecture, pretrained=False)
    timm.models.load_checkpoint(vit, str(weights), strict=True, weights_only=True)
    model = tome.patch(vit, prop_attn=prop_attn, float32_merge=float32_merge)
    return model.eval().to(device=device, dtype=dtype)
