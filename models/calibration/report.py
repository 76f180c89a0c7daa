"""A calibration as a plain-text table and as a speedup-vs-agreement plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .record import Calibration, ScheduleRecord
from .stats import Rate

KIND_STYLE = {
    "constant": {"marker": "o", "color": "tab:blue"},
    "inflected": {"marker": "s", "color": "tab:orange"},
    "searched": {"marker": "^", "color": "tab:green"},
}


def pareto_front(schedules: Sequence[ScheduleRecord], field: str = "agreement") -> list[ScheduleRecord]:
    """Schedules no other one beats on both median speedup and ``field`` (agreement or accuracy),
    fastest first."""

    def rate(s: ScheduleRecord) -> float:
        return getattr(s, field).rate

    front: list[ScheduleRecord] = []
    for s in sorted(schedules, key=lambda s: (-s.speedup.median, -rate(s))):
        if not front or rate(s) > rate(front[-1]):
            front.append(s)
    return front


def describe(calibration: Calibration) -> str:
    m, run, img = calibration.model, calibration.run, calibration.images
    search = f", search on {img.search_count} other images (seed {img.seed})" if img.search_count else ""
    return (
        f"{m.architecture} on {run.device_type} ({run.device_name}), {run.dtype}, batch {run.batch_size}, "
        f"{img.count} images{' with labels' if img.labels else ''}{search}"
    )


def _rate(rate: Rate | None) -> str:
    if rate is None:
        return "-"
    return f"{100 * rate.rate:5.1f} [{100 * rate.ci_low:4.1f},{100 * rate.ci_high:5.1f}]"


def _schedule_text(r: Sequence[int]) -> str:
    return "/".join(str(v) for v in r)


def format_table(calibration: Calibration, tiers: Mapping[str, str] | None = None) -> str:
    """One line per schedule, fastest first; rates are % with their 95% interval."""
    tier_of: dict[str, list[str]] = {}
    for tier, name in (tiers or {}).items():  # several tiers may resolve to one schedule
        tier_of.setdefault(name, []).append(tier)
    front = {s.name for s in pareto_front(calibration.schedules)}
    header = (
        f"{'schedule':<14}{'kind':<10}{'GFLOPs':>7}{'speedup [min,max]':>21}{'img/s':>8}"
        f"{'agreement % [95% CI]':>23}{'top-1 % [95% CI]':>23}  r per block"
    )
    lines = [describe(calibration), header, "-" * len(header)]
    for s in sorted(calibration.schedules, key=lambda s: -s.speedup.median):
        mark = ("*" if s.name in front else " ") + (
            f" <- {', '.join(tier_of[s.name])}" if s.name in tier_of else ""
        )
        speed = f"{s.speedup.median:.2f}x [{s.speedup.min:.2f},{s.speedup.max:.2f}]"
        lines.append(
            f"{s.name:<14}{s.kind:<10}{s.gflops:>7.3f}{speed:>21}{s.images_per_s:>8.1f}"
            f"{_rate(s.agreement):>23}{_rate(s.accuracy):>23}  {_schedule_text(s.r_per_block)}{mark}"
        )
    lines.append("* on the Pareto front of speedup and agreement")
    return "\n".join(lines)


def plot(calibration: Calibration, path: Path, tiers: Mapping[str, str] | None = None) -> None:
    """Speedup vs agreement (and vs top-1 when labelled) for every schedule, Pareto front, tiers marked.

    ``tiers`` maps a tier name to the schedule name it uses. Error bars: 95% interval of the rate
    (the min-max speedup over rounds is in the table: on a shared machine one stalled round makes it
    too wide to be worth drawing).
    """
    panels = [("agreement", "top-1 agreement with r=0 (%)")]
    if calibration.images.labels:
        panels.append(("accuracy", "top-1 accuracy (%)"))
    fig = Figure(figsize=(7.5 * len(panels), 6))  # no pyplot: no global backend or figure registry
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (field, label) in zip(axes[0], panels, strict=True):
        _panel(ax, calibration, field, label, tiers or {})
    fig.suptitle(describe(calibration), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def _panel(ax: Axes, calibration: Calibration, field: str, label: str, tiers: Mapping[str, str]) -> None:
    schedules = calibration.schedules
    for kind, style in KIND_STYLE.items():
        group = [s for s in schedules if s.kind == kind]
        if not group:
            continue
        rates = [getattr(s, field) for s in group]
        x = [s.speedup.median for s in group]
        y = [100 * r.rate for r in rates]
        ax.errorbar(
            x,
            y,
            yerr=[[100 * (r.rate - r.ci_low) for r in rates], [100 * (r.ci_high - r.rate) for r in rates]],
            fmt=style["marker"],
            color=style["color"],
            elinewidth=0.8,
            alpha=0.75,
            capsize=2,
            label=f"{kind} ({len(group)})",
        )
        for s, yy in zip(group, y, strict=True):  # searched ones as "@r8": found at r8's GFLOPs
            text = s.name.removeprefix("search")
            ax.annotate(
                text, (s.speedup.median, yy), textcoords="offset points", xytext=(4, -9), fontsize=6.5
            )
    front = sorted(pareto_front(schedules, field), key=lambda s: s.speedup.median)
    ax.plot(
        [s.speedup.median for s in front],
        [100 * getattr(s, field).rate for s in front],
        "-",
        color="0.3",
        linewidth=1,
        label="Pareto front",
    )
    by_name = {s.name: s for s in schedules}
    tiers_of: dict[str, list[str]] = {}
    for tier, name in tiers.items():
        tiers_of.setdefault(name, []).append(tier)
    for i, (name, names) in enumerate(tiers_of.items()):
        s = by_name[name]
        y = 100 * getattr(s, field).rate
        ax.scatter(
            [s.speedup.median], [y], s=220, facecolors="none", edgecolors="crimson", linewidths=1.8, zorder=5
        )
        ax.annotate(
            f"{', '.join(names)}: {name}",
            (s.speedup.median, y),
            textcoords="offset points",
            xytext=(12, 14 + 10 * (i % 2)),
            fontsize=9,
            color="crimson",
            weight="bold",
            arrowprops={"arrowstyle": "-", "color": "crimson", "lw": 0.8},
        )
    ax.set_xlabel(f"measured speedup over r=0 (median of {calibration.run.timing_rounds} interleaved rounds)")
    ax.set_ylabel(f"{label}, 95% Wilson interval, n={calibration.images.count}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
