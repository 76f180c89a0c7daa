"""Build a ToMe-patched timm model from a ``ModelSpec``: weights, device, dtype, data config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from models import tome
from models.calibration import Calibration
from models.timm_data import model_data_config

from ..settings import ModelSpec, TierSpec
from .calibration import load_for
from .tiers import Tier, build_tiers, default_tier_specs

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to set."""


@dataclass(frozen=True)
class LoadedModel:
    """A patched model ready to serve, with everything the API reports about it."""

    name: str
    spec: ModelSpec
    model: tome.ToMeVisionTransformer
    device: torch.device
    dtype: torch.dtype
    weights_source: str
    num_classes: int
    data_config: dict[str, Any]
    tiers: dict[str, Tier]
    calibration: Calibration | None = None  # the model's calibration file, when it applies
    calibration_ignored: str | None = None  # why a configured calibration file was not used

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, CPU otherwise; a CUDA device that is not there: ModelLoadError."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type != "cuda":
        return resolved
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} is configured but CUDA is not available")
    count = torch.cuda.device_count()
    index = 0 if resolved.index is None else resolved.index
    if index >= count:
        raise ModelLoadError(f"device {device!r} is configured but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def _create(spec: ModelSpec) -> tuple[torch.nn.Module, str]:
    arch = spec.architecture
    try:
        if spec.weights == "random":
            return timm.create_model(arch, pretrained=False, **spec.model_kwargs), "random (untrained)"
        if spec.weights == "hub":
            try:
                vit = timm.create_model(arch, pretrained=True, **spec.model_kwargs)
            except (OSError, RuntimeError, ValueError) as e:  # offline, unknown repo, missing weights
                raise ModelLoadError(
                    f"model {spec.name!r}: could not fetch pretrained weights for {arch!r} from the Hugging "
                    f"Face hub ({type(e).__name__}: {e}). Set weights to a local .safetensors or .pth file "
                    f'(config models[].weights or TOME_MODELS), or weights = "random" for demos and tests.'
                ) from e
            return vit, f"hub:{vit.pretrained_cfg.get('hf_hub_id') or arch}"
        return _create_from_file(spec, Path(spec.weights))
    except RuntimeError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"model {spec.name!r}: {e}") from e


def _create_from_file(spec: ModelSpec, path: Path) -> tuple[torch.nn.Module, str]:
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ModelLoadError(
            f'model {spec.name!r}: weights {str(path)!r} is neither "hub", "random" nor a weights file '
            f"({', '.join(WEIGHT_SUFFIXES)})"
        )
    if not path.is_file():
        raise ModelLoadError(f"model {spec.name!r}: weights file {path} does not exist")
    vit = timm.create_model(spec.architecture, pretrained=False, **spec.model_kwargs)
    try:
        # safetensors for .safetensors; torch.load(weights_only=True) otherwise: no arbitrary pickle
        timm.models.load_checkpoint(vit, str(path), use_ema=True, strict=True, weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"model {spec.name!r}: cannot load weights from {path}: {e}") from e
    return vit, f"file:{path}"


def load_model(spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Create, load and patch one model; raises ``ModelLoadError`` with a message saying what to set."""
    vit, source = _create(spec)
    try:
        model = tome.patch(vit, prop_attn=spec.prop_attn)
    except tome.UnsupportedModelError as e:
        raise ModelLoadError(f"model {spec.name!r}: {e}") from e
    dtype = getattr(torch, spec.dtype) if device.type == "cuda" else torch.float32
    model = model.eval().to(device=device, dtype=dtype)
    data_config = model_data_config(vit)
    try:
        calibration, ignored = load_for(spec, model, data_config, device, dtype)
    except ValueError as e:  # CalibrationMismatch included: one line saying what differs
        raise ModelLoadError(f"model {spec.name!r}: {e}") from e
    specs = spec.tiers
    if ignored is not None and specs is not None:  # budgets cannot resolve: the uncalibrated defaults
        specs = _without_budgets(spec.name, specs, default_tier_specs(model, calibrated=False))
    try:
        tiers = build_tiers(model, specs, calibration)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"model {spec.name!r}: bad tier: {e}") from e
    if spec.default_tier not in tiers and spec.default_tier != "auto":
        raise ModelLoadError(
            f"model {spec.name!r}: default_tier {spec.default_tier!r} is not one of {sorted(tiers)} or auto"
        )
    log.info("loaded %s (%s) on %s as %s from %s", spec.name, spec.architecture, device, dtype, source)
    return LoadedModel(
        name=spec.name,
        spec=spec,
        model=model,
        device=device,
        dtype=dtype,
        weights_source=source,
        num_classes=int(vit.num_classes),
        data_config=data_config,
        tiers=tiers,
        calibration=calibration,
        calibration_ignored=ignored,
    )


def _without_budgets(
    model: str, specs: dict[str, TierSpec], defaults: dict[str, TierSpec]
) -> dict[str, TierSpec]:
    """Budget tiers replaced by the uncalibrated default of the same name (a calibration was ignored)."""
    out = {}
    for name, tier in specs.items():
        if tier.by_budget:
            if name not in defaults:
                raise ModelLoadError(
                    f"model {model!r}: tier {name!r} is declared by a budget and the calibration was "
                    f"ignored; only {sorted(defaults)} have uncalibrated defaults"
                )
            tier = defaults[name]
        out[name] = tier
    return out
