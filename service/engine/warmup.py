"""Start-up warm-up: run (and on CUDA capture) every tier at every batch bucket, then measure.

Measures, on this device, each (tier, bucket)'s batch time (what a queue of that tier costs) and each
tier's speedup over r=0 at the largest bucket: best of ``repeats`` interleaved rounds, so drift hits every
tier alike. A tier that merges nothing is 1.0 by definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.timing import time_call

from .runner import ModelRunner
from .tiers import Tier


@dataclass(frozen=True)
class WarmupReport:
    speedups: dict[str, float]  # tier -> speedup over r=0 at the largest bucket
    batch_seconds: dict[str, dict[int, float]]  # tier -> bucket -> seconds per batch
    graphs: int  # CUDA graphs captured


def warm_up(runner: ModelRunner, tiers: dict[str, Tier], repeats: int = 3) -> WarmupReport:
    """Call on the device's launch thread (inside its stream), before serving."""
    loaded = runner.loaded
    _, h, w = loaded.input_size
    generator = torch.Generator().manual_seed(0)
    inputs = {
        b: torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=generator).to(loaded.device)
        for b in runner.buckets
    }
    for tier in tiers.values():
        for b in runner.buckets:
            if runner.graphs is not None:
                runner.graphs.capture(tier.name, tier.r, b, h, w)
            runner.forward(inputs[b], tier)  # first run: allocations, kernels, autotuning
    batch_seconds = {
        name: {
            b: time_call(lambda t=tier, b=b: runner.forward(inputs[b], t), loaded.device)
            for b in runner.buckets
        }
        for name, tier in tiers.items()
    }
    x = inputs[runner.buckets[-1]]
    # the baseline runs the way an r=0 tier is served (its CUDA graph, if it has one)
    exact = [t for t in tiers.values() if not any(t.info.r_per_block)]
    baseline = exact[0] if exact else Tier("r=0", 0, loaded.model.schedule_info(0))
    merging = {n: t for n, t in tiers.items() if any(t.info.r_per_block)}
    best = {name: float("inf") for name in [*merging, ""]}  # "" is the r=0 baseline
    for _ in range(repeats):
        best[""] = min(best[""], time_call(lambda: runner.forward(x, baseline), loaded.device))
        for name, tier in merging.items():
            best[name] = min(best[name], time_call(lambda t=tier: runner.forward(x, t), loaded.device))
    speedups = {name: best[""] / best[name] if name in merging else 1.0 for name in tiers}
    graphs = runner.graphs.count if runner.graphs is not None else 0
    return WarmupReport(speedups, batch_seconds, graphs)
