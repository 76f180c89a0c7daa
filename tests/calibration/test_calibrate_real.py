"""Calibrate the real ViT-Ti on half the shared photos; check the file against a recomputation, budgets
on the calibration images, and the promise on the other half. Speed figures are not asserted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from models import tome
from models.calibration import (
    Calibration,
    ImageSet,
    Rate,
    SearchConfig,
    calibrate,
    constant,
    inflected,
    resolve,
    resolve_tiers,
    weights_sha256,
)
from tests.shared_data import VIT_TINY_ARCH, VIT_TINY_WEIGHTS

SPECS: dict[str, tome.RSpec] = {"r0": 0, "r4": 4, "r8": 8, "r13": 13, "r16:-1": (16, -1.0)}
BATCH = 10


@pytest.fixture(scope="module")
def halves(photos: ImageSet) -> tuple[ImageSet, ImageSet]:
    """100 photos to calibrate on, the other 100 to check the promise on."""
    return photos.split(100, seed=7)


@pytest.fixture(scope="module")
def calibration(vit_tiny, halves, tmp_path_factory: pytest.TempPathFactory) -> Calibration:
    candidates = [constant(vit_tiny, r) for r in (0, 4, 8, 13)] + [inflected(vit_tiny, 16, -1)]
    cal = calibrate(
        vit_tiny,
        halves[0],
        architecture=VIT_TINY_ARCH,
        weights_sha256=weights_sha256(VIT_TINY_WEIGHTS),
        batch_size=BATCH,
        candidates=candidates,
        timing_rounds=1,
        progress=False,
    )
    path = tmp_path_factory.mktemp("calibration") / "vit_tiny.json"
    cal.save(path)
    return Calibration.load(path)


def _recompute(vit_tiny, images: ImageSet, specs: dict[str, tome.RSpec]) -> dict[str, tuple[int, int]]:
    """(agreement count, correct count) per schedule, straight from the model: own preprocessing, own
    labels from the file names, the schedule as an r spec rather than the file's per-block list."""
    transform = create_transform(**resolve_data_config({}, model=vit_tiny.vit), is_training=False)
    x = torch.stack([transform(Image.open(images.root / f).convert("RGB")) for f in images.files])
    synsets = ImageNetInfo().label_names()
    labels = torch.tensor([synsets.index(f.split("_")[0]) for f in images.files])
    with torch.inference_mode():
        top1 = {
            name: torch.cat([vit_tiny(x[i : i + BATCH], r=r) for i in range(0, len(x), BATCH)]).argmax(-1)
            for name, r in specs.items()
        }
    return {name: (int((t == top1["r0"]).sum()), int((t == labels).sum())) for name, t in top1.items()}


@pytest.fixture(scope="module")
def recomputed(vit_tiny, halves) -> dict[str, tuple[int, int]]:
    return _recompute(vit_tiny, halves[0], SPECS)


def test_file_matches_an_independent_recomputation(calibration, recomputed, vit_tiny, halves) -> None:
    assert calibration.model.architecture == VIT_TINY_ARCH
    assert calibration.model.weights_sha256 == hashlib.sha256(VIT_TINY_WEIGHTS.read_bytes()).hexdigest()
    assert calibration.model.input_size == (3, 224, 224) and calibration.model.num_classes == 1000
    assert (calibration.run.dtype, calibration.run.batch_size, calibration.run.device_type) == (
        "float32",
        BATCH,
        "cpu",
    )
    assert calibration.images.count == 100 and calibration.images.labels
    assert calibration.images.sha256 == halves[0].sha256() and calibration.images.search_count == 0
    assert [s.name for s in calibration.schedules] == list(SPECS)
    for name, spec in SPECS.items():
        record = calibration.get(name)
        info = vit_tiny.schedule_info(spec)
        agree, correct = recomputed[name]
        assert record.r_per_block == info.r_per_block and record.gflops == info.gflops
        assert record.tokens_final == info.tokens_after_block[-1]
        exact = not any(record.r_per_block)  # the reference: no sampling interval
        assert record.agreement == (Rate(100, 100, 1.0, 1.0, 1.0) if exact else Rate.measure(agree, 100))
        assert record.accuracy == Rate.measure(correct, 100)
        assert record.speedup.min <= record.speedup.median <= record.speedup.max and record.images_per_s > 0
    assert calibration.get("r0").agreement.rate == 1.0
    assert calibration.get("r16:-1").agreement.rate < calibration.get("r4").agreement.rate  # merging costs


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.1, 0.3, 0.6])
def test_budget_is_met_on_the_calibration_images(calibration, recomputed, budget: float) -> None:
    chosen = resolve(calibration, max_agreement_loss=budget)
    agree, _ = recomputed[chosen.name]
    assert chosen.is_exact or 1 - Rate.measure(agree, 100).ci_low <= budget
    faster = [s for s in calibration.schedules if s.speedup.median > chosen.speedup.median]
    assert all(1 - s.agreement.ci_low > budget for s in faster)  # and it is the fastest that does


def test_promise_holds_on_the_other_half(calibration, vit_tiny, halves) -> None:
    """Each schedule's promise is "agreement >= its interval's lower end" (what budgets resolve on):
    it must hold on the 100 photos the calibration did not see."""
    held_out = _recompute(vit_tiny, halves[1], SPECS)
    for record in calibration.schedules:
        agree, _ = held_out[record.name]
        assert agree / 100 >= record.agreement.ci_low, f"{record.name} broke its promise: {agree}/100"
    tiers = resolve_tiers(calibration)
    assert tiers["exact"].is_exact and all(t.name in SPECS for t in tiers.values())


def test_searched_schedules_are_deterministic_for_a_seed(vit_tiny, photos: ImageSet, tmp_path: Path) -> None:
    images = photos.subset(range(0, 200, 10))  # 20 photos: 6 to search on, 14 to measure
    config = SearchConfig(flop_step=0.05, min_flop_fraction=0.92, max_images=6, refresh_every=2)
    candidates = [constant(vit_tiny, r) for r in (0, 2, 4)]

    def run(seed: int) -> Calibration:
        return calibrate(
            vit_tiny,
            images,
            architecture=VIT_TINY_ARCH,
            weights_sha256=None,
            batch_size=6,
            candidates=candidates,
            search=config,
            search_count=6,
            seed=seed,
            timing_rounds=1,
            progress=False,
        )

    first, again = run(seed=3), run(seed=3)
    searched = [(s.name, s.r_per_block) for s in first.schedules if s.kind == "searched"]
    assert searched and searched == [(s.name, s.r_per_block) for s in again.schedules if s.kind == "searched"]
    assert first.notes["search"]["path"] == again.notes["search"]["path"]
    assert first.images.count == 14 and first.images.search_count == 6
    assert first.images.search_sha256 == again.images.search_sha256 != first.images.sha256
