"""Fused eval transform: timm's Resize(short side) -> CenterCrop in one boxed Pillow resize, to uint8.

timm's standard eval pipeline (``crop_mode='center'``) resizes the whole image so its short side is
``floor(max(input_size) / crop_pct)``, then throws most of it away in a center crop (then converts and
normalizes, which the engine now does on the device). ``FusedCenterCrop`` instead computes the
source-image box that the crop selects and does one Pillow ``resize(..., box=...)``: same output pixel
centres, same filter scale and support (Pillow samples outside the box for filter support), but only the
kept pixels are computed. The result is the uint8 ``[H, W, 3]`` image the engine normalizes.

Not bit-exact: Pillow keeps box coordinates in float32, so a filter weight occasionally rounds the other
way (one uint8 step, 0.017 in normalized units); and Pillow 13 picks the order of its two separable passes
(horizontal or vertical first) from the sizes involved, so the boxed call may take the other order than the
full resize did. With the uint8 intermediate, that changes rounding, and for filters with negative lobes
(bicubic, lanczos) clipping of overshoot at hard edges: rare pixels then differ by several steps. Mean
differences stay ~4e-4 (tolerances measured in tests/service/test_preprocess.py).

``fused_center_crop`` decides from the data config alone (no torch import: front-ends stay light) and
returns None for any config whose timm transform it does not reproduce; the caller then runs timm's own
PIL steps. Instances hold only read-only state, so one may be shared between threads.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

# timm interpolation name -> Pillow filter, for the filters Pillow computes with its separable
# convolution resampler (the one that honours a fractional box exactly like a resize-then-crop).
# NEAREST is left out (Pillow resolves a boxed nearest resize by another path), and so is BOX: its
# weights jump at +-0.5, so the float32 box coordinates Pillow uses flip whole taps (measured up to 1.9).
_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
}
DEFAULT_CROP_PCT = 0.875  # timm's, when the config has none


def resized_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) torchvision's ``Resize(short)`` gives: long side ``int(short * long / old_short)``."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def crop_box(width: int, height: int, short: int, crop_w: int, crop_h: int) -> tuple[float, ...] | None:
    """Source box (left, top, right, bottom) that Resize(short) + CenterCrop((crop_h, crop_w)) keeps.

    None when the resized image is smaller than the crop (torchvision would pad: not reproduced).
    """
    new_w, new_h = resized_size(width, height, short)
    if crop_w > new_w or crop_h > new_h:
        return None
    top = round((new_h - crop_h) / 2.0)  # torchvision's int(round(...)): Python rounds half to even
    left = round((new_w - crop_w) / 2.0)
    # resized pixel i has its centre at source (i + 0.5) * width / new_w; integer products first, so an
    # edge of the resized image maps to exactly 0 or width (Pillow rejects a box past the image)
    return (
        left * width / new_w,
        top * height / new_h,
        (left + crop_w) * width / new_w,
        (top + crop_h) * height / new_h,
    )


class FusedCenterCrop:
    """Callable PIL RGB image -> uint8 ``[crop_h, crop_w, 3]`` array, equal to timm's Resize + CenterCrop
    within Pillow's rounding; None for an image it does not handle (the resized image would be smaller
    than the crop, which torchvision pads), so the caller falls back to timm's steps."""

    def __init__(self, short: int, crop_h: int, crop_w: int, resample: Image.Resampling) -> None:
        self.short, self.crop_h, self.crop_w, self.resample = short, crop_h, crop_w, resample

    def __call__(self, img: Image.Image) -> np.ndarray | None:
        width, height = img.size
        box = crop_box(width, height, self.short, self.crop_w, self.crop_h)
        if box is None or img.mode != "RGB":
            return None
        if resized_size(width, height, self.short) == (width, height):
            # torchvision's resize is a copy here: crop integer pixels, no filtering at all
            left, top = int(box[0]), int(box[1])
            img = img.crop((left, top, left + self.crop_w, top + self.crop_h))
        else:
            img = img.resize((self.crop_w, self.crop_h), resample=self.resample, box=box)
        return np.asarray(img)


def fused_center_crop(data_config: dict[str, Any]) -> FusedCenterCrop | None:
    """A ``FusedCenterCrop`` equal to timm's eval transform for ``data_config``, or None where that
    transform is anything but Resize(short side) -> CenterCrop (crop modes 'squash'/'border', border
    trimming, a short side that differs between height and width, nearest/box filters)."""
    if data_config.get("crop_mode") not in ("center", None) or data_config.get("crop_border_pixels"):
        return None
    resample = _PIL_FILTERS.get(str(data_config.get("interpolation", "bilinear")))
    _, crop_h, crop_w = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
    short_h, short_w = math.floor(crop_h / crop_pct), math.floor(crop_w / crop_pct)
    if resample is None or short_h != short_w:
        return None
    return FusedCenterCrop(short_h, crop_h, crop_w, resample)
