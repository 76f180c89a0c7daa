"""Fused eval transform: timm's Resize(short side) -> CenterCrop -> ToTensor -> Normalize in two steps.

timm's standard eval pipeline (``crop_mode='center'``) resizes the whole image so its short side is
``floor(max(input_size) / crop_pct)``, then throws most of it away in a center crop, then converts and
normalizes in separate passes. ``FusedCenterCrop`` instead computes the source-image box that the crop
selects and does one Pillow ``resize(..., box=...)``: same output pixel centres, same filter scale and
support (Pillow samples outside the box for filter support), but only the kept pixels are computed. Then
uint8 HWC -> normalized float32 CHW in one pass.

Not bit-exact: Pillow keeps box coordinates in float32, so a filter weight occasionally rounds the other
way (one uint8 step, 0.017 in normalized units); and Pillow 13 picks the order of its two separable passes
(horizontal or vertical first) from the sizes involved, so the boxed call may take the other order than the
full resize did. With the uint8 intermediate, that changes rounding, and for filters with negative lobes
(bicubic, lanczos) clipping of overshoot at hard edges: rare pixels then differ by several steps. Mean
differences stay ~4e-4 (tolerances measured in tests/service/test_preprocess.py).

``fused_center_crop`` returns None for any transform it does not reproduce exactly, and the caller keeps
timm's transform. Instances hold only read-only state, so one may be shared between threads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import MaybeToTensor
from torchvision import transforms as T

# torchvision InterpolationMode -> Pillow filter, for the filters Pillow computes with its separable
# convolution resampler (the one that honours a fractional box exactly like a resize-then-crop).
# NEAREST is left out (Pillow resolves a boxed nearest resize by another path), and so is BOX: its
# weights jump at +-0.5, so the float32 box coordinates Pillow uses flip whole taps (measured up to 1.9).
_PIL_FILTERS = {
    T.InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    T.InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    T.InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    T.InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}


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
    """Callable PIL RGB image -> ``[3, crop_h, crop_w]`` float32 tensor, equal to ``reference`` within
    Pillow's rounding; falls back to ``reference`` for images it does not handle (non-RGB, padding)."""

    def __init__(
        self,
        short: int,
        crop_h: int,
        crop_w: int,
        resample: Image.Resampling,
        mean: torch.Tensor,
        std: torch.Tensor,
        reference: Any,
    ) -> None:
        self.short, self.crop_h, self.crop_w, self.resample = short, crop_h, crop_w, resample
        # torchvision: (x / 255 - mean) / std  ==  x * scale + bias
        std = std.to(torch.float64)
        self.scale = (1.0 / (255.0 * std)).to(torch.float32).view(3, 1, 1)
        self.bias = (-mean.to(torch.float64) / std).to(torch.float32).view(3, 1, 1)
        self.reference = reference

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            return self.reference(img)
        width, height = img.size
        box = crop_box(width, height, self.short, self.crop_w, self.crop_h)
        if box is None:
            return self.reference(img)
        if resized_size(width, height, self.short) == (width, height):
            # torchvision's resize is a copy here: crop integer pixels, no filtering at all
            left, top = int(box[0]), int(box[1])
            img = img.crop((left, top, left + self.crop_w, top + self.crop_h))
        else:
            img = img.resize((self.crop_w, self.crop_h), resample=self.resample, box=box)
        return self.to_tensor(img)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> normalized contiguous ``[3, H, W]`` float32 (MaybeToTensor + Normalize)."""
        hwc = torch.from_numpy(np.array(img))  # uint8 [H, W, 3], a writable copy owned by this call
        out = torch.empty((3, img.height, img.width), dtype=torch.float32)
        out.copy_(hwc.permute(2, 0, 1))
        return out.mul_(self.scale).add_(self.bias)


def fused_center_crop(data_config: dict[str, Any], transform: Any) -> FusedCenterCrop | None:
    """A ``FusedCenterCrop`` equivalent to ``transform`` (timm's eval transform for ``data_config``),
    or None where the transform is anything but the standard Resize/CenterCrop/ToTensor/Normalize."""
    if data_config.get("crop_mode", "center") not in ("center", None):
        return None
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or steps is None or len(steps) != 4:
        return None
    resize, crop, to_tensor, normalize = steps
    if not (
        type(resize) is T.Resize
        and type(crop) is T.CenterCrop
        and type(to_tensor) in (MaybeToTensor, T.ToTensor)
        and type(normalize) is T.Normalize
    ):
        return None
    size = resize.size if isinstance(resize.size, int) else None
    if isinstance(resize.size, (list, tuple)) and len(resize.size) == 1:
        size = resize.size[0]
    if size is None or resize.max_size is not None or resize.interpolation not in _PIL_FILTERS:
        return None
    crop_h, crop_w = crop.size
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).flatten()
    std = torch.as_tensor(normalize.std, dtype=torch.float32).flatten()
    if mean.numel() != 3 or std.numel() != 3:
        return None
    return FusedCenterCrop(size, crop_h, crop_w, _PIL_FILTERS[resize.interpolation], mean, std, transform)
