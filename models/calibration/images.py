"""Calibration images: a folder of pictures with optional ImageNet-style labels.

Labels come from a CSV of ``file,label`` rows (label = class index or WordNet synset such as
``n01440764``; an optional ``file,label`` header), or else from synset-prefixed file names
(``n01440764_tench.JPEG``). A synset's class index is its position in sorted synset order, the standard
ImageNet-1k index timm's ``ImageNetInfo`` lists.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform
from torch import nn
from tqdm import tqdm

from models.timm_data import model_data_config

Preprocess = Callable[[bytes], torch.Tensor]
"""Image file bytes -> float tensor ``[3, H, W]`` ready for the model."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
SYNSET = re.compile(r"n\d{8}")
_SYNSET_PREFIX = re.compile(r"^(n\d{8})(?:[_.\-]|$)")


def imagenet_class_index() -> dict[str, int]:
    """Synset -> ImageNet-1k class index (position in sorted synset order)."""
    synsets = ImageNetInfo().label_names()
    if list(synsets) != sorted(synsets) or len(synsets) != 1000:
        raise RuntimeError("timm's ImageNetInfo does not list the 1000 synsets in sorted order")
    return {s: i for i, s in enumerate(synsets)}


def parse_label(text: str, class_index: Mapping[str, int]) -> int:
    """A class index (``"0"``) or a synset (``"n01440764"``) -> class index; raises ValueError."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if SYNSET.fullmatch(text):
        if text not in class_index:
            raise ValueError(f"unknown synset {text!r}")
        return class_index[text]
    raise ValueError(f"label {text!r} is neither a class index nor a synset like n01440764")


def read_labels_csv(path: Path, class_index: Mapping[str, int]) -> tuple[dict[str, int], bool]:
    """``file,label`` rows -> ({file: class index}, whether any label was a synset, i.e. an ImageNet-1k
    index); a first row ``file,label`` is taken as a header."""
    labels: dict[str, int] = {}
    synsets = False
    with path.open(newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise ValueError(f"{path}:{line}: expected 'file,label', got {row!r}")
            name, label = row[0].strip(), row[1].strip()
            if line == 1 and (name.lower(), label.lower()) == ("file", "label"):
                continue
            if name in labels:
                raise ValueError(f"{path}:{line}: {name!r} is listed twice")
            synsets = synsets or not label.isdigit()
            try:
                labels[name] = parse_label(label, class_index)
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from e
    if not labels:
        raise ValueError(f"{path} lists no images")
    return labels, synsets


def synset_of(file_name: str) -> str | None:
    """The synset a file name starts with (``n01440764_tench.JPEG`` -> ``n01440764``), or None."""
    match = _SYNSET_PREFIX.match(file_name)
    return match.group(1) if match else None


@dataclass(frozen=True)
class ImageSet:
    """Image files under ``root`` (relative names, sorted) and their labels, if known (``synset_labels``:
    some came from synsets, so they are ImageNet-1k class indices)."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...] | None
    synset_labels: bool = False

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.files):
            raise ValueError("labels and files differ in length")

    def __len__(self) -> int:
        return len(self.files)

    @classmethod
    def from_folder(cls, folder: Path, labels_csv: Path | None = None) -> ImageSet:
        """Every image in ``folder`` (labels from synset file names when all have one), or the CSV's rows."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a folder")
        class_index = imagenet_class_index()
        if labels_csv is not None:
            rows, synsets = read_labels_csv(Path(labels_csv), class_index)
            missing = [name for name in rows if not (folder / name).is_file()]
            if missing:
                raise ValueError(f"{len(missing)} files in {labels_csv} are not in {folder}: {missing[:3]}")
            files = sorted(rows)
            return cls(folder, tuple(files), tuple(rows[name] for name in files), synsets)
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
        synsets = [synset_of(name) for name in files]
        known = [s is not None and s in class_index for s in synsets]
        if not any(known):
            return cls(folder, tuple(files), None)
        if not all(known):
            odd = [name for name, ok in zip(files, known, strict=True) if not ok]
            raise ValueError(
                f"{len(odd)} of {len(files)} files have no ImageNet synset prefix ({odd[:3]}); "
                "name every file <synset>_<anything>, or give a labels CSV"
            )
        return cls(folder, tuple(files), tuple(class_index[s] for s in synsets if s is not None), True)

    def subset(self, indices: Sequence[int]) -> ImageSet:
        indices = sorted(indices)
        labels = None if self.labels is None else tuple(self.labels[i] for i in indices)
        return ImageSet(self.root, tuple(self.files[i] for i in indices), labels, self.synset_labels)

    def split(self, count: int, seed: int) -> tuple[ImageSet, ImageSet]:
        """``count`` images drawn by ``seed`` and the rest; each part keeps file-name order."""
        if not 0 < count < len(self):
            raise ValueError(f"cannot split {len(self)} images into {count} and the rest")
        order = np.random.default_rng(seed).permutation(len(self)).tolist()
        return self.subset(order[:count]), self.subset(order[count:])

    def read(self, index: int) -> bytes:
        return (self.root / self.files[index]).read_bytes()

    def sha256(self) -> str:
        """Digest of every file's name and bytes, in order: says which images a calibration used."""
        digest = hashlib.sha256()
        for i, name in enumerate(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.read(i)).digest())
        return digest.hexdigest()

    def load(self, preprocess: Preprocess, progress: bool = False) -> torch.Tensor:
        """All images preprocessed once: ``[N, 3, H, W]``."""
        items = tqdm(range(len(self)), desc="preprocess", unit="img", disable=not progress, leave=False)
        return torch.stack([self._preprocessed(preprocess, i) for i in items])

    def _preprocessed(self, preprocess: Preprocess, index: int) -> torch.Tensor:
        """One image preprocessed; an image that cannot be read or decoded: ValueError naming its file."""
        try:
            return preprocess(self.read(index))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {self.root / self.files[index]}: {e}") from e

    def label_tensor(self) -> torch.Tensor | None:
        return None if self.labels is None else torch.tensor(self.labels, dtype=torch.long)


class TimmEvalPreprocess:
    """timm's eval transform for the model's data config, on an RGB decode of the bytes."""

    def __init__(self, vit: nn.Module) -> None:
        self.transform = create_transform(**model_data_config(vit), is_training=False)

    def __call__(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            return self.transform(img.convert("RGB"))
