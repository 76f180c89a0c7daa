"""Run schedules on preprocessed images: top-1 predictions and interleaved speed against r=0."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from models import tome
from models.timing import interleaved_times

from .record import Speedup

Schedule = tuple[int, ...]


def device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def predict(
    model: tome.ToMeVisionTransformer, pixels: torch.Tensor, schedule: Schedule, batch_size: int
) -> torch.Tensor:
    """float32 logits ``[N, classes]`` on the CPU, from ``batch_size`` images at a time in the model dtype."""
    device, dtype = device_and_dtype(model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            x = pixels[start : start + batch_size].to(device=device, dtype=dtype)
            out.append(model(x, r=list(schedule)).float().cpu())
    return torch.cat(out)


@dataclass(frozen=True)
class Timing:
    speedup: Speedup
    images_per_s: float


def timing_batch(pixels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Exactly ``batch_size`` images (cycling through ``pixels`` if there are fewer)."""
    index = torch.arange(batch_size) % len(pixels)
    return pixels[index]


def time_schedules(
    model: tome.ToMeVisionTransformer,
    batch: torch.Tensor,
    schedules: Sequence[Schedule],
    rounds: int,
    warmup: int = 1,
    progress: bool = False,
) -> tuple[float, list[Timing]]:
    """r=0 images/s and each schedule's speedup over r=0, timed in interleaved rounds.

    Every round runs r=0 right before each schedule (``models.timing.interleaved_times``), so each
    speedup is a ratio of two back-to-back calls; the median over rounds is the figure, min and max
    show the spread the machine's noise left.
    """
    device, dtype = device_and_dtype(model)
    x = batch.to(device=device, dtype=dtype)
    zero = [0] * model.depth

    def call(schedule: Schedule):
        return lambda: model(x, r=list(schedule))

    fns = []
    for schedule in schedules:
        fns += [call(tuple(zero)), call(schedule)]
    bar = tqdm(total=rounds, desc="timing rounds", disable=not progress, leave=False)
    with bar, torch.inference_mode():
        times = interleaved_times(fns, device, warmup, rounds, on_round=lambda: bar.update(1))
    baseline = [t for i in range(0, len(fns), 2) for t in times[i]]
    results = []
    for i in range(len(schedules)):
        base, own = times[2 * i], times[2 * i + 1]
        ratios = [b / o for b, o in zip(base, own, strict=True)]
        speedup = Speedup(statistics.median(ratios), min(ratios), max(ratios))
        results.append(Timing(speedup, len(x) / statistics.median(own)))
    return len(x) / statistics.median(baseline), results
