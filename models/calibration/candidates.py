"""Candidate merging schedules: constant r, the paper's inflected schedules, and searched ones.

A candidate is identified by the per-block schedule it really applies (after ToMe's cap at half the
mergeable tokens), so specs that apply the same schedule are measured once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from models import tome

Kind = Literal["constant", "inflected", "searched"]
KINDS: tuple[Kind, ...] = ("constant", "inflected", "searched")
DEFAULT_INFLECTIONS = (-1.0, -0.5, 0.5)


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: Kind
    r_per_block: tuple[int, ...]  # applied (capped) merges per block

    @property
    def is_exact(self) -> bool:
        return not any(self.r_per_block)


def applied(model: tome.ToMeVisionTransformer, r: tome.RSpec) -> tuple[int, ...]:
    return model.schedule_info(r).r_per_block


def constant(model: tome.ToMeVisionTransformer, r: int) -> Candidate:
    return Candidate(f"r{r}", "constant", applied(model, r))


def inflected(model: tome.ToMeVisionTransformer, r: int, inflection: float) -> Candidate:
    """``r{r}:{inflection}``: the name parses with ``models.bench.parse_schedule``."""
    return Candidate(f"r{r}:{inflection:g}", "inflected", applied(model, (r, inflection)))


def unprotected_tokens(model: tome.ToMeVisionTransformer) -> int:
    """N: tokens entering the first block that may merge (all but class/distillation/register tokens)."""
    return model.schedule_info(0).tokens_in - model.num_prefix_tokens


def per_block_r(model: tome.ToMeVisionTransformer) -> float:
    """N/L: mergeable input tokens per block (ViT-*/16 at 224 px, 12 blocks: 196/12 = 16.3)."""
    return unprotected_tokens(model) / model.depth


def default_constant_rs(model: tome.ToMeVisionTransformer, step: int = 2) -> list[int]:
    """0, step, 2*step, ... up to 1.25 N/L: from exact to past the paper's largest r (about N/L)."""
    top = round(1.25 * per_block_r(model))
    return list(range(0, top + 1, step))


def default_candidates(
    model: tome.ToMeVisionTransformer,
    constant_rs: Sequence[int] | None = None,
    inflections: Sequence[float] = DEFAULT_INFLECTIONS,
) -> list[Candidate]:
    """Constant r over a useful range, and inflected schedules at r = 0.5, 0.8, 1.0 and 1.25 N/L (the
    deepest reach ~2.7x on ViT-Ti: a floor for ``tier=auto`` under 2x overload)."""
    rs = default_constant_rs(model) if constant_rs is None else list(constant_rs)
    if 0 not in rs:
        rs = [0, *rs]
    found = [constant(model, r) for r in rs]
    n_per_l = per_block_r(model)
    for fraction in (0.5, 0.8, 1.0, 1.25):
        found += [inflected(model, round(fraction * n_per_l), i) for i in inflections]
    return dedupe(found)


def dedupe(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The first candidate of every distinct applied schedule, in order."""
    seen: set[tuple[int, ...]] = set()
    kept = []
    for c in candidates:
        if c.r_per_block not in seen:
            seen.add(c.r_per_block)
            kept.append(c)
    return kept
