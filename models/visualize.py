"""Show what ToMe merged (paper Fig. 4 / Appendix E): each final token's input patches painted with
their average colour, with dark lines where neighbouring patches belong to different tokens.

    python -m models.visualize photo.jpg --model vit_small_patch16_224 --r 13 --out merged.png
    python -m models.visualize photo.jpg --weights vit_s16.safetensors --r 16:-1 --out merged.png

Weights load through safetensors or ``torch.load(weights_only=True)`` (timm's loader), never pickle.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.data import create_transform

from models import tome
from models.bench import parse_schedule
from models.timm_data import model_data_config

BORDER_VALUE = 20


def model_view(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo normalisation of one ``[3, H, W]`` input: the ``[H, W, 3]`` uint8 picture the model saw."""
    pixels = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def paint(picture: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Paint ``picture`` ``[H, W, 3]`` by token: ``owner`` ``[gh, gw]`` names each patch's final token."""
    gh, gw = owner.shape
    h, w = picture.shape[0] // gh * gh, picture.shape[1] // gw * gw
    patches = picture[:h, :w].float().reshape(gh, h // gh, gw, w // gw, 3)
    labels = owner.reshape(-1)
    patch_mean = patches.mean(dim=(1, 3)).reshape(-1, 3)
    sums = torch.zeros(int(labels.max()) + 1, 3).index_add_(0, labels, patch_mean)
    counts = torch.bincount(labels, minlength=sums.shape[0]).clamp(min=1)[:, None]
    colours = (sums / counts)[labels].reshape(gh, 1, gw, 1, 3)
    painted = colours.expand(gh, h // gh, gw, w // gw, 3).clone()
    below = torch.zeros(gh, gw, dtype=torch.bool)
    below[:-1] = owner[:-1] != owner[1:]
    right = torch.zeros(gh, gw, dtype=torch.bool)
    right[:, :-1] = owner[:, :-1] != owner[:, 1:]
    painted[:, -1][below] = BORDER_VALUE  # last pixel row of each patch above a border
    painted[:, :, :, -1].permute(0, 2, 1, 3)[right] = BORDER_VALUE  # last pixel column, left of one
    return painted.reshape(h, w, 3).round().to(torch.uint8)


def visualize(
    model: tome.ToMeVisionTransformer, image: Image.Image, r: tome.RSpec
) -> tuple[Image.Image, int]:
    """The merge picture for ``image`` at schedule ``r`` and the number of tokens left."""
    config = model_data_config(model.vit)
    x = create_transform(**config)(image.convert("RGB"))
    with torch.inference_mode():
        trace = model.forward_with_source(x[None], r=r)
    owner = trace.patch_owner()[0].reshape(tuple(model.vit.patch_embed.grid_size))
    picture = paint(model_view(x, config["mean"], config["std"]), owner)
    return Image.fromarray(picture.numpy()), trace.size.shape[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("image", type=Path)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    parser.add_argument("--weights", type=Path, default=None, help=".safetensors or .pth state dict")
    parser.add_argument("--r", default="13", help="schedule: 13, 16:-1 or 4/4/2")
    parser.add_argument("--out", type=Path, default=Path("merged.png"))
    args = parser.parse_args(argv)

    vit = timm.create_model(args.model, pretrained=False).eval()
    if args.weights is not None:
        vit.load_state_dict(timm.models.load_state_dict(str(args.weights), weights_only=True))
    picture, tokens = visualize(tome.patch(vit), Image.open(args.image), parse_schedule(args.r))
    picture.save(args.out)
    print(f"{tokens} tokens left; wrote {args.out}")


if __name__ == "__main__":
    main()
