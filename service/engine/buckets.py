"""Batch-size buckets: the batch sizes warm-up measures, CUDA graphs are captured for, batches pad to."""

from __future__ import annotations

from collections.abc import Sequence


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, plus ``max_batch_size`` itself."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size]
    return sorted({*sizes, max_batch_size})


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` images."""
    return next(b for b in buckets if b >= n)
