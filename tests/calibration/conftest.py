"""The real ViT-Ti and the 200 shared photos, loaded once per test session."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

from models import tome
from models.calibration import ImageSet, TimmEvalPreprocess
from tests.shared_data import IMAGENET_SAMPLE, VIT_TINY_ARCH, VIT_TINY_WEIGHTS, require


@pytest.fixture(scope="session")
def vit_tiny() -> tome.ToMeVisionTransformer:
    vit = timm.create_model(VIT_TINY_ARCH, pretrained=False)
    vit.load_state_dict(load_file(require(VIT_TINY_WEIGHTS)))
    return tome.patch(vit.eval())


@pytest.fixture(scope="session")
def photos() -> ImageSet:
    return ImageSet.from_folder(require(IMAGENET_SAMPLE))


@pytest.fixture(scope="session")
def photo_pixels(vit_tiny: tome.ToMeVisionTransformer, photos: ImageSet) -> torch.Tensor:
    """All 200 photos through timm's eval transform, in file-name order."""
    return photos.load(TimmEvalPreprocess(vit_tiny.vit))
