"""The schedule search: staged runs equal full runs, fractions become schedules within the cap, the path."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from models import tome
from models.calibration import SearchConfig, SearchStep, greedy_search
from models.calibration.search import _StagedModel, better_than, realize

SMALL = SearchConfig(flop_step=0.05, max_extra=8, min_flop_fraction=0.9, max_images=6, refresh_every=2)


def _small_model() -> tome.ToMeVisionTransformer:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=5)
    return tome.patch(vit.eval())


def test_staged_runs_equal_full_runs() -> None:
    model = _small_model()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    staged = _StagedModel(model, x)
    first = [3, 0, 5, 2, 1]
    logits, state = staged.run(first, 0, None)
    changed = [3, 0, 9, 4, 1]  # differs from block 2 on: restart from block 2's cached input
    again, _ = staged.run(changed, 2, state)
    with torch.inference_mode():
        assert torch.equal(logits, model(x, r=first))
        assert torch.equal(again, model(x, r=changed))


def test_realize_merges_fractions_of_the_remaining_tokens() -> None:
    model = _small_model()  # 64 patches + class token
    schedule = realize(model, [16, 0, 32, 32, 8], denominator=64)
    assert schedule == (16, 0, 24, 12, 1)  # 64*16/64, -, 48*32/64, 24*32/64, 12*8/64 -> 1
    assert schedule == model.schedule_info(list(schedule)).r_per_block  # within the cap


@pytest.fixture(scope="module")
def small_path(photo_pixels: torch.Tensor, vit_tiny) -> list[SearchStep]:
    return greedy_search(vit_tiny, photo_pixels[: SMALL.max_images], SMALL)


def test_search_path_gets_cheaper(small_path: list[SearchStep], vit_tiny) -> None:
    """(Determinism for a seed is checked through ``calibrate``, in test_calibrate_real.py.)"""
    path = small_path
    g0 = vit_tiny.schedule_info(0).gflops
    gflops = [step.gflops for step in path]
    assert gflops == sorted(gflops, reverse=True) and len(set(gflops)) == len(gflops)
    assert gflops[-1] <= SMALL.min_flop_fraction * g0 < gflops[0]
    for step in path:
        assert vit_tiny.schedule_info(list(step.r_per_block)).r_per_block == step.r_per_block
        assert vit_tiny.schedule_info(list(step.r_per_block)).gflops == step.gflops
    assert path[0].kl >= 0 and 0 <= path[-1].agreement <= 1


def test_searched_steps_are_kept_only_where_they_beat_their_target(
    small_path: list[SearchStep], photo_pixels: torch.Tensor, vit_tiny
) -> None:
    pixels = photo_pixels[: SMALL.max_images]
    targets = [vit_tiny.schedule_info(r).r_per_block for r in (1, 2, 3)]
    kept = better_than(vit_tiny, pixels, small_path, targets, SMALL)
    with torch.inference_mode():
        log_p0 = F.log_softmax(vit_tiny(pixels, r=0), dim=-1)
        for target, step in zip(targets, kept, strict=True):
            logits = vit_tiny(pixels, r=list(target))
            kl = F.kl_div(
                F.log_softmax(logits, dim=-1), log_p0, log_target=True, reduction="batchmean"
            ).item()
            cheaper = [s for s in small_path if s.gflops <= vit_tiny.schedule_info(list(target)).gflops]
            if step is None:
                assert not cheaper or cheaper[0].kl >= kl - 1e-6
            else:
                assert step == cheaper[0] and step.kl < kl + 1e-6
