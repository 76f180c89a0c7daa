"""Does merging in float32 keep a bf16/fp16 ToMe model's predictions those of float32, and at what cost?

    python -m models.calibration.precision --arch vit_tiny_patch16_224.augreg_in21k_ft_in1k \\
        --weights ../shared/models/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors \\
        --images ../shared/data/imagenet-sample --dtypes bf16,fp16 --json out/precision.json

For every reduced dtype and schedule: top-1 agreement with the float32 model at the same schedule,
with the similarity and weighted merge in the model's dtype (``float32_merge=False``, the official
release) and in float32 (the default). The cost: both variants and r=0 timed in interleaved rounds
(``models.timing.interleaved_times``) in ``--timing-dtype``; the figure is the median per-round ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from models import tome
from models.bench import DTYPES, parse_schedule
from models.timing import interleaved_times

from .images import ImageSet, TimmEvalPreprocess
from .loading import load_patched
from .measure import predict
from .stats import Rate


def variants(model: tome.ToMeVisionTransformer, dtype: torch.dtype) -> dict[str, tome.ToMeVisionTransformer]:
    """One copy of the weights in ``dtype``, patched to merge natively and in float32."""
    vit = copy.deepcopy(model.vit).to(dtype)
    return {
        "native_merge": tome.patch(vit, prop_attn=model.prop_attn, float32_merge=False),
        "float32_merge": tome.patch(vit, prop_attn=model.prop_attn, float32_merge=True),
    }


def agreement_study(
    model: tome.ToMeVisionTransformer,
    pixels: torch.Tensor,
    dtypes: list[torch.dtype],
    schedules: list[tome.RSpec],
    batch_size: int,
) -> list[dict]:
    applied = [model.schedule_info(r).r_per_block for r in schedules]
    reference = [predict(model, pixels, a, batch_size).argmax(dim=-1) for a in applied]
    rows = []
    for dtype in dtypes:
        pair = variants(model, dtype)
        for r, a, ref in zip(schedules, applied, reference, strict=True):
            row: dict = {"dtype": str(dtype).removeprefix("torch."), "r": str(r), "r_per_block": a}
            for name, variant in pair.items():
                top1 = predict(variant, pixels, a, batch_size).argmax(dim=-1)
                rate = Rate.measure(int((top1 == ref).sum()), len(top1))
                row[name] = asdict(rate)
                print(f"{row['dtype']:>9} r={r!s:<10} {name:<14} agreement with float32: {rate}", flush=True)
            rows.append(row)
    return rows


def cost_study(
    model: tome.ToMeVisionTransformer,
    batch: torch.Tensor,
    dtype: torch.dtype,
    schedules: list[tome.RSpec],
    rounds: int,
    warmup: int,
) -> list[dict]:
    pair = variants(model, dtype)
    native, fp32 = pair["native_merge"], pair["float32_merge"]
    x = batch.to(dtype)
    fns = []
    for r in schedules:
        fns += [lambda: native(x, r=0), lambda r=r: native(x, r=r), lambda r=r: fp32(x, r=r)]
    with torch.inference_mode():
        times = interleaved_times(fns, torch.device("cpu"), warmup, rounds)
    rows = []
    for i, r in enumerate(schedules):
        base, nat, f32 = times[3 * i], times[3 * i + 1], times[3 * i + 2]
        ratio = [f / n for f, n in zip(f32, nat, strict=True)]
        row = {
            "dtype": str(dtype).removeprefix("torch."),
            "r": str(r),
            "speedup_native": statistics.median(b / n for b, n in zip(base, nat, strict=True)),
            "speedup_float32_merge": statistics.median(b / f for b, f in zip(base, f32, strict=True)),
            "time_float32_over_native": {
                "median": statistics.median(ratio),
                "min": min(ratio),
                "max": max(ratio),
            },
        }
        print(
            f"{row['dtype']} r={r!s:<10} speedup over r=0: native {row['speedup_native']:.3f}x, "
            f"float32 merge {row['speedup_float32_merge']:.3f}x; time float32/native "
            f"{statistics.median(ratio):.3f} [{min(ratio):.3f}, {max(ratio):.3f}]",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--schedules", default="0,8,13,16,16:-1", help="comma list: 13, 16:-1 or 4/4/2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--timing-dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rounds", type=int, default=10, help="timing rounds (0: no timing)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    model = load_patched(args.arch, args.weights, torch.device("cpu"), torch.float32)
    images = ImageSet.from_folder(args.images)
    pixels = images.load(TimmEvalPreprocess(model.vit))
    schedules = [parse_schedule(s) for s in args.schedules.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    result = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": len(images),
        "agreement_with_float32": agreement_study(model, pixels, dtypes, schedules, args.batch_size),
    }
    if args.rounds:
        batch = pixels[: args.batch_size]
        result["cost"] = cost_study(
            model, batch, DTYPES[args.timing_dtype], schedules, args.rounds, args.warmup
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
