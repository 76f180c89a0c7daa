"""Merging schedules: how many tokens each block merges (paper Sec. 4.1, Eq. 2-3)."""

from __future__ import annotations

from collections.abc import Sequence

RSpec = int | list[int] | tuple[int, float]
"""An ``r`` schedule: an int (constant), a per-block list, or ``(r, inflection)``; as the official
release, a tuple is always ``(r, inflection)`` and only a list is per block.

``(r, 0)`` is the constant schedule; ``(r, -1)`` the paper's decreasing schedule
(2r in the first block down to 0 in the last).
"""


def parse_r(num_blocks: int, r: RSpec) -> list[int]:
    """Expand an ``r`` spec into one requested ``r`` per block (before capping).

    A list shorter than the depth is padded with zeros, the way the official release does.
    """
    if isinstance(r, bool):
        raise TypeError("r must be an int, a list of ints or an (r, inflection) tuple, not a bool")
    if isinstance(r, list):
        if len(r) > num_blocks:
            raise ValueError(f"r schedule has {len(r)} entries but the model has {num_blocks} blocks")
        values = [int(v) for v in r] + [0] * (num_blocks - len(r))
    elif isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError("an r tuple must be (r, inflection)")
        values = _inflected(num_blocks, int(r[0]), float(r[1]))
    elif isinstance(r, int):
        values = [r] * num_blocks
    else:
        raise TypeError(f"unsupported r of type {type(r).__name__}")
    if any(v < 0 for v in values):
        raise ValueError(f"r must be non-negative, got {values}")
    return values


def _inflected(num_blocks: int, r: int, inflection: float) -> list[int]:
    """Linear schedule through r with the given inflection (official ToMe ``parse_r``)."""
    min_val = int(r * (1.0 - inflection))
    max_val = 2 * r - min_val
    if num_blocks == 1:
        return [r]
    step = (max_val - min_val) / (num_blocks - 1)
    return [int(min_val + step * i) for i in range(num_blocks)]


def token_schedule(num_tokens: int, protected: int, requested: Sequence[int]) -> tuple[list[int], list[int]]:
    """Apply the per-block cap (half the unprotected tokens) to a requested schedule.

    Returns ``(r_applied, tokens_after)``: what each block really merges and the token count after it.
    """
    applied: list[int] = []
    after: list[int] = []
    t = num_tokens
    for r in requested:
        r = max(0, min(r, (t - protected) // 2))
        t -= r
        applied.append(r)
        after.append(t)
    return applied, after
