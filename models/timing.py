"""Wall-clock timing of model calls that is correct on CUDA too."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, with the device synchronised before and after (CUDA runs async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_times(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    warmup: int,
    rounds: int,
    on_round: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Seconds per call of every ``fns[i]``, timed in interleaved rounds: ``result[i][round]``.

    Each round calls every function once, in order, so drift in the machine's speed (other processes,
    clocks, heat) hits every function alike; compare functions through per-round ratios or medians.
    ``warmup`` untimed calls of each function come first. ``on_round`` is called after every round.
    """
    for fn in fns:
        for _ in range(warmup):
            time_call(fn, device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(time_call(fn, device))
        if on_round is not None:
            on_round()
    return times
