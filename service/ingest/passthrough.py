"""Which images a front-end hands to the engine still compressed (``limits.device_jpeg_decode``).

When the engine decodes JPEGs on its device (its welcome says so per model), a front-end that has read
an image's header (format, size, pixel limit: ``Preprocessor.open``) puts a JPEG's bytes in the image's
slot instead of decoding it, when the engine's decoder reproduces what the CPU path would give and the
bytes fit the slot. Anything else takes the CPU path unchanged, and so do JPEGs the CPU path would
decode at reduced scale (``limits.jpeg_draft``) or in the heavy-image lane: the engine decodes at full
size, so those would be slower there and outside the tolerance measured for the pass-through.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..ipc.slots import write_encoded
from .fast_transform import resized_size

EXIF_ORIENTATION = 0x0112
END_OF_IMAGE = b"\xff\xd9"
DEVICE_MODES = frozenset({"RGB", "L"})  # not CMYK: Pillow and libjpeg-turbo convert Adobe CMYK differently


def device_decodable(img: Image.Image, max_pixels: int, short: int) -> bool:
    """An opened image the engine's JPEG decoder handles like the CPU path: a JPEG in RGB (YCbCr) or
    grayscale without an EXIF rotation (torchvision applies EXIF orientation on the CPU only), not set up
    for draft decoding, of at most ``max_pixels`` both as decoded and once resized to ``short`` pixels on
    its short side: the device resizes the whole image before it crops (a 1x60000 strip would become a
    248 x 14.9M float tensor), where the CPU path resizes only the box it keeps."""
    if img.format != "JPEG" or img.mode not in DEVICE_MODES:
        return False
    draft_scale = (getattr(img, "decoderconfig", None) or (1,))[0]  # set by Image.draft
    resized_w, resized_h = resized_size(img.width, img.height, short)
    return (
        draft_scale == 1
        and img.width * img.height <= max_pixels
        and resized_w * resized_h <= max_pixels
        and _upright(img)
    )


def _upright(img: Image.Image) -> bool:
    """No EXIF rotation or mirroring to apply."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block: the CPU path decides what it means
        return False
    return orientation == 1


def ends_whole(data: bytes) -> bool:
    """The JPEG ends in its end-of-image marker (zero padding after it allowed). A truncated file does
    not: it takes the CPU path, whose answer (422) does not depend on how lenient nvjpeg is with it."""
    return data.rstrip(b"\x00").endswith(END_OF_IMAGE)


def pass_through(img: Image.Image, data: bytes, slot: np.ndarray, max_pixels: int, short: int) -> bool:
    """Put ``data`` (``img``'s bytes) in ``slot`` for the engine to decode; False when it must be decoded
    here instead (not such a JPEG, truncated, or too large for the slot: nothing is written then)."""
    return device_decodable(img, max_pixels, short) and ends_whole(data) and write_encoded(slot, data)
