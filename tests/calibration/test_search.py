"""The schedule search: staged runs equal full runs, fractions become schedules within the cap, the path."""

from __future__ import annotations

import timm
import torch

from models import tome
from models.calibration import SearchConfig, greedy_search
from models.calibration.search import _StagedModel, realize

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


def test_search_path_gets_cheaper(photo_pixels: torch.Tensor, vit_tiny) -> None:
    """(Determinism for a seed is checked through ``calibrate``, in test_calibrate_real.py.)"""
    path = greedy_search(vit_tiny, photo_pixels[: SMALL.max_images], SMALL)
    g0 = vit_tiny.schedule_info(0).gflops
    gflops = [step.gflops for step in path]
    assert gflops == sorted(gflops, reverse=True) and len(set(gflops)) == len(gflops)
    assert gflops[-1] <= SMALL.min_flop_fraction * g0 < gflops[0]
    for step in path:
        assert vit_tiny.schedule_info(list(step.r_per_block)).r_per_block == step.r_per_block
        assert vit_tiny.schedule_info(list(step.r_per_block)).gflops == step.gflops
    assert path[0].kl >= 0 and 0 <= path[-1].agreement <= 1
