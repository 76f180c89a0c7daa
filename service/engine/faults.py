"""Failures the engine must not survive: they end the engine process, the supervisor ends the service,
and the orchestrator starts a fresh one (readiness and liveness fail meanwhile: nothing hangs).

- a sticky device error (a CUDA error other than out-of-memory: the context is unusable afterwards, so
  every later batch would fail while the pod looked healthy);
- a batch that runs longer than ``batching.batch_timeout_s`` (a device call cannot be cancelled from
  Python, and everything queued behind it would wait forever);
- the batcher's loop ending while the engine is not shutting down.

An out-of-memory error fails only its batch (500 for those requests); the engine keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from itertools import count

import torch

log = logging.getLogger(__name__)

Fatal = Callable[[str], None]
"""Ends the engine: in the engine process, logs and exits; in tests, whatever the test needs."""

_CUDA_ERROR_MARKS = ("CUDA error", "CUDA driver error", "CUBLAS_STATUS", "cuDNN error", "NCCL error")


class FatalDeviceError(RuntimeError):
    """The device is in a state no later batch can trust."""


def is_fatal(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in _CUDA_ERROR_MARKS)


class Watchdog:
    """A thread that calls ``fatal`` when a batch has run longer than ``timeout_s``."""

    def __init__(self, timeout_s: float, fatal: Fatal) -> None:
        self.timeout_s = timeout_s
        self.fatal = fatal
        self._running: dict[int, tuple[float, str]] = {}
        self._ids = count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def begin(self, label: str) -> int:
        token = next(self._ids)
        with self._lock:
            self._running[token] = (time.monotonic(), label)
        return token

    def end(self, token: int) -> None:
        with self._lock:
            self._running.pop(token, None)

    def _watch(self) -> None:
        interval = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(interval):
            now = time.monotonic()
            with self._lock:
                stuck = [
                    (label, now - start)
                    for start, label in self._running.values()
                    if now - start > self.timeout_s
                ]
            if stuck:
                label, age = stuck[0]
                self.fatal(
                    f"batch {label} has run for {age:.0f} s (batching.batch_timeout_s = {self.timeout_s:g})"
                )
                return

    def stop(self) -> None:
        self._stop.set()
