"""A deliberately plain ToMe reference, written from the paper (Sec. 3, Appendix D), for the tests.

One image at a time, Python loops over tokens, explicit softmax attention: slow but easy to check by
eye against the paper. It reuses the timm model's layers (they hold the weights) but none of the
ToMe code under test.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer


def reference_forward(
    vit: VisionTransformer, images: torch.Tensor, r_per_block: list[int], prop_attn: bool
) -> torch.Tensor:
    """Logits of ``vit`` with Token Merging, one image at a time."""
    return torch.cat([_one_image(vit, img[None], r_per_block, prop_attn) for img in images])


def _one_image(vit: VisionTransformer, image: torch.Tensor, r_per_block: list[int], prop_attn: bool):
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))[0]  # [N, C]
    protected = vit.num_prefix_tokens  # class / distillation / register tokens come first
    sizes = torch.ones(x.shape[0])
    for block, r in zip(vit.blocks, r_per_block, strict=True):
        attn_out, keys = _attention(block.attn, block.norm1(x), sizes if prop_attn else None)
        x = x + block.ls1(attn_out)
        x, sizes = _merge(x, sizes, keys.mean(dim=0), r, protected)  # keys averaged over heads
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = vit.norm(x)
    if vit.global_pool == "avg":
        first = 0 if vit.pool_include_prefix else protected
        w = sizes[first:, None]
        pooled = (x[first:] * w).sum(dim=0) / w.sum()
        return vit.head(vit.fc_norm(pooled[None]))
    return vit.forward_head(x[None])


def _attention(attn, x: torch.Tensor, sizes: torch.Tensor | None):
    """softmax(QK^T / sqrt(d) + log s) V, Eq. 1 of the paper."""
    n = x.shape[0]
    qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]  # [heads, N, head_dim]
    logits = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5
    if sizes is not None:
        logits = logits + sizes.log()[None, None, :]
    out = (logits.softmax(dim=-1) @ v).transpose(0, 1).reshape(n, -1)
    return attn.proj(attn.norm(out)), k


def _merge(x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, protected: int):
    """Bipartite soft matching: A = even positions, B = odd positions, protected tokens excluded."""
    n = x.shape[0]
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return x, sizes
    set_a = [i for i in range(protected, n) if i % 2 == 0]
    set_b = [j for j in range(protected, n) if j % 2 == 1]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    best_edge = {}
    for i in set_a:  # each A token keeps one edge: its most similar B token (first on ties)
        sims = (unit[set_b] @ unit[i]).tolist()
        best = max(range(len(set_b)), key=lambda m: sims[m])
        best_edge[i] = (sims[best], set_b[best])
    ranked = sorted(set_a, key=lambda i: -best_edge[i][0])  # stable: lower index first on ties
    merged_away = set(ranked[:r])
    groups = {j: [j] for j in set_b}
    for i in sorted(merged_away):
        groups[best_edge[i][1]].append(i)

    rows, new_sizes = [], []
    for i in list(range(protected)) + [i for i in set_a if i not in merged_away]:
        rows.append(x[i])
        new_sizes.append(sizes[i])
    for j in set_b:  # size-weighted average of everything merged into j; sizes add up
        members = groups[j]
        total = sum(sizes[m] for m in members)
        rows.append(sum(x[m] * sizes[m] for m in members) / total)
        new_sizes.append(total)
    return torch.stack(rows), torch.stack(new_sizes)
