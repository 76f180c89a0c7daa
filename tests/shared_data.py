"""What the tests read from ``../shared`` (real photos, real weights), and how its absence is reported.

On a laptop without ``../shared`` those tests skip and say why. Under ``CI=true`` a missing file is a
failure: CI always has ``../shared`` beside the clone, so a skip there would hide a broken setup.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
VIT_TINY_ARCH = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
VIT_TINY_WEIGHTS = SHARED / "models" / f"{VIT_TINY_ARCH}.safetensors"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(path: Path) -> Path:
    """``path`` if it exists; otherwise skip the test (fail it under ``CI=true``) naming what is missing."""
    if not path.exists():
        message = f"{path} is missing (tests expect ../shared beside the repository)"
        if in_ci():
            pytest.fail(message + " and CI=true: CI must have it", pytrace=False)
        pytest.skip(message)
    return path


def sample_images(n: int | None = None) -> list[Path]:
    """The first ``n`` (default all) real ImageNet JPEGs from ``../shared``, in file-name order."""
    return sorted(require(IMAGENET_SAMPLE).glob("*.JPEG"))[:n]


def sample_folder(folder: Path, n: int | None = None) -> Path:
    """``folder`` (created) holding links to the first ``n`` real photos: an images directory for a
    command line."""
    folder.mkdir(parents=True)
    for path in sample_images(n):
        (folder / path.name).symlink_to(path)
    return folder
