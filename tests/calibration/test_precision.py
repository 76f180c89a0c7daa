"""Float32 similarity and merging inside a bf16/fp16 ToMe model (models/tome/merge.py, ``float32_merge``)."""

from __future__ import annotations

import pytest
import timm
import torch

from models import tome
from models.tome.merge import bipartite_soft_matching, merge_wavg


def _vit(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4)
    return vit.eval().to(dtype)


@pytest.mark.parametrize("r", [3, (6, -1), [0, 9, 2, 5]], ids=str)
def test_float32_merge_changes_nothing_in_a_float32_model(r) -> None:
    vit = _vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        on = tome.patch(vit, float32_merge=True)(x, r=r)
        off = tome.patch(vit, float32_merge=False)(x, r=r)
    assert torch.equal(on, off)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scores_are_computed_from_the_float32_metric(dtype: torch.dtype) -> None:
    metric = torch.randn(8, 197, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    low = bipartite_soft_matching(metric, 60, protected=1)
    high = bipartite_soft_matching(metric.float(), 60, protected=1)
    native = bipartite_soft_matching(metric, 60, protected=1, compute_dtype=None)
    assert low is not None and high is not None and native is not None
    for field in ("unmerged_idx", "src_idx", "dst_idx"):
        assert torch.equal(getattr(low, field), getattr(high, field))
    differs = any(not torch.equal(getattr(native, f), getattr(high, f)) for f in ("src_idx", "dst_idx"))
    assert differs, "low-precision scores should pick some other pairs here (else the test shows nothing)"


def test_fp16_weighted_merge_does_not_overflow() -> None:
    """A token of size 8 holding 12000 (well inside fp16) merges into another: x * size = 96000 > 65504."""
    x = torch.full((1, 3, 2), 12000.0, dtype=torch.float16)
    size = torch.tensor([[[1.0], [8.0], [8.0]]])
    matching = bipartite_soft_matching(torch.randn(1, 3, 4), 1, protected=1)
    assert matching is not None
    merged, new_size = merge_wavg(matching, x, size)
    assert merged.dtype == torch.float16 and torch.equal(merged, torch.full((1, 2, 2), 12000.0).half())
    assert new_size[0, -1, 0] == 16
    native, _ = merge_wavg(matching, x, size, compute_dtype=None)
    assert not torch.isfinite(native).all()  # the overflow the float32 merge avoids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_model_keeps_its_dtype_with_float32_merge(dtype: torch.dtype) -> None:
    model = tome.patch(_vit(dtype), float32_merge=True)
    with torch.inference_mode():
        trace = model.forward_with_source(torch.randn(2, 3, 64, 64).to(dtype), r=(8, -1))
    assert trace.logits.dtype == dtype and torch.isfinite(trace.logits).all()
    assert trace.size.sum(dim=1).eq(65).all()
