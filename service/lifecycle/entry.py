"""Light entry points for the spawned processes.

``multiprocessing`` pickles a process's target by reference, so the parent imports the target's module.
These trampolines import the real entry point only in the child: the supervisor never imports torch
(the engine needs it; ~700 MB and 4 s that the supervisor would otherwise carry for nothing).
"""

from __future__ import annotations

from typing import Any


def engine(*args: Any) -> None:
    from .engine_process import engine_main

    engine_main(*args)
