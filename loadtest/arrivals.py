"""When an open-loop generator sends: arrival offsets (seconds from the start) fixed before the run.

An open loop sends on a schedule that does not depend on the answers, so a slow server cannot slow the
offered load down (a closed loop would, and would then under-report latency: coordinated omission).
The schedule can be split over several generator processes: each takes its share, and the union is the
schedule one process would have followed (constant) or a Poisson process of the full rate (poisson).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

ARRIVALS = ("constant", "poisson")


def arrival_offsets(
    rate: float, seconds: float, kind: str = "constant", seed: int = 0, part: int = 0, parts: int = 1
) -> Iterator[float]:
    """Offsets in [0, seconds) of the arrivals of generator ``part`` of ``parts`` at a total ``rate``/s.

    constant: arrival k of the whole schedule is at k / rate; part p takes k = p, p + parts, ...
    poisson: exponential gaps at rate / parts per part, each part seeded apart (a sum of independent
    Poisson processes is a Poisson process of the summed rate).
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if not 0 <= part < parts:
        raise ValueError(f"part {part} is not in [0, {parts})")
    if kind == "constant":
        k = part
        while (t := k / rate) < seconds:
            yield t
            k += parts
    elif kind == "poisson":
        rng = random.Random(f"{seed}/{part}")
        t = rng.expovariate(rate / parts)
        while t < seconds:
            yield t
            t += rng.expovariate(rate / parts)
    else:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {kind!r}")
