"""The model call the batcher makes for one tier, and start-up warm-up / speedup measurement."""

from __future__ import annotations

import torch

from models.timing import time_call

from .batcher import RunBatch
from .model_loading import LoadedModel
from .tiers import Tier


def make_runner(loaded: LoadedModel, tier: Tier) -> RunBatch:
    """A function for the device thread: stack, move, run the patched model at ``tier.r``, softmax."""
    pin = loaded.device.type == "cuda"

    def run(tensors: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(tensors)
        if pin:
            x = x.pin_memory()
        x = x.to(device=loaded.device, dtype=loaded.dtype, non_blocking=pin)
        with torch.inference_mode():
            logits = loaded.model(x, r=tier.r)
        return logits.float().softmax(dim=-1).cpu()

    return run


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, plus ``max_batch_size`` itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size]
    return sorted(set([*sizes, max_batch_size]))


def _time_once(loaded: LoadedModel, x: torch.Tensor, r: object) -> float:
    with torch.inference_mode():
        return time_call(lambda: loaded.model(x, r=r), loaded.device)


def warm_up(loaded: LoadedModel, max_batch_size: int, repeats: int = 3) -> dict[str, float]:
    """Run every tier at every batch bucket once, then time each tier at the largest bucket.

    Returns each tier's speedup over r=0: best of ``repeats`` interleaved rounds (so drift hits all
    tiers alike); a tier that merges nothing is 1.0 by definition. Call it from the device thread.
    """
    _, h, w = loaded.input_size
    buckets = batch_buckets(max_batch_size)
    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 3, h, w, generator=generator) for b in buckets}
    inputs = {b: x.to(device=loaded.device, dtype=loaded.dtype) for b, x in inputs.items()}
    for tier in loaded.tiers.values():
        for b in buckets:
            _time_once(loaded, inputs[b], tier.r)
    x = inputs[buckets[-1]]
    merging = {n: t for n, t in loaded.tiers.items() if any(t.info.r_per_block)}
    best = {name: float("inf") for name in [*merging, ""]}  # "" is the r=0 baseline
    for _ in range(repeats):
        best[""] = min(best[""], _time_once(loaded, x, 0))
        for name, tier in merging.items():
            best[name] = min(best[name], _time_once(loaded, x, tier.r))
    return {name: best[""] / best[name] if name in merging else 1.0 for name in loaded.tiers}
