"""Wall-clock timing of model calls that is correct on CUDA too."""

from __future__ import annotations

import time
from collections.abc import Callable

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
