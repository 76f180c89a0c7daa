"""Calibrate ToMe schedules on real images, and read calibration files.

    python -m models.calibration calibrate --arch vit_tiny_patch16_224.augreg_in21k_ft_in1k \\
        --weights ../shared/models/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors \\
        --images ../shared/data/imagenet-sample --out out/cal.json --plot out/cal.png
    python -m models.calibration report out/cal.json --plot out/cal.png
    python -m models.calibration compare out/cal.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models.bench import DTYPES

from . import candidates as cands
from .calibrate import calibrate
from .compare import compare_search, format_comparison
from .defaults import resolve_tiers
from .images import ImageSet
from .loading import load_patched
from .record import Calibration, weights_sha256
from .report import format_table, plot
from .search import SearchConfig


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("calibrate", help="measure candidate schedules and write a calibration file")
    c.add_argument("--arch", required=True, help="timm model name (its tag picks the data config)")
    c.add_argument("--weights", type=Path, required=True, help=".safetensors or .pth state dict")
    c.add_argument("--images", type=Path, required=True, help="folder of images")
    c.add_argument("--labels", type=Path, default=None, help="CSV of file,label (else synset file names)")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    c.add_argument("--batch-size", type=int, default=16, help="serving batch size (timing and inference)")
    c.add_argument("--seed", type=int, default=0, help="picks the search images")
    c.add_argument("--no-search", action="store_true", help="constant and inflected schedules only")
    c.add_argument("--search-count", type=int, default=None, help="images set aside for the search (half)")
    c.add_argument("--search-images", type=int, default=SearchConfig.max_images, help="of those, used")
    c.add_argument("--rounds", type=int, default=5, help="timing rounds (median reported)")
    c.add_argument("--constant", type=_ints, default=None, help="constant r values (default 0..1.25N/L by 2)")
    c.add_argument("--inflections", type=_floats, default=list(cands.DEFAULT_INFLECTIONS))
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    c.add_argument("--no-float32-merge", action="store_true", help="merge in the model's dtype")
    c.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    c.add_argument("--plot", type=Path, default=None, help="PNG to write")
    c.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("report", help="table, default budget tiers and plot of a calibration file")
    r.add_argument("calibration", type=Path)
    r.add_argument("--plot", type=Path, default=None)
    r.add_argument("--point-estimate", action="store_true", help="budgets on point estimates, not CI bounds")

    m = sub.add_parser("compare", help="searched schedules against constant r, on the measured images")
    m.add_argument("calibration", type=Path)
    m.add_argument("--speed-tolerance", type=float, default=0.03)
    return parser


def _report(cal: Calibration, plot_path: Path | None, use_interval: bool = True) -> None:
    tiers = {tier: s.name for tier, s in resolve_tiers(cal, use_interval=use_interval).items()}
    print(format_table(cal, tiers))
    rule = "lower end of the 95% interval" if use_interval else "point estimate"
    print(f"default budget tiers (agreement loss from the {rule}): {tiers}")
    if plot_path is not None:
        plot(cal, plot_path, tiers)
        print(f"wrote {plot_path}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "calibrate":
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        model = load_patched(
            args.arch, args.weights, device, DTYPES[args.dtype], float32_merge=not args.no_float32_merge
        )
        candidates = cands.default_candidates(model, args.constant, args.inflections)
        search = None if args.no_search else SearchConfig(max_images=args.search_images)
        cal = calibrate(
            model,
            ImageSet.from_folder(args.images, args.labels),
            architecture=args.arch,
            weights_sha256=weights_sha256(args.weights),
            batch_size=args.batch_size,
            candidates=candidates,
            search=search,
            search_count=args.search_count,
            seed=args.seed,
            timing_rounds=args.rounds,
            progress=not args.no_progress,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cal.save(args.out)
        print(f"wrote {args.out}")
        _report(cal, args.plot)
    elif args.command == "report":
        _report(Calibration.load(args.calibration), args.plot, use_interval=not args.point_estimate)
    else:
        cal = Calibration.load(args.calibration)
        print(format_comparison(compare_search(cal, args.speed_tolerance), args.speed_tolerance))


if __name__ == "__main__":
    main()
