"""A tiny timm ViT trained in seconds on scikit-learn's bundled handwritten digits.

No pretrained weights can be downloaded in the test environment, so tests that need a model which
has actually learned something (ToMe's accuracy claims) train this one. 8×8 grayscale digits with
patch size 1 give 64 patch tokens plus the class token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class DigitsSplit:
    x_train: torch.Tensor  # [N, 1, 8, 8] float32 in [-1, 1]
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_size: float = 0.3, seed: int = 0) -> DigitsSplit:
    """The 1,797 digits of ``sklearn.datasets.load_digits``, split stratified and seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # 0..16 -> -1..1
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=test_size, random_state=seed, stratify=digits.target
    )
    return DigitsSplit(x[train_idx], y[train_idx], x[test_idx], y[test_idx])


def build_vit(
    patch_size: int = 1, embed_dim: int = 32, depth: int = 4, num_heads: int = 4, seed: int = 0
) -> VisionTransformer:
    """A class-token ViT on 8×8×1 images; 1×1 patches give 65 tokens."""
    torch.manual_seed(seed)
    vit = VisionTransformer(
        img_size=8,
        patch_size=patch_size,
        in_chans=1,
        num_classes=10,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=2.0,
    )
    # A 1×1 patch of one channel embeds to w * pixel + b, which the blocks' pre-norm LayerNorm maps to
    # nearly the same vector for every lit pixel. Position embeddings on the same scale as that embedding
    # (timm's default std is 0.02) keep "which pixel is lit" visible after the norm; without this the
    # model barely trains in a few hundred steps.
    with torch.no_grad():
        vit.pos_embed[:, vit.num_prefix_tokens :].normal_(std=1.0)
    return vit


def train(
    vit: VisionTransformer,
    data: DigitsSplit,
    epochs: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> float:
    """Plain supervised training (no merging) with AdamW and a one-cycle schedule; returns last loss."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(vit.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    vit.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(vit(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    vit.eval()
    return loss.item()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def random_drop_forward(
    vit: VisionTransformer, x: torch.Tensor, drop_per_block: Sequence[int], generator: torch.Generator
) -> torch.Tensor:
    """timm's forward pass, except that block ``i`` drops ``drop_per_block[i]`` random patch tokens.

    The drop happens where ToMe merges (after the attention branch, before the MLP), and prefix tokens
    (the class token) are always kept, so against ``tome.patch(vit)(x, r)`` with the same per-block
    counts the only difference is merging versus discarding. Each image draws its own tokens.
    """
    if len(drop_per_block) != len(vit.blocks):
        raise ValueError(f"need one drop count per block ({len(vit.blocks)}), got {len(drop_per_block)}")
    prefix = vit.num_prefix_tokens
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for block, drop in zip(vit.blocks, drop_per_block, strict=True):
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        if drop > 0:
            b, t, c = x.shape
            keep = t - prefix - drop
            if keep < 1:
                raise ValueError(f"cannot drop {drop} of {t - prefix} patch tokens")
            scores = torch.rand(b, t - prefix, generator=generator)
            kept = scores.argsort(dim=1)[:, :keep].sort(dim=1).values + prefix
            x = torch.cat([x[:, :prefix], x.gather(1, kept[..., None].expand(-1, -1, c))], dim=1)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    x = vit.norm(x)
    return vit.forward_head(x)
