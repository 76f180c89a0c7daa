"""Uncalibrated default tiers on the real ViT-Ti and the 200 shared photos: none may cost more than
6 top-1 points against r=0 (the former decreasing ``fastest`` tier, (16, -1), cost 29.5: 86.0% -> 56.5%)."""

from __future__ import annotations

from models import tome
from models.calibration import ImageSet, default_tier_schedules, unprotected_tokens
from models.calibration.measure import predict

MAX_TOP1_LOSS_POINTS = 6.0


def test_defaults_follow_depth_and_tokens() -> None:
    vit_b16 = default_tier_schedules(depth=12, unprotected_tokens=196)
    assert vit_b16 == {"exact": 0, "balanced": 8, "fast": 13, "fastest": 16}  # the paper's r=8, 13, 16
    vit_l16 = default_tier_schedules(depth=24, unprotected_tokens=196)
    assert vit_l16["fastest"] == 8  # the paper's largest ViT-L/16 r
    deeper = default_tier_schedules(depth=24, unprotected_tokens=576)
    assert deeper["fastest"] == 24 and deeper["balanced"] == 12


def test_no_default_tier_loses_more_than_six_top1_points(vit_tiny, photos: ImageSet, photo_pixels) -> None:
    tiers = default_tier_schedules(vit_tiny.depth, unprotected_tokens(vit_tiny))
    labels = photos.label_tensor()
    assert labels is not None
    correct = {}
    for name, r in tiers.items():
        top1 = predict(vit_tiny, photo_pixels, tome.parse_r(vit_tiny.depth, r), batch_size=20).argmax(-1)
        correct[name] = int((top1 == labels).sum())
    exact = correct["exact"]
    for name, count in correct.items():
        loss = 100 * (exact - count) / len(labels)
        assert loss <= MAX_TOP1_LOSS_POINTS, f"{name} ({tiers[name]}) loses {loss:.1f} top-1 points"
    speeds = [vit_tiny.schedule_info(r).gflops for r in tiers.values()]
    assert speeds == sorted(speeds, reverse=True) and speeds[-1] < 0.6 * speeds[0]  # tiers still differ
