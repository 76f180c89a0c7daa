"""The merge visualization paints each token's patches with their mean colour."""

from __future__ import annotations

import timm
import torch
from PIL import Image

from models import tome
from models.visualize import BORDER_VALUE, paint, visualize


def test_paint_averages_each_token_and_marks_borders() -> None:
    picture = torch.zeros(4, 4, 3, dtype=torch.uint8)
    picture[:2, :2] = 10
    picture[:2, 2:] = 30  # same token as the top-left patch: both become 20
    picture[2:] = 200
    owner = torch.tensor([[0, 0], [1, 1]])
    painted = paint(picture, owner)
    assert painted[0, 0].tolist() == [20, 20, 20] and painted[0, 3].tolist() == [20, 20, 20]
    assert painted[3, 3].tolist() == [200, 200, 200]
    assert painted[1].eq(BORDER_VALUE).all(), "last pixel row above a token border is dark"
    assert not painted[:, 1].eq(BORDER_VALUE).all(), "no border between patches of one token"


def test_visualize_end_to_end() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4).eval()
    image = Image.new("RGB", (90, 70), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 45, 70))
    picture, tokens = visualize(tome.patch(vit), image, r=3)
    assert picture.size == (64, 64)
    assert tokens == 17 - 4 * 3  # 16 patches + class token, 3 merged in each of 4 blocks
