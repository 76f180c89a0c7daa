"""The calibration file: what was measured, on what, and how (JSON, versioned schema).

``SCHEMA_VERSION`` changes when a field changes meaning or is removed; readers refuse other versions
rather than guess.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .candidates import KINDS, Kind
from .stats import Rate

SCHEMA = "tome-serve/calibration"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Speedup:
    """Speedup over r=0 at the calibration batch size: per-round ratios, median and range."""

    median: float
    min: float
    max: float


@dataclass(frozen=True)
class ScheduleRecord:
    name: str
    kind: Kind
    r_per_block: tuple[int, ...]
    gflops: float
    tokens_final: int
    speedup: Speedup
    images_per_s: float
    agreement: Rate  # top-1 equals r=0's top-1 (same device and dtype)
    accuracy: Rate | None  # top-1 equals the label; None without labels

    @property
    def is_exact(self) -> bool:
        """r=0 everywhere: the reference itself, so its agreement is 1 by definition, not a sample."""
        return not any(self.r_per_block)


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # timm name
    weights_sha256: str | None  # the file's sha256, or how the weights were loaded ("hub", "random")
    input_size: tuple[int, int, int]
    num_classes: int
    prop_attn: bool
    float32_merge: bool
    depth: int
    tokens_in: int
    protected_tokens: int
    # the eval transform besides input_size (``preprocessing_of``); None in files made before it was kept
    preprocessing: dict[str, Any] | None = None


PREPROCESSING_KEYS = ("interpolation", "crop_pct", "crop_mode", "mean", "std")


def preprocessing_of(data_config: dict[str, Any]) -> dict[str, Any]:
    """The parts of a timm data config that decide the pixels a model sees, besides input_size, as JSON
    keeps them (lists, not tuples)."""
    return {
        key: list(data_config[key]) if isinstance(data_config.get(key), tuple) else data_config.get(key)
        for key in PREPROCESSING_KEYS
    }


@dataclass(frozen=True)
class RunInfo:
    device_type: str
    device_name: str
    dtype: str  # torch dtype name, e.g. "float32"
    batch_size: int
    threads: int
    torch_version: str
    timm_version: str
    timing_rounds: int
    confidence: float
    interval: str  # method of the rate intervals
    created: str  # ISO 8601, UTC


@dataclass(frozen=True)
class ImageInfo:
    source: str
    count: int  # images every rate is measured on
    labels: bool
    sha256: str  # ImageSet.sha256 of the measured images
    seed: int
    search_count: int  # images the search ran on, disjoint from the measured ones (0: no search)
    search_sha256: str | None


@dataclass(frozen=True)
class Calibration:
    model: ModelInfo
    run: RunInfo
    images: ImageInfo
    schedules: tuple[ScheduleRecord, ...]
    notes: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> ScheduleRecord:
        for record in self.schedules:
            if record.name == name:
                return record
        raise KeyError(f"no schedule {name!r} in the calibration (have {[s.name for s in self.schedules]})")

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        """Raises ValueError for another schema or version, or fields missing, unknown or malformed."""
        header = data if isinstance(data, dict) else {}
        if header.get("schema") != SCHEMA or header.get("version") != SCHEMA_VERSION:
            raise ValueError(
                f"not a version-{SCHEMA_VERSION} {SCHEMA} file "
                f"(schema={header.get('schema')!r}, version={header.get('version')!r})"
            )
        try:
            model = dict(data["model"], input_size=tuple(data["model"]["input_size"]))
            return cls(
                model=ModelInfo(**model),
                run=RunInfo(**data["run"]),
                images=ImageInfo(**data["images"]),
                schedules=tuple(_schedule_from_json(s) for s in data["schedules"]),
                notes=dict(data.get("notes", {})),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(
                f"a {SCHEMA} file with missing, unknown or malformed fields ({type(e).__name__}: {e})"
            ) from e

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Raises ValueError naming ``path`` when it is not a readable calibration file."""
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except ValueError as e:  # JSONDecodeError included
            raise ValueError(f"{path}: {e}") from e


def _schedule_from_json(data: dict[str, Any]) -> ScheduleRecord:
    if data["kind"] not in KINDS:
        raise ValueError(f"schedule {data['name']!r} has unknown kind {data['kind']!r}")
    accuracy = data.get("accuracy")
    return ScheduleRecord(
        **{
            **data,
            "r_per_block": tuple(data["r_per_block"]),
            "speedup": Speedup(**data["speedup"]),
            "agreement": Rate(**data["agreement"]),
            "accuracy": None if accuracy is None else Rate(**accuracy),
        }
    )


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
