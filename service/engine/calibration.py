"""A model's calibration file: was it made for this model as it is served?

It must match the architecture, the weights (sha256 of the weights file, else "hub" or "random"), the
input size and the rest of the eval transform (interpolation, crop, mean and std: recorded since
2026-11-24), the number of classes, depth and tokens, the ToMe patch options, the serving dtype and the
device type; otherwise its figures describe another model. On a mismatch the service refuses to start
with one line saying what differs, or (``on_calibration_mismatch = "ignore"``) starts without it,
logged, every tier reported uncalibrated. A file timed on another device of the same type (another GPU
or CPU model) applies, with a warning: its agreements hold, its speedups (and ``min_speedup`` tiers)
describe that device.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from models import tome
from models.calibration import Calibration, preprocessing_of, weights_sha256
from models.calibration.calibrate import device_name

from ..settings import ModelSpec
from .tiers import unprotected_tokens

log = logging.getLogger(__name__)


class CalibrationMismatch(ValueError):
    """The calibration file was made for another model, dtype or device."""


def weights_identity(weights: str) -> str:
    """What a calibration records of ``ModelSpec.weights``: the file's sha256, else the setting itself
    ("hub", "random"), so a calibration made on random weights never passes for the hub's, nor the
    reverse."""
    path = Path(weights)
    return weights_sha256(path) if path.is_file() else weights


def mismatches(
    calibration: Calibration,
    spec: ModelSpec,
    model: tome.ToMeVisionTransformer,
    data_config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> list[str]:
    """What differs between the calibration and the model as served (empty: it applies)."""
    input_size = tuple(data_config["input_size"])
    served_weights = weights_identity(spec.weights)
    m, run = calibration.model, calibration.run
    served = {
        "architecture": (m.architecture, spec.architecture),
        "weights sha256": (m.weights_sha256, served_weights),
        "input size": (tuple(m.input_size), tuple(input_size)),
        "classes": (m.num_classes, int(model.vit.num_classes)),
        "depth": (m.depth, model.depth),
        "tokens": (m.tokens_in - m.protected_tokens, unprotected_tokens(model)),
        "prop_attn": (m.prop_attn, model.prop_attn),
        "float32 merge": (m.float32_merge, model.merge_dtype is not None),
        "dtype": (run.dtype, str(dtype).removeprefix("torch.")),
        "device": (run.device_type, device.type),
    }
    if m.preprocessing is not None:  # files made before it was recorded cannot say
        served["preprocessing"] = (m.preprocessing, preprocessing_of(data_config))
    return [f"{what} {made!r} (served: {now!r})" for what, (made, now) in served.items() if made != now]


def warn_if_timed_at_another_batch_size(
    name: str, calibration: Calibration | None, max_batch_size: int
) -> None:
    """Speedups change with the batch size (a GPU gains most from merging at large batches): a file timed
    at another batch size than ``batching.max_batch_size`` applies, with a warning saying so."""
    if calibration is not None and calibration.run.batch_size != max_batch_size:
        timed = calibration.run.batch_size
        log.warning(
            "model %s: its calibration was timed at batch size %d, it is served at up to %d: its speedups "
            "(and tiers by min_speedup) describe batch %d; recalibrate (tome-serve calibrate takes the "
            "config's batch size) to trust them", name, timed, max_batch_size, timed,
        )  # fmt: skip


def load_for(
    spec: ModelSpec,
    model: tome.ToMeVisionTransformer,
    data_config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Calibration | None, str | None]:
    """The model's calibration (or None without one) and, when it was ignored, why.

    Raises ``CalibrationMismatch`` when it does not apply and ``spec.on_calibration_mismatch`` is refuse,
    ``ValueError`` when the file cannot be read as a calibration.
    """
    if spec.calibration is None:
        return None, None
    path = Path(spec.calibration)
    if not path.is_file():
        raise ValueError(f"calibration file {path} does not exist")
    calibration = Calibration.load(path)
    problems = mismatches(calibration, spec, model, data_config, device, dtype)
    if not problems:
        timed_on, served_on = calibration.run.device_name, device_name(device)
        if timed_on != served_on:
            log.warning(
                "model %s: calibration %s was timed on %s, served on %s: its speedups (and tiers by "
                "min_speedup) describe that device, not this one; recalibrate here to trust them",
                spec.name, path, timed_on, served_on,
            )  # fmt: skip
        return calibration, None
    reason = f"calibration {path} was made for another model: " + "; ".join(problems)
    if spec.on_calibration_mismatch == "refuse":
        raise CalibrationMismatch(
            reason + ' (recalibrate with `tome-serve calibrate`, or set on_calibration_mismatch = "ignore")'
        )
    log.warning("model %s: %s; serving it uncalibrated", spec.name, reason)
    return None, reason
