"""Image bytes -> uint8 ``[H, W, 3]`` pixels at the model's input size, following its timm data config.

Runs in a front-end's decode threads, before a request is queued, so a bad image fails alone. The pixel
limit is checked from the image header before any pixel is decoded; PIL's module-global limit is left
alone. Normalisation is not done here: the engine does it on the device (``engine.normalize``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ServiceError
from .fast_transform import FusedCenterCrop, fused_center_crop

if TYPE_CHECKING:
    from ..settings import LimitsSettings

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})
# what Pillow's JPEG reader names its images: "MPO" for a JPEG with a Multi-Picture (MPF) segment (stereo
# cameras, phones' HDR gain-map photos); its first picture is an ordinary JPEG, decoded like one
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
MIN_READ_BUDGET = 10_000  # reads of an image's bytes Pillow may make, at least ...
BYTES_PER_READ = 256  # ... or one per this many bytes of the image, whichever is more


class _ReadBudget(io.BytesIO):
    """An image's bytes for Pillow to read, with a cap on how many reads it makes (header and decode).

    Pillow walks a file's structure in Python, one small read at a time: each JPEG segment, PNG chunk
    or GIF block, and each stray byte between JPEG segments. Real images take tens to a few hundred
    reads (a 36 MB BMP: 554; PNGs one to four per IDAT chunk); an 8 MB file of comment segments, fill
    bytes, text chunks or 1-byte IDAT chunks takes millions, ~2-4 s of CPU in a decode thread. The cap
    (``MIN_READ_BUDGET``, or one read per ``BYTES_PER_READ`` bytes) keeps that below what decoding a real
    image of the same size costs.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.budget = max(MIN_READ_BUDGET, len(data) // BYTES_PER_READ)
        self.reads_left = self.budget

    def read(self, size: int | None = -1) -> bytes:
        self.reads_left -= 1
        if self.reads_left < 0:
            raise ServiceError(
                422,
                "bad_image",
                f"image structure is too fragmented: more than {self.budget} segments, chunks or blocks "
                f"to read in {len(self.getbuffer())} bytes",
            )
        return super().read(size)


def timm_pil_steps(data_config: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """timm's eval transform for ``data_config`` without its final ToTensor and Normalize: the PIL steps.

    Imports torch (through timm) on first use only: front-ends need it only for configs the fused path
    does not reproduce.
    """
    from timm.data import create_transform
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms as T

    transform = create_transform(**data_config, is_training=False)
    steps = list(getattr(transform, "transforms", []))
    if (
        len(steps) < 2
        or type(steps[-2]) not in (MaybeToTensor, T.ToTensor)
        or type(steps[-1]) is not T.Normalize
    ):
        raise ValueError(
            f"timm's eval transform for {data_config} does not end in ToTensor, Normalize: {transform}"
        )
    return T.Compose(steps[:-2])


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
    """Decode, orient, convert, resize and crop one image; thread-safe (no shared mutable state).

    With ``jpeg_draft``, a JPEG at least four times the resize target is decoded at 1/2, 1/4 or 1/8
    scale in the DCT domain (never below twice the target, PIL's ``reducing_gap=2`` convention), then
    resized as usual: much faster for large photos, within a stated tolerance of full decoding
    (tests/service/test_preprocess.py).

    With ``fused`` (default), timm's center-crop eval transform is replaced by ``FusedCenterCrop``
    (ingest/fast_transform.py): one boxed Pillow resize of only the kept region, within a stated
    tolerance of timm's transform; any other config (crop modes 'squash'/'border', non-square resize,
    nearest/box filters, ...) runs timm's own PIL steps unchanged.
    """

    def __init__(
        self,
        data_config: dict[str, Any],
        max_pixels: int,
        jpeg_draft: bool = True,
        fused: bool = True,
        max_jpeg_scans: int = 256,
    ) -> None:
        self.data_config = data_config
        self.fused: FusedCenterCrop | None = fused_center_crop(data_config) if fused else None
        self._timm_steps: Callable[[Image.Image], Image.Image] | None = None
        if self.fused is None:
            self._timm_steps = timm_pil_steps(data_config)
        _, self.height, self.width = data_config["input_size"]
        self.max_pixels = max_pixels
        self.max_jpeg_scans = max_jpeg_scans
        self.draft_size = _resize_target(data_config) if jpeg_draft else None
        self.resize_short = self.fused.short if self.fused is not None else _resize_target(data_config)

    @classmethod
    def for_limits(cls, data_config: dict[str, Any], limits: LimitsSettings) -> Preprocessor:
        """The preprocessor ``limits`` configure: one place, for the service and ``tome-serve calibrate``."""
        return cls(
            data_config,
            limits.max_image_pixels,
            limits.jpeg_draft,
            fused=limits.fused_resize,
            max_jpeg_scans=limits.max_jpeg_scans,
        )

    def open(self, data: bytes) -> Image.Image:
        """Read only the header: format, size, pixel limit; JPEGs set up for draft decoding. The image's
        ``size`` is then the size it will decode at (its cost); raises ``ServiceError``."""
        if not data:
            raise ServiceError(422, "bad_image", "empty image: the body or file part has no bytes")
        try:
            img = Image.open(_ReadBudget(data), formats=sorted(ALLOWED_FORMATS))
        except UnidentifiedImageError as e:
            raise ServiceError(
                415, "bad_image", f"not a supported image (accepted: {', '.join(sorted(ALLOWED_FORMATS))})"
            ) from e
        except Image.DecompressionBombError as e:  # PIL's own limit, if ours is set above it
            raise ServiceError(422, "too_large", f"image has too many pixels: {e}") from e
        except (OSError, SyntaxError, ValueError) as e:
            raise ServiceError(422, "bad_image", f"corrupt image header: {e}") from e
        width, height = img.size
        if width * height > self.max_pixels:
            raise ServiceError(
                422,
                "too_large",
                f"image is {width}x{height} = {width * height} pixels, over the limit of {self.max_pixels}",
            )
        if img.format in JPEG_FORMATS:
            # each scan is another pass over every block; 0xFFDA cannot occur in entropy-coded data
            # (stuffed), so this over-counts at most
            scans = data.count(b"\xff\xda")
            if scans > self.max_jpeg_scans:
                raise ServiceError(
                    422, "bad_image", f"JPEG has {scans} scans, over the limit of {self.max_jpeg_scans}"
                )
            if self.draft_size is not None:
                # both sides stay >= twice the target: PIL's own reducing_gap=2 (Image.thumbnail)
                img.draft(img.mode, (2 * self.draft_size, 2 * self.draft_size))
        return img

    def load(self, img: Image.Image) -> Image.Image:
        """Decode an opened image: RGB, EXIF orientation applied; raises ``ServiceError``."""
        try:
            img.load()  # first frame only for GIF/animated WebP
            ImageOps.exif_transpose(img, in_place=True)  # not in place, it copies every upright image
            return _to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ServiceError(422, "bad_image", f"corrupt {img.format} image: {e}") from e

    def decode(self, data: bytes) -> Image.Image:
        """Bytes -> RGB PIL image with EXIF orientation applied; raises ``ServiceError``."""
        return self.load(self.open(data))

    def pixels(self, img: Image.Image) -> np.ndarray:
        """RGB image -> uint8 ``[H, W, 3]`` at the model's input size."""
        out = self.fused(img) if self.fused is not None else None
        if out is None:
            if self._timm_steps is None:
                self._timm_steps = timm_pil_steps(self.data_config)  # rare: an image the fused path pads
            out = np.asarray(self._timm_steps(img))
        return out

    def __call__(self, data: bytes) -> np.ndarray:
        """Bytes -> uint8 ``[H, W, 3]`` ready for a slot; raises ``ServiceError`` for a bad image."""
        return self.pixels(self.decode(data))

    def into(self, img: Image.Image, out: np.ndarray) -> None:
        """Decode an opened image straight into ``out`` (a shared-memory slot)."""
        out[...] = self.pixels(self.load(img))
