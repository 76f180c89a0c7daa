"""``tome-serve calibrate``: measure a served model's candidate schedules on your images.

The model is loaded exactly as ``tome-serve`` serves it (the config's weights, device, dtype, ToMe
options) and the images go through the serving preprocessing (decode, resize to uint8, normalise as
the engine does), so the figures are those of the deployment. Per candidate schedule (constant r, the
paper's inflected ones and, unless ``--no-search``, per-block schedules searched on half the images and
judged on the other half) it measures top-1 agreement with r=0, top-1 accuracy when the images have
labels (ImageNet synset file names, or ``--labels`` CSV), speed interleaved with r=0 at the serving
batch size, GFLOPs, and 95% intervals; then writes the calibration file, prints the table with the
tiers the config's budgets (or the default budgets) resolve to, and draws the plot.

    tome-serve calibrate --config deploy/config/gpu.toml --images photos/ --out /models/calibration.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from models.calibration import (
    BudgetError,
    Calibration,
    ImageSet,
    SearchConfig,
    calibrate,
    default_candidates,
    format_table,
    plot,
    preprocessing_of,
)

from .engine.calibration import weights_identity
from .engine.loading import LoadedModel, ModelLoadError, load_model, resolve_device
from .engine.normalize import Normalize
from .engine.tiers import build_tiers
from .errors import ServiceError
from .ingest.preprocess import Preprocessor
from .settings import CONFIG_FILE_ENV, ModelSpec, ServiceSettings, load_settings


class ServingPreprocess:
    """Image bytes -> the float32 ``[3, H, W]`` tensor the engine feeds the model (before its dtype)."""

    def __init__(self, loaded: LoadedModel, settings: ServiceSettings) -> None:
        self.pixels = Preprocessor.for_limits(loaded.data_config, settings.limits)
        config = loaded.data_config
        self.normalize = Normalize(config["mean"], config["std"], torch.device("cpu"), torch.float32)

    def __call__(self, data: bytes) -> torch.Tensor:
        try:
            pixels = self.pixels(data)
        except ServiceError as e:  # what the service would answer this image with
            raise ValueError(e.message) from e
        return self.normalize(torch.from_numpy(np.array(pixels))[None])[0]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tome-serve calibrate", description=__doc__.splitlines()[0])
    source = parser.add_argument_group("the model (as served)")
    source.add_argument("--config", help=f"the service's TOML or YAML settings (or ${CONFIG_FILE_ENV})")
    source.add_argument("--model", help="which configured model (default: the default model)")
    source.add_argument("--timm-name", help="instead of --config: a timm architecture ...")
    source.add_argument("--weights", help="... and its .safetensors / .pth weights")
    source.add_argument("--device", help="override the config's device (auto, cpu, cuda, cuda:1)")
    source.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="override the config's dtype; on a CPU (which the service serves in float32) a reduced dtype "
        "is a study: the service refuses such a file",
    )
    images = parser.add_argument_group("the images")
    images.add_argument("--images", type=Path, required=True, help="folder of the traffic's images")
    labels = images.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=Path, help="CSV of file,label (else ImageNet synset file names)")
    labels.add_argument(
        "--no-labels",
        action="store_true",
        help="ignore synset file names (e.g. a head that is not ImageNet-1k's): agreement with r=0 only",
    )
    how = parser.add_argument_group("what to measure")
    how.add_argument(
        "--batch-size", type=_positive, help="default: the config's batching.max_batch_size, at most 64"
    )
    how.add_argument("--constant", help="constant r values, e.g. 0,4,8,12,16 (default: 0 to 1.25 N/L by 2)")
    how.add_argument("--inflections", help="inflections of the paper's schedules, e.g. -1,-0.5,0.5")
    how.add_argument("--no-search", action="store_true", help="constant and inflected schedules only")
    how.add_argument("--seed", type=int, default=0, help="picks the images the search runs on")
    how.add_argument("--rounds", type=_positive, default=5, help="timing rounds (the median is reported)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("calibration.json"), help="calibration file to write")
    out.add_argument("--plot", type=Path, help="PNG to draw (default: --out with .png)")
    out.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _numbers(text: str | None, kind: type) -> list | None:
    return None if text is None else [kind(v) for v in text.split(",") if v.strip()]


def _given(value: list | None) -> list:
    """An optional positional argument: passed only when given, so the callee's default applies."""
    return [] if value is None else [value]


def _model_spec(args: argparse.Namespace) -> tuple[ModelSpec, ServiceSettings]:
    if args.timm_name:
        if not args.weights:
            raise ValueError("--timm-name needs --weights")
        spec = {"name": args.timm_name, "timm_name": args.timm_name, "weights": args.weights}
        settings = load_settings(None, models=[spec], device=args.device or "auto")
    else:
        settings = load_settings(args.config)
    name = args.model or settings.default_model
    spec = next((m for m in settings.models if m.name == name), None)
    if spec is None:
        raise ValueError(f"no model {name!r} in the config (have {[m.name for m in settings.models]})")
    if args.device:
        settings = settings.model_copy(update={"device": args.device})
    if args.dtype:
        spec = spec.model_copy(update={"dtype": args.dtype})
    return spec, settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec, settings = _model_spec(args)
        # the model alone: its tiers are what the calibration will decide
        bare = spec.model_copy(update={"tiers": None, "calibration": None, "default_tier": "exact"})
        loaded = load_model(bare, resolve_device(settings.device))
        images = ImageSet.from_folder(args.images, args.labels)
        if args.no_labels:
            images = replace(images, labels=None, synset_labels=False)
    except (ValidationError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"tome-serve calibrate: {e}", file=sys.stderr)
        return 2
    model = loaded.model
    if args.dtype and loaded.device.type == "cpu":
        model = model.to(getattr(torch, args.dtype))  # the file records it: no CPU server will match it
    try:
        calibration = calibrate(
            model,
            images,
            architecture=spec.architecture,
            weights_sha256=weights_identity(spec.weights),
            preprocess=ServingPreprocess(loaded, settings),
            preprocessing=preprocessing_of(loaded.data_config),
            batch_size=args.batch_size or min(settings.batching.max_batch_size, 64),
            candidates=default_candidates(
                model, _numbers(args.constant, int), *_given(_numbers(args.inflections, float))
            ),
            search=None if args.no_search else SearchConfig(),
            seed=args.seed,
            timing_rounds=args.rounds,
            progress=not args.no_progress,
        )
    except ValueError as e:  # images or candidates that cannot make a calibration: said in one line
        print(f"tome-serve calibrate: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    calibration.save(args.out)
    tiers = chosen_tiers(spec, loaded, calibration)
    print(format_table(calibration, tiers))
    print(f"tiers: {tiers or 'none resolved'}")
    picture = args.plot or args.out.with_suffix(".png")
    picture.parent.mkdir(parents=True, exist_ok=True)
    plot(calibration, picture, tiers)
    print(f"wrote {args.out} and {picture}")
    print(f'serve with it: calibration = "{args.out}" on model {spec.name!r} (tiers then default to budgets)')
    return 0


def chosen_tiers(spec: ModelSpec, loaded: LoadedModel, calibration: Calibration) -> dict[str, str]:
    """tier -> calibrated schedule name, as the service would resolve the config's tiers (or the default
    budgets) with this calibration; tiers it cannot resolve are left out and said."""
    try:
        tiers = build_tiers(loaded.model, spec.tiers, calibration)
    except (ValueError, BudgetError) as e:
        print(f"note: the configured tiers do not resolve with this calibration: {e}", file=sys.stderr)
        return {}
    return {name: t.calibration.name for name, t in tiers.items() if t.calibration is not None}
