"""ToMe for timm's ``VisionTransformer`` (and the distilled DeiT variant).

The patched model wraps the timm model and runs timm's own sub-modules (norms, projections, MLPs,
LayerScale, heads), so weights are shared, not copied. All merging state (``r``, token sizes,
sources) lives in local variables of one call: a single instance serves several tiers from several
threads at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .merge import (
    bipartite_soft_matching,
    compute_dtype_for,
    merge_source,
    merge_wavg,
    proportional_attention_bias,
)
from .schedule import RSpec, parse_r, token_schedule

SUPPORTED_MODEL_CLASSES = (VisionTransformer, VisionTransformerDistilled)
SUPPORTED_POOLS = ("token", "avg")


class UnsupportedModelError(ValueError):
    """The model has a part the ToMe patch does not know how to merge through."""


@dataclass(frozen=True)
class MergeTrace:
    """Logits plus what merged: each final token's size and the input tokens it covers."""

    logits: torch.Tensor  # [B, num_classes]
    size: torch.Tensor  # [B, T_final] number of input tokens each final token covers
    source: torch.Tensor  # [B, T_final, T_input] bool: final token i covers input token j
    num_prefix_tokens: int

    def patch_owner(self) -> torch.Tensor:
        """For every input patch (prefix tokens excluded), the index of the final token covering it.

        Shape ``[B, num_patches]``; reshape to the patch grid to colour a merge visualization.
        """
        return self.source[:, :, self.num_prefix_tokens :].to(torch.uint8).argmax(dim=1)


@dataclass(frozen=True)
class ScheduleInfo:
    """What a schedule does before running it: per-block merges, token counts and cost."""

    r_per_block: tuple[int, ...]  # tokens each block really merges (after capping)
    tokens_in: int  # tokens entering the first block
    tokens_after_block: tuple[int, ...]
    gflops: float  # multiply-accumulates per image / 1e9 (the paper's and fvcore's convention)


def check_supported(vit: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` naming every part the patch cannot run exactly."""
    if type(vit) not in SUPPORTED_MODEL_CLASSES:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_MODEL_CLASSES)
        raise UnsupportedModelError(f"model class {type(vit).__name__} is not supported (supported: {names})")
    problems = []
    for i, block in enumerate(vit.blocks):
        if type(block) is not Block:
            problems.append(f"blocks[{i}] is {type(block).__name__} (only timm's Block is supported)")
        elif type(block.attn) is not Attention:
            problems.append(f"blocks[{i}].attn is {type(block.attn).__name__} (only timm's Attention)")
    if getattr(vit, "attn_pool", None) is not None or vit.global_pool not in SUPPORTED_POOLS:
        problems.append(f"global_pool={vit.global_pool!r} (supported: {', '.join(SUPPORTED_POOLS)})")
    if problems:
        raise UnsupportedModelError("cannot apply ToMe: " + "; ".join(problems))


class ToMeVisionTransformer(nn.Module):
    """A timm ViT that merges ``r`` tokens per block; ``r`` is chosen per call."""

    def __init__(self, vit: VisionTransformer, prop_attn: bool = True, float32_merge: bool = True) -> None:
        super().__init__()
        check_supported(vit)
        self.vit = vit
        self.prop_attn = prop_attn
        # similarity and weighted average in float32 even in a bf16/fp16 model (see merge.py)
        self.merge_dtype: torch.dtype | None = torch.float32 if float32_merge else None
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.depth = len(vit.blocks)

    def forward(self, x: torch.Tensor, r: RSpec = 0) -> torch.Tensor:
        logits, _, _ = self._run(x, parse_r(self.depth, r), trace_source=False)
        return logits

    def forward_with_source(self, x: torch.Tensor, r: RSpec = 0) -> MergeTrace:
        """Like ``forward`` but also returns token sizes and sources (paper Fig. 4, Appendix E)."""
        logits, size, source = self._run(x, parse_r(self.depth, r), trace_source=True)
        assert source is not None
        # size is None when nothing merged: every token then has size 1
        size = torch.ones(source.shape[:2], device=source.device) if size is None else size[..., 0]
        return MergeTrace(logits, size.round().long(), source.bool(), self.num_prefix_tokens)

    def schedule_info(self, r: RSpec, img_size: int | Sequence[int] | None = None) -> ScheduleInfo:
        """Per-block merges, token counts and GFLOPs for ``r`` at ``img_size``, without running."""
        grid = self._grid_size(img_size)
        num_patches = grid[0] * grid[1]
        tokens_in = num_patches + self.num_prefix_tokens
        applied, after = token_schedule(tokens_in, self.num_prefix_tokens, parse_r(self.depth, r))
        macs = _patch_embed_macs(self.vit, num_patches) + _head_macs(self.vit)
        t = tokens_in
        for block, r_blk, t_after in zip(self.vit.blocks, applied, after, strict=True):
            macs += _block_macs(block, t, t_after, self.num_prefix_tokens, merged=r_blk > 0)
            t = t_after
        return ScheduleInfo(tuple(applied), tokens_in, tuple(after), macs / 1e9)

    def _grid_size(self, img_size: int | Sequence[int] | None) -> tuple[int, int]:
        patch_embed = self.vit.patch_embed
        if img_size is None:
            return tuple(patch_embed.grid_size)
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if hw != tuple(patch_embed.img_size) and not self.vit.dynamic_img_size:
            raise ValueError(
                f"image size {hw} differs from the model's {tuple(patch_embed.img_size)} and the model "
                "was not created with dynamic_img_size=True"
            )
        return tuple(patch_embed.dynamic_feat_size(hw))

    def _run(
        self, x: torch.Tensor, r_per_block: list[int], trace_source: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        size: torch.Tensor | None = None  # None until the first merge: every token has size 1
        source: torch.Tensor | None = None
        if trace_source:
            eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
            source = eye.expand(x.shape[0], -1, -1)
        for block, r in zip(vit.blocks, r_per_block, strict=True):
            x, size, source = self._block_forward(block, x, size, source, r)
        x = vit.norm(x)
        return self._head(x, size), size, source

    def _block_forward(
        self,
        block: Block,
        x: torch.Tensor,
        size: torch.Tensor | None,
        source: torch.Tensor | None,
        r: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        attn_out, keys = self._attention(block.attn, block.norm1(x), size)
        x = x + block.drop_path1(block.ls1(attn_out))
        if r > 0:
            # Merge between the attention and MLP branches; similarity = keys averaged over heads.
            metric = keys.to(compute_dtype_for(self.merge_dtype, keys.dtype)).mean(dim=1)
            matching = bipartite_soft_matching(metric, r, self.num_prefix_tokens, self.merge_dtype)
            if matching is not None:
                if source is not None:
                    source = merge_source(matching, source)
                x, size = merge_wavg(matching, x, size, self.merge_dtype)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, size, source

    def _attention(
        self, attn: Attention, x: torch.Tensor, size: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's ``Attention.forward`` with proportional attention; also returns the keys."""
        B, N, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = proportional_attention_bias(size, q.dtype) if self.prop_attn and size is not None else None
        # attention dropout follows the attention module's own mode, as in timm (not the wrapper's,
        # which nn.Module creates in training mode even around an eval-mode ViT)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
        out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
        out = attn.norm(out)
        if gate is not None:
            out = out * gate
        out = attn.proj_drop(attn.proj(out))
        return out, k

    def _head(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        vit = self.vit
        if vit.global_pool != "avg":
            return vit.forward_head(x)  # token pooling reads prefix tokens, which never merge
        first = 0 if getattr(vit, "pool_include_prefix", False) else self.num_prefix_tokens
        tokens = x[:, first:]
        if size is None:
            pooled = tokens.mean(dim=1)
        else:  # every token stands for `size` patches: weight the average accordingly
            weights = size[:, first:].to(x.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1)
        return vit.head(vit.head_drop(vit.fc_norm(pooled)))


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of every Linear inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _block_macs(block: Block, tokens_in: int, tokens_out: int, protected: int, merged: bool) -> int:
    attn = block.attn
    macs = _linear_macs(attn) * tokens_in
    macs += 2 * attn.num_heads * tokens_in * tokens_in * attn.head_dim  # QK^T and AV
    if merged:  # similarity of the unprotected A tokens against the unprotected B tokens
        free = tokens_in - protected
        a_count = (free + 1) // 2 if protected % 2 == 0 else free // 2
        macs += a_count * (free - a_count) * attn.head_dim
    macs += _linear_macs(block.mlp) * tokens_out
    return macs


def _patch_embed_macs(vit: VisionTransformer, num_patches: int) -> int:
    proj = vit.patch_embed.proj
    if isinstance(proj, nn.Conv2d):
        kh, kw = proj.kernel_size
        return num_patches * proj.out_channels * (proj.in_channels // proj.groups) * kh * kw
    return num_patches * _linear_macs(proj)


def _head_macs(vit: VisionTransformer) -> int:
    heads = [vit.head, getattr(vit, "head_dist", None)]
    return sum(_linear_macs(h) for h in heads if h is not None)


def patch(
    vit: VisionTransformer, prop_attn: bool = True, float32_merge: bool = True
) -> ToMeVisionTransformer:
    """Wrap a timm ViT so that ``model(x, r=...)`` merges tokens; ``vit``'s weights are shared.

    ``prop_attn`` adds ``log(size)`` to the attention logits (needed for off-the-shelf supervised
    models; the paper turns it off only for off-the-shelf MAE models). ``float32_merge`` computes the
    token similarity and the size-weighted merge in float32 in a bf16/fp16 model (no effect in float32);
    ``False`` keeps them in the model's dtype, as the official release does.
    """
    return ToMeVisionTransformer(vit, prop_attn=prop_attn, float32_merge=float32_merge)
