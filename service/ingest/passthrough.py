"""Which images a front-end hands to the engine still compressed (``limits.device_jpeg_decode``).

When the engine decodes JPEGs on its device (its welcome says so per model), a front-end that has read
an image's header (format, size, pixel limit: ``Preprocessor.open``) puts a JPEG's bytes in the image's
slot instead of decoding it, when the engine's decoder reproduces what the CPU path would give and the
bytes fit the slot. Anything else takes the CPU path unchanged.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..ipc.slots import write_encoded

EXIF_ORIENTATION = 0x0112
DEVICE_MODES = frozenset({"RGB", "L"})  # not CMYK: Pillow and libjpeg-turbo convert Adobe CMYK differently


def device_decodable(img: Image.Image) -> bool:
    """An opened image the engine's JPEG decoder handles like the CPU path: a JPEG in RGB (YCbCr) or
    grayscale without an EXIF rotation (torchvision applies EXIF orientation on the CPU only)."""
    if img.format != "JPEG" or img.mode not in DEVICE_MODES:
        return False
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: the CPU path decides what it means
        return False
    return orientation == 1


def pass_through(img: Image.Image, data: bytes, slot: np.ndarray) -> bool:
    """Put ``data`` (``img``'s bytes) in ``slot`` for the engine to decode; False when it must be decoded
    here instead (not such a JPEG, or too large for the slot: nothing is written then)."""
    return device_decodable(img) and write_encoded(slot, data)
