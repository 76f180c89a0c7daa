"""Read calibration files (``tome-serve calibrate`` writes them, measuring the model as it is served).

python -m models.calibration report calibration.json --plot calibration.png
python -m models.calibration compare calibration.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .compare import compare_search, format_comparison
from .defaults import resolve_tiers
from .record import Calibration
from .report import format_table, plot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.calibration",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="table, default budget tiers and plot of a calibration file")
    r.add_argument("calibration", type=Path)
    r.add_argument("--plot", type=Path, default=None)
    r.add_argument("--point-estimate", action="store_true", help="budgets on point estimates, not CI bounds")
    m = sub.add_parser("compare", help="searched schedules against constant r, on the measured images")
    m.add_argument("calibration", type=Path)
    m.add_argument("--speed-tolerance", type=float, default=0.03)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cal = Calibration.load(args.calibration)
    except (OSError, ValueError) as e:  # no such file, or not a calibration: one line
        parser.exit(2, f"{parser.prog}: {e}\n")
    if args.command == "report":
        use_interval = not args.point_estimate
        tiers = {tier: s.name for tier, s in resolve_tiers(cal, use_interval=use_interval).items()}
        print(format_table(cal, tiers))
        rule = "lower end of the 95% interval" if use_interval else "point estimate"
        print(f"default budget tiers (agreement loss from the {rule}): {tiers}")
        if args.plot is not None:
            plot(cal, args.plot, tiers)
            print(f"wrote {args.plot}")
    else:
        print(format_comparison(compare_search(cal, args.speed_tolerance), args.speed_tolerance))


if __name__ == "__main__":
    main()
