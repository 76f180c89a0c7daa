"""The token bucket that bounds /metrics renders."""

from __future__ import annotations

import pytest

from service.api.rate_limit import TokenBucket


def test_a_bucket_allows_a_seconds_worth_at_once_then_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(4, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [True, True, True, True, False]
    now[0] += 0.25  # one token back
    assert [bucket.take() for _ in range(2)] == [True, False]
    now[0] += 100  # idle: never more than a second's worth
    assert sum(bucket.take() for _ in range(10)) == 4


def test_a_bucket_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)
