"""JPEG bytes -> the model's uint8 ``[H, W, 3]`` input, decoded and resized on the engine's device.

``limits.device_jpeg_decode``: a front-end may pass a JPEG's compressed bytes through its slot instead of
decoding it (``ingest.passthrough``). The engine decodes a batch's JPEGs in one
``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA), then per image reproduces the fused CPU path's
geometry (``ingest.fast_transform``: Resize(short side) + CenterCrop) with an antialiased
``interpolate`` in float32, rounded to uint8. Pillow's resampler keeps a uint8 intermediate between its
two passes and decodes with its own IDCT, so pixels differ slightly from the CPU path; the tolerance is
measured on the shared photos in tests/service/test_device_decode.py.

A JPEG that cannot be decoded fails alone: when the batched call raises, the images are decoded one by
one (on CUDA, one nvjpeg cannot decode is retried on the CPU) and the bad one gets an error message.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ..ingest.fast_transform import fused_center_crop, resized_size
from .faults import is_fatal

log = logging.getLogger(__name__)

DeviceDecodeSetting = Literal["off", "auto", "on"]
# Pillow filter of the fused CPU path -> the same filter in torch (antialiased bicubic uses a = -0.5,
# like Pillow); lanczos and hamming have no torch equivalent, so such models keep the CPU path
_TORCH_MODES = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}
UNDECODABLE = "corrupt JPEG image: it could not be decoded"


@dataclass(frozen=True)
class DeviceResize:
    """Resize(short side) + CenterCrop((crop_h, crop_w)), torchvision's geometry, with ``mode``."""

    short: int
    crop_h: int
    crop_w: int
    mode: str

    def __call__(self, chw: torch.Tensor) -> torch.Tensor:
        """uint8 ``[3, h, w]`` -> uint8 ``[crop_h, crop_w, 3]`` on the same device."""
        _, height, width = chw.shape
        new_w, new_h = resized_size(width, height, self.short)
        top = round((new_h - self.crop_h) / 2.0)  # torchvision's CenterCrop, as in fast_transform.crop_box
        left = round((new_w - self.crop_w) / 2.0)
        x = chw.unsqueeze(0)
        if (new_w, new_h) != (width, height):
            x = F.interpolate(
                x.float(), size=(new_h, new_w), mode=self.mode, align_corners=False, antialias=True
            )
            x = x.round_().clamp_(0, 255).to(torch.uint8)
        return x[0, :, top : top + self.crop_h, left : left + self.crop_w].permute(1, 2, 0)


def device_resize_for(data_config: dict[str, Any]) -> DeviceResize | None:
    """The device resize equal to the fused CPU path for ``data_config``, or None where there is none
    (configs the fused path does not handle, filters torch lacks, a crop larger than the resize)."""
    fused = fused_center_crop(data_config)
    if fused is None or fused.resample not in _TORCH_MODES:
        return None
    if fused.short < max(fused.crop_h, fused.crop_w):  # crop_pct > 1: torchvision would pad
        return None
    return DeviceResize(fused.short, fused.crop_h, fused.crop_w, _TORCH_MODES[fused.resample])


def _device_failure(error: RuntimeError) -> bool:
    """The device failed, not the image: the batch fails as any batch would (out of memory: 500 for its
    requests; a sticky CUDA error: the engine ends)."""
    return is_fatal(error) or isinstance(error, torch.cuda.OutOfMemoryError)


class JpegDecoder:
    """Decodes a batch's JPEGs on ``device`` and resizes them; holds only read-only state."""

    def __init__(self, resize: DeviceResize, device: torch.device) -> None:
        self.resize = resize
        self.device = device

    def __call__(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """CPU uint8 byte tensors -> per image, uint8 ``[crop_h, crop_w, 3]`` on the device or why not."""
        if not encoded:
            return []
        try:
            decoded: list[torch.Tensor | str] = list(decode_jpeg(encoded, ImageReadMode.RGB, self.device))
        except RuntimeError as e:
            if _device_failure(e):
                raise
            decoded = [self._one(data) for data in encoded]  # find the bad one(s): the rest are served
        return [self.resize(x) if isinstance(x, torch.Tensor) else x for x in decoded]

    def _one(self, data: torch.Tensor) -> torch.Tensor | str:
        devices = [self.device] if self.device.type == "cpu" else [self.device, torch.device("cpu")]
        error: RuntimeError | None = None
        for device in devices:  # nvjpeg refuses a few valid files libjpeg-turbo decodes
            try:
                return decode_jpeg(data, ImageReadMode.RGB, device).to(self.device)
            except RuntimeError as e:
                if _device_failure(e):
                    raise
                error = e
        log.info("a JPEG could not be decoded on %s: %s", self.device, str(error).splitlines()[-1:])
        return UNDECODABLE


def _probe_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


def jpeg_decoder_for(
    setting: DeviceDecodeSetting, device: torch.device, data_config: dict[str, Any], model: str
) -> JpegDecoder | None:
    """The model's decoder if device decoding is on for it: "auto" on CUDA, "on" anywhere, never "off";
    and only where the device resize reproduces its preprocessing and a probe JPEG decodes there."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    resize = device_resize_for(data_config)
    if resize is None:
        log.warning("model %s: no device JPEG decode for its data config %s (CPU path)", model, data_config)
        return None
    decoder = JpegDecoder(resize, device)
    probe = torch.frombuffer(bytearray(_probe_jpeg()), dtype=torch.uint8)
    try:
        decoded = decode_jpeg([probe], ImageReadMode.RGB, device)
    except RuntimeError as e:
        log.warning("model %s: JPEG decoding on %s failed its probe (CPU path): %s", model, device, e)
        return None
    if decoded[0].shape != (3, 16, 16):
        shape = tuple(decoded[0].shape)
        log.warning("model %s: JPEG decoding on %s gave %s for a 16x16 probe", model, device, shape)
        return None
    return decoder
