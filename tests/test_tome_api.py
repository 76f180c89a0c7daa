"""Schedules, cost model, source tracking, thread safety and refusals of the ToMe patch."""

from __future__ import annotations

import threading

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock
from torch.utils.flop_counter import FlopCounterMode

from models import tome


def _vit(**kwargs):
    torch.manual_seed(0)
    defaults = dict(pretrained=False, img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=4)
    return timm.create_model("vit_tiny_patch16_224", **{**defaults, **kwargs}).eval()


# --- schedules -----------------------------------------------------------------------------------


def test_parse_r_forms() -> None:
    assert tome.parse_r(4, 3) == [3, 3, 3, 3]
    assert tome.parse_r(4, [1, 2]) == [1, 2, 0, 0]
    assert tome.parse_r(12, (16, 0)) == [16] * 12
    decreasing = tome.parse_r(12, (16, -1))
    assert decreasing[0] == 32 and decreasing[-1] == 0
    assert decreasing == sorted(decreasing, reverse=True)
    assert sum(decreasing) == pytest.approx(16 * 12, abs=12)  # removes about rL tokens


@pytest.mark.parametrize("bad", [[1] * 5, -1, [2, -1], True, "13", (1, 2, 3)])
def test_parse_r_rejects(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        tome.parse_r(4, bad)


def test_r_is_capped_at_half_the_mergeable_tokens() -> None:
    applied, after = tome.token_schedule(num_tokens=17, protected=1, requested=[100, 100, 100, 100])
    assert applied == [8, 4, 2, 1]
    assert after == [9, 5, 3, 2]
    applied, _ = tome.token_schedule(num_tokens=16, protected=0, requested=[3])
    assert applied == [3]


def _explicit_attention(calls: list[tuple[int, ...]]):
    """``scaled_dot_product_attention`` written as two matmuls, recording each call's q/k shapes.

    FlopCounterMode counts matmuls on every torch release, while whether it counts the fused SDPA op
    depends on the release and backend (torch 2.14.1 skips the CPU kernel). Running the counted pass
    through this keeps the check a real count of the run on any torch the lock moves to.
    """

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert dropout_p == 0.0 and not is_causal and not enable_gqa
        calls.append((*q.shape, k.shape[-2]))
        logits = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            logits = logits + attn_mask
        return logits.softmax(dim=-1) @ v

    return sdpa


@pytest.mark.parametrize("r", [0, 3, (5, -1), [9, 9, 9]])
@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 3}, {"class_token": False, "global_pool": "avg"}])
def test_schedule_info_matches_the_run(r, kwargs, monkeypatch: pytest.MonkeyPatch) -> None:
    vit = _vit(**kwargs)
    model = tome.patch(vit)
    info = model.schedule_info(r)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trace = model.forward_with_source(x, r=r)
        fused = model(x, r=r)
        calls: list[tuple[int, ...]] = []
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _explicit_attention(calls))
        flops = FlopCounterMode(display=False)
        with flops:
            explicit = model(x, r=r)
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)  # the counted run is the same run
    assert trace.size.shape[1] == info.tokens_after_block[-1]
    assert info.tokens_in == 64 + vit.num_prefix_tokens
    tokens_entering = [info.tokens_in, *info.tokens_after_block[:-1]]
    assert [(b, n, n_k) for b, _, n, _, n_k in calls] == [(2, t, t) for t in tokens_entering]
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate; our GFLOPs are MACs (paper convention).
    assert info.gflops * 1e9 == pytest.approx(flops.get_total_flops() / 2 / x.shape[0], rel=1e-9)


def test_schedule_info_vit_small_flop_reduction() -> None:
    """The issue's figure: ViT-S/16 at r=13 falls 1.70x in FLOPs (4.6 GFLOPs stock)."""
    model = tome.patch(timm.create_model("vit_small_patch16_224", pretrained=False))
    stock, merged = model.schedule_info(0), model.schedule_info(13)
    assert stock.gflops == pytest.approx(4.6, abs=0.01)
    assert stock.gflops / merged.gflops == pytest.approx(1.70, abs=0.01)
    assert merged.tokens_after_block[-1] == 197 - 12 * 13


def test_schedule_info_rejects_other_sizes_without_dynamic_img_size() -> None:
    with pytest.raises(ValueError, match="dynamic_img_size"):
        tome.patch(_vit()).schedule_info(4, img_size=96)


# --- source tracking -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4}, {"class_token": False, "global_pool": "avg"}])
def test_source_tracking_partitions_the_input(kwargs) -> None:
    vit = _vit(**kwargs)
    model = tome.patch(vit)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        trace = model.forward_with_source(x, r=4)
        torch.testing.assert_close(trace.logits, model(x, r=4), atol=0, rtol=0)
    prefix = vit.num_prefix_tokens
    assert trace.source.sum(dim=1).eq(1).all(), "every input token is covered exactly once"
    assert torch.equal(trace.size, trace.source.sum(dim=-1))
    assert trace.size.sum(dim=1).eq(64 + prefix).all()
    identity = torch.eye(prefix, dtype=torch.bool).expand(3, -1, -1)
    assert torch.equal(trace.source[:, :prefix, :prefix], identity)
    assert trace.size.max() > 1, "something merged"
    owner = trace.patch_owner()
    assert owner.shape == (3, 64)
    assert owner.min() >= prefix  # patches never end up in a protected token


def test_source_without_merging_is_identity() -> None:
    model = tome.patch(_vit())
    trace = model.forward_with_source(torch.randn(1, 3, 64, 64), r=0)
    assert torch.equal(trace.source[0], torch.eye(65, dtype=torch.bool))
    assert trace.size.eq(1).all()


# --- reduced precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_reduced_precision_runs_in_that_dtype_and_tracks_float32(dtype: torch.dtype, prop_attn: bool) -> None:
    """The service runs fp16/bf16 on CUDA. Token sizes stay float32 (exact counts: bf16 holds integers
    only up to 256), so every merge and bias must cast back to the model's dtype, or activations silently
    turn float32. Checked on CPU, which runs both dtypes."""
    vit = _vit(depth=4)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = tome.patch(vit, prop_attn=prop_attn)
    with torch.inference_mode():
        expected = reference(x, r=6)
        low = tome.patch(_vit(depth=4).to(dtype), prop_attn=prop_attn)(x.to(dtype), r=6)
    assert low.dtype == dtype and torch.isfinite(low).all()
    scale = expected.abs().max().item()
    assert (low.float() - expected).abs().max().item() < 0.05 * scale


def test_float32_merge_never_lowers_a_float64_model() -> None:
    """``float32_merge`` raises bf16/fp16 to float32; in a float64 model it must not round the
    similarity and the weighted average down to float32 (it gave 3e-8 instead of 4e-16 here)."""
    vit = _vit(depth=4).double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        default = tome.patch(vit)(x, r=5)
        native = tome.patch(vit, float32_merge=False)(x, r=5)
    assert default.dtype == torch.float64
    torch.testing.assert_close(default, native, atol=1e-12, rtol=0)


# --- thread safety ---------------------------------------------------------------------------------


def test_concurrent_calls_with_different_r_equal_sequential_calls() -> None:
    model = tome.patch(_vit())
    x = torch.randn(4, 3, 64, 64)
    schedules = [0, 2, 4, (6, -1), [8, 0, 8]]
    with torch.no_grad():
        expected = {str(r): model(x, r=r) for r in schedules}
    results: dict[tuple[int, str], torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(thread_id: int) -> None:
        try:
            with torch.no_grad():
                for round_ in range(6):
                    r = schedules[(thread_id + round_) % len(schedules)]
                    results[(thread_id * 10 + round_, str(r))] = model(x, r=r)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 30
    for (_, r), logits in results.items():
        assert torch.equal(logits, expected[r]), f"thread result for r={r} differs"


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _vit(global_pool="map"), "global_pool='map'"),
        (lambda: _vit(global_pool="max"), "global_pool='max'"),
        (lambda: _vit(block_fn=ResPostBlock), "ResPostBlock"),
        (lambda: timm.create_model("resnet18", pretrained=False), "ResNet"),
        (lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False), "Eva"),
    ],
)
def test_unsupported_models_are_refused_by_name(make, message: str) -> None:
    with pytest.raises(tome.UnsupportedModelError, match=message):
        tome.patch(make())


# --- train / eval mode -----------------------------------------------------------------------------


def test_attention_dropout_follows_the_vit_mode_not_the_wrapper() -> None:
    """``patch`` of an eval-mode ViT with attention dropout: the wrapper starts in training mode (as
    every nn.Module does), but timm drops attention only when the Attention module trains."""
    vit = _vit(depth=4, attn_drop_rate=0.5)
    model = tome.patch(vit)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x, r=4), model(x, r=4), atol=0, rtol=0)
