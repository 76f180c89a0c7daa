"""The patched model equals stock timm at r=0 and the paper-faithful reference at r>0."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from models import tome
from tests.tome_reference import reference_forward

SCHEDULES = [4, (3, -1), [0, 5, 2, 7]]


def _randomize_layer_scale(vit: VisionTransformer) -> None:
    """timm initialises LayerScale to a tiny constant; random gammas make the test bite."""
    for module in vit.modules():
        if hasattr(module, "gamma"):
            module.gamma.data.uniform_(0.2, 1.0)


def _small_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    defaults = dict(pretrained=False, img_size=64, patch_size=8, embed_dim=64, depth=4, num_heads=4)
    vit = timm.create_model("vit_tiny_patch16_224", **{**defaults, **kwargs}).eval()
    _randomize_layer_scale(vit)
    return vit


VARIANTS = {
    "plain": lambda: _small_vit(),
    "layer_scale_deit3": lambda: _small_vit(init_values=0.1, no_embed_class=True),
    "qk_norm": lambda: _small_vit(qk_norm=True),
    "reg_tokens_4": lambda: _small_vit(reg_tokens=4),  # 5 protected: odd count
    "reg_tokens_1": lambda: _small_vit(reg_tokens=1),  # 2 protected: even count
    "no_class_token_avg": lambda: _small_vit(class_token=False, global_pool="avg", fc_norm=True),
    "no_class_token_regs_avg": lambda: _small_vit(class_token=False, reg_tokens=3, global_pool="avg"),
    "distilled": lambda: _small_vit_distilled(),
    "img_size_384": lambda: _small_vit(img_size=384, patch_size=32),
}


def _small_vit_distilled() -> VisionTransformer:
    torch.manual_seed(0)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, patch_size=8, depth=4
    ).eval()


def _images(vit: VisionTransformer, batch: int = 2, hw: tuple[int, int] | None = None) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, *(hw or vit.patch_embed.img_size))


@pytest.mark.parametrize("variant", VARIANTS)
def test_r0_equals_stock_timm(variant: str) -> None:
    vit = VARIANTS[variant]()
    x = _images(vit)
    with torch.no_grad():
        torch.testing.assert_close(tome.patch(vit)(x), vit(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("r", SCHEDULES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant: str, r, prop_attn: bool) -> None:
    vit = VARIANTS[variant]()
    model = tome.patch(vit, prop_attn=prop_attn)
    x = _images(vit)
    with torch.no_grad():
        got = model(x, r=r)
        want = reference_forward(vit, x, tome.parse_r(len(vit.blocks), r), prop_attn)
        stock = vit(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - stock).abs().max() > 1e-3, "merging should change the logits"


def test_vit_small_patch16_224_matches_reference() -> None:
    """The issue's yardstick: ViT-S/16 in fp32, max abs difference <= 1e-4."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    model = tome.patch(vit, prop_attn=True)
    x = _images(vit, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=0)
        for r in (13, (16, -1)):
            want = reference_forward(vit, x, tome.parse_r(12, r), prop_attn=True)
            torch.testing.assert_close(model(x, r=r), want, atol=1e-4, rtol=0)


def test_dynamic_image_size() -> None:
    vit = _small_vit(dynamic_img_size=True)
    model = tome.patch(vit)
    x = _images(vit, hw=(48, 80))  # not the configured 64x64
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x), atol=1e-5, rtol=0)
        want = reference_forward(vit, x, tome.parse_r(4, 5), prop_attn=True)
        torch.testing.assert_close(model(x, r=5), want, atol=1e-4, rtol=0)
    info = model.schedule_info(5, img_size=(48, 80))
    assert info.tokens_in == 6 * 10 + 1
    assert info.tokens_after_block[-1] == model.forward_with_source(x, r=5).size.shape[1]


def test_weights_are_shared_not_copied() -> None:
    vit = _small_vit()
    model = tome.patch(vit)
    assert model.vit is vit
    assert model.vit.blocks[0].attn.qkv.weight.data_ptr() == vit.blocks[0].attn.qkv.weight.data_ptr()
