"""What the locust users send: a weighted tier mix and a pool of images (real photos, or generated)."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared ImageNet sample beside the checkout (../shared/data/imagenet-sample), when present.
DEFAULT_IMAGES_DIR = REPO_ROOT.parent / "shared" / "data" / "imagenet-sample"
IMAGE_SUFFIXES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
GENERATED_COUNT = 16
GENERATED_SIZE = (320, 240)


@dataclass(frozen=True)
class ImageFile:
    name: str
    data: bytes
    content_type: str


def parse_tier_mix(spec: str) -> dict[str, float]:
    """``"fast=3,exact=1"`` -> ``{"fast": 3.0, "exact": 1.0}``; a bare name weighs 1."""
    mix: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight = item.partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"empty tier name in {spec!r}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError as e:
            raise ValueError(f"weight of tier {name!r} must be a number, got {weight!r}") from e
        if value <= 0:
            raise ValueError(f"weight of tier {name!r} must be positive, got {value}")
        if name in mix:
            raise ValueError(f"tier {name!r} given twice in {spec!r}")
        mix[name] = value
    if not mix:
        raise ValueError("the tier mix is empty; e.g. --tiers fast=3,exact=1")
    return mix


def load_images(directory: Path | None) -> list[ImageFile]:
    """Image files from ``directory`` (sorted by name); generated JPEGs when it is missing or empty."""
    if directory is not None and directory.is_dir():
        files = [
            ImageFile(p.name, p.read_bytes(), IMAGE_SUFFIXES[p.suffix.lower()])
            for p in sorted(directory.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if files:
            return files
    return generated_images(GENERATED_COUNT)


def generated_images(count: int, seed: int = 0) -> list[ImageFile]:
    """Deterministic random-pixel JPEGs: a fallback when no photos are at hand."""
    rng = random.Random(seed)
    width, height = GENERATED_SIZE
    out = []
    for i in range(count):
        image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(ImageFile(f"generated-{i:03d}.jpg", buf.getvalue(), "image/jpeg"))
    return out


@dataclass(frozen=True)
class Workload:
    tiers: dict[str, float]
    images: list[ImageFile]
    images_per_request: int = 1
    top_k: int = 5
    model: str | None = None

    def __post_init__(self) -> None:
        if self.images_per_request < 1:
            raise ValueError("images per request must be at least 1")
        if not self.images:
            raise ValueError("no images to send")

    def pick_tier(self, rng: random.Random) -> str:
        return rng.choices(list(self.tiers), weights=list(self.tiers.values()))[0]

    def pick_images(self, rng: random.Random) -> list[ImageFile]:
        return [rng.choice(self.images) for _ in range(self.images_per_request)]
