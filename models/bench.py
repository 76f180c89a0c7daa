"""Benchmark stock timm against the ToMe-patched model in one process.

    python -m models.bench --model vit_small_patch16_224 --batch-size 16 --device cpu
    python -m models.bench --model vit_base_patch16_224 --batch-size 256 --device cuda --dtype bf16

Variants are timed in interleaved rounds (stock, r=0, r=4, ... then again), so drift in the
machine's speed hits every variant alike; each figure is the median over the timed rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import timm
import torch

from models import tome
from models.timing import interleaved_times

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SCHEDULES = "0,4,8,13,16,16:-1"


@dataclass(frozen=True)
class Row:
    variant: str
    r: str
    images_per_s: float
    median_batch_s: float
    speedup: float
    gflops: float
    flop_reduction: float
    efficiency: float  # speedup / flop_reduction: 1.0 means ToMe's overhead is free
    tokens_final: int


def parse_schedule(text: str) -> tome.RSpec:
    """``13`` → 13; ``16:-1`` → (16, -1.0); ``4/4/2/0`` → [4, 4, 2, 0]; a leading ``r`` (``r16:-1``, the
    calibration's candidate names) is allowed."""
    text = text.removeprefix("r")
    if ":" in text:
        r, inflection = text.split(":")
        return (int(r), float(inflection))
    if "/" in text:
        return [int(v) for v in text.split("/")]
    return int(text)


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    vit = timm.create_model(args.model, pretrained=False, **kwargs).eval().to(device=device, dtype=dtype)
    model = tome.patch(vit, prop_attn=not args.no_prop_attn)
    h, w = vit.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, h, w, device=device, dtype=dtype)
    schedules = [parse_schedule(s) for s in args.schedules.split(",")]

    variants: list[tuple[str, str, Callable[[], object], tome.ScheduleInfo]] = [
        ("timm", "-", lambda: vit(x), model.schedule_info(0))
    ]
    for r in schedules:
        variants.append(("tome", str(r), lambda r=r: model(x, r=r), model.schedule_info(r)))

    with torch.inference_mode():
        times = interleaved_times([fn for _, _, fn, _ in variants], device, args.warmup, args.runs)

    stock_s = statistics.median(times[0])
    stock_gflops = variants[0][3].gflops
    rows = []
    for i, (name, r, _, info) in enumerate(variants):
        median_s = statistics.median(times[i])
        speedup = stock_s / median_s
        reduction = stock_gflops / info.gflops
        rows.append(
            Row(
                variant=name,
                r=r,
                images_per_s=args.batch_size / median_s,
                median_batch_s=median_s,
                speedup=speedup,
                gflops=info.gflops,
                flop_reduction=reduction,
                efficiency=speedup / reduction,
                tokens_final=info.tokens_after_block[-1],
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    header = (
        f"{'variant':<8}{'r':>10}{'img/s':>10}{'speedup':>9}{'GFLOPs':>8}"
        f"{'FLOP red.':>10}{'effic.':>8}{'tokens':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.variant:<8}{row.r:>10}{row.images_per_s:>10.1f}{row.speedup:>8.2f}x{row.gflops:>8.2f}"
            f"{row.flop_reduction:>9.2f}x{row.efficiency:>8.2f}{row.tokens_final:>8}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--img-size", type=int, default=None, help="override the model's image size")
    parser.add_argument("--schedules", default=DEFAULT_SCHEDULES, help="comma list: 13, 16:-1 or 4/4/2")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per variant")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-prop-attn", action="store_true", help="disable proportional attention")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        print(json.dumps({"config": config, "torch": torch.__version__, "rows": [asdict(r) for r in rows]}))
        return
    print(
        f"{args.model} batch={args.batch_size} device={args.device} dtype={args.dtype} "
        f"torch={torch.__version__} timm={timm.__version__} threads={torch.get_num_threads()}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
