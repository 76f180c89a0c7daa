"""Token Merging (ToMe) for Vision Transformers.

``merge`` and ``schedule`` hold the model-agnostic algorithm; ``timm_vit`` applies it to timm's
VisionTransformer. Another model family needs only a new patch module beside ``timm_vit``.
"""

from .merge import Matching, bipartite_soft_matching, merge_source, merge_wavg
from .schedule import RSpec, parse_r, token_schedule
from .timm_vit import (
    MergeTrace,
    ScheduleInfo,
    ToMeVisionTransformer,
    UnsupportedModelError,
    check_supported,
    patch,
)

__all__ = [
    "Matching",
    "MergeTrace",
    "RSpec",
    "ScheduleInfo",
    "ToMeVisionTransformer",
    "UnsupportedModelError",
    "bipartite_soft_matching",
    "check_supported",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "patch",
    "token_schedule",
]
