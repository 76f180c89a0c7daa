"""Seconds per batch of every tier at every batch bucket, as the engine runs them (CUDA graphs on CUDA).

The engine's own warm-up (``service.engine.warmup``) on a model built the way the service builds it:
uint8 slots in, normalisation and top-k on the device, each (tier, bucket) captured as a CUDA graph
where the device is CUDA and ``--no-graphs`` is not given, eager on CPU. It answers issue 13's "with
CUDA graphs, `fast` not slower than `exact` at batch 1 and 8" for a timm ViT with random weights:

    python -m loadtest.tier_batches --model vit_base_patch16_224 --device cuda --dtype bfloat16 \
        --max-batch-size 64 --json out/tier-batches.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from models.timing import time_call
from service.engine.loading import load_model, resolve_device
from service.engine.runner import DeviceThreads, ModelRunner
from service.engine.warmup import warm_up
from service.settings import ModelSpec


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up (captures the graphs), then ``--rounds`` interleaved timings of every (tier, bucket)."""
    device = resolve_device(args.device)
    spec = ModelSpec(
        name="bench",
        timm_name=args.model,
        weights="random",
        dtype=args.dtype,
        model_kwargs=json.loads(args.model_kwargs),
    )
    loaded = load_model(spec, device)
    threads = DeviceThreads(device)
    slots = torch.zeros((1, *loaded.input_size[1:], 3), dtype=torch.uint8)
    runner = ModelRunner(loaded, slots, threads, args.max_batch_size, top_k=5, cuda_graphs=not args.no_graphs)
    _, h, w = loaded.input_size
    gen = torch.Generator().manual_seed(0)
    inputs = {
        b: torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=gen).to(device)
        for b in runner.buckets
    }

    def run() -> tuple[int, dict[str, dict[int, list[float]]]]:
        graphs = warm_up(runner, loaded.tiers).graphs
        times: dict[str, dict[int, list[float]]] = {t: {b: [] for b in runner.buckets} for t in loaded.tiers}
        for _ in range(args.rounds):  # interleaved, so drift hits every tier alike
            for b in runner.buckets:
                for name, tier in loaded.tiers.items():
                    times[name][b].append(time_call(lambda t=tier, b=b: runner.forward(inputs[b], t), device))
        return graphs, times

    try:  # on the launch thread, inside the engine's stream, as the engine runs batches
        graphs, times = asyncio.run(threads.call(run))  # type: ignore[misc]
    finally:
        threads.shutdown()
    exact = next((n for n, t in loaded.tiers.items() if not any(t.info.r_per_block)), None)
    tiers = {}
    for name, by_bucket in times.items():
        tiers[name] = {
            "schedule": loaded.tiers[name].describe_schedule(),
            "gflops": round(loaded.tiers[name].info.gflops, 3),
            "ms_per_batch": {b: round(1000 * statistics.median(ts), 4) for b, ts in by_bucket.items()},
        }
        if exact is not None:
            tiers[name]["speedup_vs_exact"] = {
                b: round(statistics.median(times[exact][b]) / statistics.median(ts), 3)
                for b, ts in by_bucket.items()
            }
    return {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "cuda_graphs": graphs,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "tiers": tiers,
    }


def format_report(r: dict[str, Any]) -> str:
    buckets = list(next(iter(r["tiers"].values()))["ms_per_batch"])
    lines = [
        f"# {r['model']} on {r['device_name']} ({r['dtype']}), {r['cuda_graphs']} CUDA graphs, "
        f"median of {r['rounds']} rounds; ms per batch (speedup over exact)",
        "tier      " + "".join(f"{'b' + str(b):>18}" for b in buckets),
    ]
    for name, t in r["tiers"].items():
        cells = []
        for b in buckets:
            speedup = t.get("speedup_vs_exact", {}).get(b)
            cells.append(f"{t['ms_per_batch'][b]:>10.3f}" + (f" ({speedup:4.2f}x)" if speedup else " " * 8))
        lines.append(f"{name:<10}" + "".join(cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtest.tier_batches", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224", help="timm architecture (random weights)")
    p.add_argument("--model-kwargs", default="{}", help="JSON object of timm.create_model kwargs")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", help="the serving dtype on CUDA (CPU serves float32)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--no-graphs", action="store_true", help="eager on CUDA too")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = measure(args)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
