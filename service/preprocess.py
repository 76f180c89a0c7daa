"""Image bytes -> normalized tensor, following the model's timm data config.

Runs in a worker thread, before a request is queued, so a bad image fails alone. The pixel limit is
checked from the image header before any pixel is decoded; PIL's module-global limit is left alone.
"""

from __future__ import annotations

import io
import math
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform

from .fast_transform import FusedCenterCrop, fused_center_crop
from .rejections import Rejection

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})


class ImageRejected(Rejection, ValueError):
    """An image the service will not classify."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, CMYK, palette and alpha images become RGB (alpha dropped, like timm's loader)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA to convert cleanly
    return img.convert("RGB")


def _resize_target(data_config: dict[str, Any]) -> int:
    """Short side timm's eval transform resizes to before the center crop."""
    return math.floor(max(data_config["input_size"][1:]) / data_config.get("crop_pct", 1.0))


class Preprocessor:
    """Decode, orient, convert and transform one image; thread-safe (no shared mutable state).

    With ``jpeg_draft``, a JPEG at least four times the resize target is decoded at 1/2, 1/4 or 1/8
    scale in the DCT domain (never below twice the target, PIL's ``reducing_gap=2`` convention), then
    resized as usual: much faster for large photos, within a stated tolerance of full decoding
    (tests/service/test_preprocess.py).

    With ``fused`` (default), timm's standard center-crop eval transform is replaced by
    ``FusedCenterCrop`` (service/fast_transform.py): one boxed Pillow resize of only the kept region and
    one conversion pass, within a stated tolerance of timm's transform; any other config (crop modes
    'squash'/'border', non-square resize, nearest/box filters, ...) keeps timm's transform unchanged.
    """

    def __init__(
        self, data_config: dict[str, Any], max_pixels: int, jpeg_draft: bool = True, fused: bool = True
    ) -> None:
        self.reference = create_transform(**data_config, is_training=False)
        fast = fused_center_crop(data_config, self.reference) if fused else None
        self.fused: FusedCenterCrop | None = fast
        self.transform = fast if fast is not None else self.reference
        self.max_pixels = max_pixels
        self.draft_size = _resize_target(data_config) if jpeg_draft else None

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> RGB PIL image with EXIF orientation applied; raises ``ImageRejected``."""
        if not data:
            raise ImageRejected(422, "bad_image", "empty image: the body or file part has no bytes")
        try:
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
        except UnidentifiedImageError as e:
            raise ImageRejected(
                415, "bad_image", f"not a supported image (accepted: {', '.join(sorted(ALLOWED_FORMATS))})"
            ) from e
        except Image.DecompressionBombError as e:  # PIL's own limit, if ours is set above it
            raise ImageRejected(422, "too_large", f"image has too many pixels: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageRejected(422, "bad_image", f"corrupt image header: {e}") from e
        width, height = img.size
        if width * height > self.max_pixels:
            raise ImageRejected(
                422,
                "too_large",
                f"image is {width}x{height} = {width * height} pixels, over the limit of {self.max_pixels}",
            )
        try:
            if self.draft_size is not None and img.format == "JPEG":
                # both sides stay >= twice the target: PIL's own reducing_gap=2 (Image.thumbnail)
                img.draft(img.mode, (2 * self.draft_size, 2 * self.draft_size))
            img.load()  # first frame only for GIF/animated WebP
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageRejected(422, "bad_image", f"corrupt {img.format} image: {e}") from e

    def __call__(self, data: bytes) -> torch.Tensor:
        """Bytes -> ``[3, H, W]`` float32 tensor ready for the model."""
        return self.transform(self.decode(data))
