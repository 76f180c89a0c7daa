"""Search per-block merging schedules on calibration images: greedy, FLOP-budgeted, KL-guided.

A schedule is searched as the *fraction* of its mergeable tokens each block merges (in 1/``units``
steps), not as a token count: once early blocks merge, later blocks see fewer tokens, and a count
chosen earlier would then merge a much larger share of them (a search over counts piled 40-60 merges
into single late blocks and lost to constant r at high speedups; over fractions it did not).

Starting from r=0, every step tries raising each block's fraction (by as many units as make the model
about ``flop_step`` of r=0's GFLOPs cheaper, at most ``max_extra``), and keeps the block whose raise
costs the least divergence from r=0 per GFLOP saved. The divergence is the mean KL(p_r0 || p_schedule)
of the softmax outputs: smooth where top-1 agreement on a few dozen images is mostly flat, and zero
only when the outputs match. The path of kept schedules spans speeds from r=0 to ``min_flop_fraction``.

Each try changes one block, so the blocks before it run as they did for the current schedule: their
outputs are cached and every try restarts from the changed block (about half the work of a full run).
Deterministic: no randomness, ties go to the earlier block.

``better_than`` picks, for a plain schedule (e.g. constant r), the path step at most as costly, and
keeps it only if it diverges less than that schedule on the search images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import tome

from .measure import Schedule, device_and_dtype


@dataclass(frozen=True)
class SearchConfig:
    flop_step: float = 0.03  # GFLOPs a step aims to remove, as a fraction of r=0's
    max_extra: int = 8  # most units a step adds to one block's fraction
    units: int = 64  # a block merges u/units of its mergeable tokens, u <= units/2 (ToMe's cap)
    min_flop_fraction: float = 0.45  # stop once a schedule is this cheap (fraction of r=0's GFLOPs)
    max_images: int = 64  # search images used (the first ones of the search set)
    refresh_every: int = 4  # every this many steps, re-score every block (lazy scoring in between)


@dataclass(frozen=True)
class SearchStep:
    r_per_block: Schedule
    gflops: float
    kl: float  # mean KL(p_r0 || p) on the search images
    agreement: float  # top-1 agreement with r=0 on the search images


BlockInputs = list[tuple[torch.Tensor, torch.Tensor | None]]
"""What enters each block under one schedule: ``inputs[b]`` = (tokens, sizes) entering block ``b``."""


class _StagedModel:
    """Runs a patched ViT block by block, restarting from a cached block input.

    Uses the patch's per-block step (``ToMeVisionTransformer._block_forward``) and head; the search
    tests check that a staged run equals ``model(x, r=...)`` exactly.
    """

    def __init__(self, model: tome.ToMeVisionTransformer, pixels: torch.Tensor) -> None:
        self.model = model
        vit = model.vit
        device, dtype = device_and_dtype(model)
        with torch.inference_mode():
            x = pixels.to(device=device, dtype=dtype)
            self.stem = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))

    def run(
        self, schedule: Sequence[int], start: int, cached: BlockInputs | None
    ) -> tuple[torch.Tensor, BlockInputs]:
        """Logits (float32) of ``schedule`` and its block inputs, reusing ``cached`` up to block ``start``
        (``cached`` must come from a schedule equal to this one before ``start``)."""
        model = self.model
        if cached is None or start == 0:
            x, size, inputs = self.stem, None, []
        else:
            x, size = cached[start]
            inputs = cached[:start]
        with torch.inference_mode():
            for b in range(start, model.depth):
                inputs.append((x, size))
                x, size, _ = model._block_forward(model.vit.blocks[b], x, size, None, schedule[b])
            logits = model._head(model.vit.norm(x), size).float()
        return logits, inputs


def _kl_from(reference: torch.Tensor):
    log_p0 = F.log_softmax(reference.float(), dim=-1)

    def kl(logits: torch.Tensor) -> float:
        return F.kl_div(F.log_softmax(logits, dim=-1), log_p0, log_target=True, reduction="batchmean").item()

    return kl


def realize(model: tome.ToMeVisionTransformer, units: Sequence[int], denominator: int) -> Schedule:
    """Fraction space -> merges per block: block b merges units[b]/denominator of its mergeable tokens."""
    tokens = model.schedule_info(0).tokens_in
    requested = []
    for u in units:
        r = (tokens - model.num_prefix_tokens) * u // denominator
        requested.append(r)
        tokens -= min(r, (tokens - model.num_prefix_tokens) // 2)
    return model.schedule_info(requested).r_per_block


def _move(
    model: tome.ToMeVisionTransformer, point: Schedule, block: int, gflops: float, config: SearchConfig
) -> tuple[Schedule, Schedule, float] | None:
    """``point`` (units per block) with the fewest units added to ``block`` (at most ``max_extra``) that
    make the model ``flop_step`` of r=0's GFLOPs cheaper, or as many as the cap and ``max_extra`` allow:
    (point, schedule, GFLOPs). None when the block cannot merge more."""
    drop = config.flop_step * model.schedule_info(0).gflops
    best = None
    for extra in range(1, config.max_extra + 1):
        moved = list(point)
        moved[block] += extra
        if 2 * moved[block] > config.units:
            break
        schedule = realize(model, moved, config.units)
        g = model.schedule_info(list(schedule)).gflops
        if g >= gflops:
            continue  # too small a raise to merge one more token yet
        best = (tuple(moved), schedule, g)
        if gflops - g >= drop:
            break
    return best


def greedy_search(
    model: tome.ToMeVisionTransformer,
    pixels: torch.Tensor,
    config: SearchConfig = SearchConfig(),
    progress: bool = False,
) -> list[SearchStep]:
    """The greedy path from r=0 down to ``config.min_flop_fraction`` of r=0's GFLOPs (r=0 excluded).

    Lazy scoring: blocks are tried in order of their last score (divergence per GFLOP saved), and a step
    stops trying once the best fresh score beats every remaining block's last score, which holds as long
    as a block's cost per GFLOP only grows as the model merges more (every ``refresh_every`` steps all
    blocks are re-scored, in case it did not).
    """
    pixels = pixels[: config.max_images]
    staged = _StagedModel(model, pixels)
    zero: Schedule = (0,) * model.depth
    reference, state = staged.run(zero, 0, None)
    kl = _kl_from(reference)
    top1_ref = reference.argmax(dim=-1)
    g0 = model.schedule_info(0).gflops
    point, current, current_g, current_kl = zero, zero, g0, 0.0
    last_score: dict[int, float] = {}
    path: list[SearchStep] = []
    total = round(g0 * (1 - config.min_flop_fraction), 4)
    bar = tqdm(total=total, desc="schedule search (GFLOPs removed)", disable=not progress, leave=False)
    with bar:
        while current_g > config.min_flop_fraction * g0:
            refresh = len(path) % config.refresh_every == 0
            order = sorted(range(model.depth), key=lambda b: (last_score.get(b, -math.inf), b))
            best = None
            for block in order:
                if not refresh and best is not None and last_score.get(block, -math.inf) >= best[0]:
                    break
                move = _move(model, point, block, current_g, config)
                if move is None:
                    last_score[block] = math.inf
                    continue
                moved, schedule, g = move
                logits, inputs = staged.run(schedule, block, state)
                divergence = kl(logits)
                score = (divergence - current_kl) / (current_g - g)
                last_score[block] = score
                if best is None or score < best[0]:
                    best = (score, moved, schedule, g, divergence, logits, inputs)
            if best is None:
                break
            _, point, current, g, current_kl, logits, state = best
            bar.update(round(current_g - g, 4))
            current_g = g
            agreement = (logits.argmax(dim=-1) == top1_ref).float().mean().item()
            path.append(SearchStep(current, current_g, current_kl, agreement))
    return path


def divergences(
    model: tome.ToMeVisionTransformer,
    pixels: torch.Tensor,
    schedules: Sequence[Schedule],
    config: SearchConfig,
) -> list[float]:
    """Mean KL(p_r0 || p) of each schedule on the search images (the search's own objective)."""
    staged = _StagedModel(model, pixels[: config.max_images])
    reference, _ = staged.run((0,) * model.depth, 0, None)
    kl = _kl_from(reference)
    return [kl(staged.run(schedule, 0, None)[0]) for schedule in schedules]


def better_than(
    model: tome.ToMeVisionTransformer,
    pixels: torch.Tensor,
    path: Sequence[SearchStep],
    targets: Sequence[Schedule],
    config: SearchConfig,
) -> list[SearchStep | None]:
    """For each target schedule, the least-merging path step at most as costly in GFLOPs, if it diverges
    less from r=0 than the target on the search images; else None (the target is the better schedule).

    The greedy path can lose to a plain schedule where it committed early to merges that later hurt;
    this keeps the search from proposing a schedule its own images say is worse than the one it matches.
    """
    steps = [_matched_to(path, model.schedule_info(list(t)).gflops) for t in targets]
    matched = [t for t, step in zip(targets, steps, strict=True) if step is not None]
    target_kl = iter(divergences(model, pixels, matched, config))
    return [step if step is not None and step.kl < next(target_kl) else None for step in steps]


def _matched_to(path: Sequence[SearchStep], gflops: float) -> SearchStep | None:
    """The first (least merging) path step at least as cheap as ``gflops``, or None."""
    return next((step for step in path if step.gflops <= gflops * (1 + 1e-9)), None)
