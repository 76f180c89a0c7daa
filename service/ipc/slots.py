"""Shared-memory image slots: one file of ``count`` uint8 images ``[H, W, 3]`` per model, mapped by all.

The engine creates the file; every front-end maps it and owns a fixed range of slots (``SlotRange``), so
no lock is needed across processes: a front-end writes only its own slots, and only while the engine is
not reading them (a slot is handed over with the request and comes back with the engine's final answer).
"""

from __future__ import annotations

import mmap
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SlotLayout:
    count: int
    height: int
    width: int

    @property
    def image_bytes(self) -> int:
        return self.height * self.width * 3

    @property
    def total_bytes(self) -> int:
        return self.count * self.image_bytes


def create_slot_file(path: Path, layout: SlotLayout) -> None:
    """Make the zero-filled backing file (sparse in tmpfs until written)."""
    with path.open("wb") as f:
        f.truncate(layout.total_bytes)


def map_slots(path: Path, layout: SlotLayout) -> np.ndarray:
    """A writable ``[count, H, W, 3]`` uint8 view of the shared file (it lives as long as the array)."""
    with path.open("r+b") as f:
        buffer = mmap.mmap(f.fileno(), layout.total_bytes)
    return np.frombuffer(buffer, dtype=np.uint8).reshape(layout.count, layout.height, layout.width, 3)


class SlotRange:
    """A front-end's own slots ``[first, first + size)``: all-or-none acquisition, no waiting.

    Requests that may use only part of them (tier=auto, within ``auto.max_queue_share``) acquire with
    ``limited=True``: at most ``limited_size`` such slots are held at once, so a flood of them cannot take
    the slots that requests naming their tier need. Used from one event-loop thread only.
    """

    def __init__(self, first: int, size: int, limited_size: int | None = None) -> None:
        self.first, self.size = first, size
        self.limited_size = size if limited_size is None else limited_size
        self._free: deque[int] = deque(range(first, first + size))
        self._limited: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self, n: int, limited: bool = False) -> list[int] | None:
        """``n`` slots, or None when fewer are free (the caller refuses the request)."""
        if n > len(self._free) or (limited and len(self._limited) + n > self.limited_size):
            return None
        slots = [self._free.popleft() for _ in range(n)]
        if limited:
            self._limited.update(slots)
        return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            if not self.first <= slot < self.first + self.size:
                raise ValueError(f"slot {slot} is not in this range")
        self._limited.difference_update(slots)
        self._free.extend(slots)


# ---- a compressed image in a slot (device JPEG decode) -------------------------------------------------
# With device decoding on, a front-end may put a JPEG's bytes in a slot instead of its pixels: a 4-byte
# little-endian length, then the bytes. The Submit message says which slots hold one; the engine decodes
# them and writes the pixels back into the slot, so after its batch every slot holds pixels again.
ENCODED_LENGTH_BYTES = 4


def write_encoded(slot: np.ndarray, data: bytes) -> bool:
    """Put ``data`` (length-prefixed) in ``slot``; False, and nothing written, when it does not fit."""
    flat = slot.reshape(-1)
    end = ENCODED_LENGTH_BYTES + len(data)
    if end > flat.size:
        return False
    flat[:ENCODED_LENGTH_BYTES] = np.frombuffer(len(data).to_bytes(ENCODED_LENGTH_BYTES, "little"), np.uint8)
    flat[ENCODED_LENGTH_BYTES:end] = np.frombuffer(data, np.uint8)
    return True


def read_encoded(slot: np.ndarray) -> np.ndarray:
    """A copy of the bytes ``write_encoded`` put in ``slot``; ValueError for a length past the slot."""
    flat = slot.reshape(-1)
    size = int.from_bytes(flat[:ENCODED_LENGTH_BYTES].tobytes(), "little")
    if ENCODED_LENGTH_BYTES + size > flat.size:
        raise ValueError(f"encoded image of {size} bytes does not fit its {flat.size}-byte slot")
    return flat[ENCODED_LENGTH_BYTES : ENCODED_LENGTH_BYTES + size].copy()
