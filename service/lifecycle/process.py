"""What every child process of the service does first."""

from __future__ import annotations

import ctypes
import gc
import logging
import signal
import sys

PR_SET_PDEATHSIG = 1
LOG_FORMAT = "%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"
YOUNG_GC_THRESHOLD = 20_000


def configure_logging(role: str, level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT.format(role=role), force=True)


def configure_child(role: str, log_level: str) -> None:
    """Log with the role in each line; die with the supervisor; leave Ctrl-C to the supervisor.

    A terminal's Ctrl-C reaches the whole process group: only the supervisor acts on it (it drains
    every process in order). If the supervisor itself is killed, the kernel sends this process SIGTERM
    (Linux ``PR_SET_PDEATHSIG``), so no front-end keeps serving a port nobody supervises.
    """
    configure_logging(role, log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def settle_heap(young_threshold: int = YOUNG_GC_THRESHOLD) -> int:
    """Once a process is built (imports, app, model): move every object into the collector's permanent
    generation and let the youngest generation grow to ``young_threshold`` objects before a collection.
    Returns how many objects are now frozen.

    Serving makes almost no cyclic garbage (refcounting frees it), yet with CPython's defaults a front-end's
    collector ran ~58 young and ~0.5 full collections per second under the host-path load, each full one
    re-scanning start-up's ~76k objects: 0.059 ms of CPU per request (``gc.callbacks``, BENCHMARKS.md).
    A full collection of the engine's heap after loading ViT-Ti (~478k objects) took 221-231 ms with the
    GIL held; frozen, 0.002 ms.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
    return gc.get_freeze_count()
