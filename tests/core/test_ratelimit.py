"""Per-address token buckets."""

from __future__ import annotations

import pytest

from scaleout.core.ratelimit import RateLimiter


def test_burst_then_rate_per_key() -> None:
    rl = RateLimiter(rate=10, burst=3)
    assert [rl.take("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a", 0.0) == pytest.approx(0.1)
    assert rl.take("b", 0.0) == 0.0  # another address has its own bucket
    assert rl.take("a", 0.1) == 0.0  # one token back after 1/rate
    assert rl.take("a", 0.1) > 0
    assert [rl.take("a", 10.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # refilled, up to the burst only
    assert rl.take("a", 10.0) > 0


def test_refused_attempts_do_not_dig_a_deeper_hole() -> None:
    rl = RateLimiter(rate=1, burst=1)
    assert rl.take("a", 0.0) == 0.0
    for _ in range(100):
        assert rl.take("a", 0.5) == pytest.approx(0.5)
    assert rl.take("a", 1.0) == 0.0


def test_the_table_of_addresses_is_bounded() -> None:
    rl = RateLimiter(rate=1, burst=1, max_keys=100)
    for i in range(10_000):
        rl.take(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(rl) == 100
    with pytest.raises(ValueError):
        RateLimiter(rate=0)
