"""ToMe on a model that has really learned: a tiny ViT trained here on scikit-learn's digits.

The paper's claim (Table 2): merging tokens keeps accuracy close to the unmerged model, and merging
clearly beats dropping the same number of tokens at random. No pretrained ViT can be downloaded here,
so the model is trained in the test session (plain timm model, no merging during training) and the
claims are checked on held-out digits. Run with ``-s`` to see the measured accuracies.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pytest
import torch

from models import tome
from tests.digits_model import (
    DigitsSplit,
    accuracy,
    build_vit,
    load_digits_split,
    random_drop_forward,
    train,
)

pytest.importorskip("sklearn")

EPOCHS = 8
R = 4  # constant r=4 over 4 blocks: 65 -> 49 tokens (16 of 64 patch tokens merged away)
DROP_SEEDS = range(5)

# Thresholds, with headroom over what was measured (torch 2.15, 1 thread): r=0 0.869, ToMe r=4 0.852,
# random drop of the same tokens per block 0.784 mean over 5 seeds. Deterministic, so headroom only
# absorbs differences between torch builds and CPUs.
MIN_ACC_R0 = 0.80  # chance is 0.10
MAX_TOME_LOSS = 0.03  # r=0 accuracy minus ToMe accuracy
MIN_GAIN_OVER_DROP = 0.04  # ToMe accuracy minus mean random-drop accuracy


@dataclass(frozen=True)
class Trained:
    model: tome.ToMeVisionTransformer
    data: DigitsSplit
    acc_r0: float
    acc_tome: float
    acc_drop: tuple[float, ...]


@pytest.fixture(scope="module")
def trained() -> Trained:
    # One thread: the same float reduction order on every machine (deterministic), and faster than
    # two for a model this small on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load_digits_split(seed=0)
        vit = build_vit(seed=0)
        train(vit, data, epochs=EPOCHS, seed=0)
        model = tome.patch(vit, prop_attn=True).eval()
        drops = model.schedule_info(R, img_size=8).r_per_block
        with torch.no_grad():
            acc_r0 = accuracy(model(data.x_test, r=0), data.y_test)
            acc_tome = accuracy(model(data.x_test, r=R), data.y_test)
            acc_drop = tuple(
                accuracy(
                    random_drop_forward(vit, data.x_test, drops, torch.Generator().manual_seed(s)),
                    data.y_test,
                )
                for s in DROP_SEEDS
            )
    finally:
        torch.set_num_threads(threads)
    print(
        f"\n[digits ViT, {len(data.y_test)} held-out] r=0: {acc_r0:.4f}  ToMe r={R}: {acc_tome:.4f}  "
        f"random drop {drops}: mean {statistics.mean(acc_drop):.4f} "
        f"(min {min(acc_drop):.4f}, max {max(acc_drop):.4f})"
    )
    return Trained(model, data, acc_r0, acc_tome, acc_drop)


def test_trained_model_is_accurate(trained: Trained) -> None:
    assert trained.acc_r0 >= MIN_ACC_R0


def test_tome_keeps_accuracy_close_to_r0(trained: Trained) -> None:
    assert trained.acc_r0 - trained.acc_tome <= MAX_TOME_LOSS


def test_tome_beats_random_drop(trained: Trained) -> None:
    mean_drop = statistics.mean(trained.acc_drop)
    assert trained.acc_tome - mean_drop >= MIN_GAIN_OVER_DROP
    assert trained.acc_tome > max(trained.acc_drop)  # not just on average: better than every draw


def test_random_drop_without_drops_is_timm_forward(trained: Trained) -> None:
    """The baseline's hand-written forward pass is timm's own when nothing is dropped."""
    vit, x = trained.model.vit, trained.data.x_test[:64]
    with torch.no_grad():
        expected = vit(x)
        got = random_drop_forward(vit, x, [0] * len(vit.blocks), torch.Generator().manual_seed(0))
        tome_r0 = trained.model(x, r=0)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(tome_r0, expected, rtol=1e-4, atol=1e-5)


def test_token_count_falls_as_scheduled(trained: Trained) -> None:
    model, x = trained.model, trained.data.x_test[:16]
    info = model.schedule_info(R, img_size=8)
    with torch.no_grad():
        trace = model.forward_with_source(x, R)
    assert info.tokens_in == 65
    assert info.tokens_after_block[-1] == trace.size.shape[1] < info.tokens_in
    assert info.tokens_after_block[-1] == info.tokens_in - sum(info.r_per_block) == 49
    # every input token is covered by exactly one final token, and sizes count them
    assert torch.equal(trace.source.sum(dim=1), torch.ones(16, info.tokens_in, dtype=torch.long))
    assert torch.equal(trace.size, trace.source.sum(dim=2))
