"""Reconnect delays: a fleet that loses its links at once does not dial again all at once."""

from __future__ import annotations

import random

from scaleout.transport.net import RECONNECT_SPREAD_S, backoff


def test_the_first_retry_after_a_lost_link_is_spread_over_the_window() -> None:
    rng = random.Random(7)
    firsts = sorted(next(backoff(spread=RECONNECT_SPREAD_S, rng=rng)) for _ in range(1000))  # 1,000 clients of one combiner
    assert 0.0 <= firsts[0] and firsts[-1] < RECONNECT_SPREAD_S
    # Spread evenly: no tenth of the window gets more than twice its share of the clients.
    tenths = [sum(1 for f in firsts if i * RECONNECT_SPREAD_S / 10 <= f < (i + 1) * RECONNECT_SPREAD_S / 10) for i in range(10)]
    assert max(tenths) < 200 and min(tenths) > 50


def test_after_the_spread_the_delays_grow_with_jitter_and_a_cap() -> None:
    delays = backoff(initial=0.2, maximum=15.0, spread=3.0, rng=random.Random(1))
    first = next(delays)
    assert 0.0 <= first < 3.0
    later = [next(delays) for _ in range(12)]
    assert 0.1 <= later[0] <= 0.2 and 0.2 <= later[1] <= 0.4
    assert all(7.5 <= d <= 15.0 for d in later[-3:])


def test_without_a_spread_the_first_retry_is_short() -> None:
    assert 0.1 <= next(backoff(rng=random.Random(3))) <= 0.2
