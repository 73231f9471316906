"""Per-address connection rate limits: a token bucket per key (pure: the caller gives ``now``).

Each key may take ``burst`` at once and ``rate`` per second after that. Only as many keys
are remembered as ``max_keys`` (the least recently seen are forgotten first, a forgotten key
starts again with a full bucket), so a flood of addresses cannot grow the table without bound.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_RATE = 200.0  # new connections per second, per address
DEFAULT_BURST = 2000  # taken at once before the rate applies (a fleet behind one NAT starting up)
MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, rate: float = DEFAULT_RATE, burst: float = DEFAULT_BURST, max_keys: int = MAX_KEYS) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be positive, burst and max_keys at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, as of)

    def take(self, key: str, now: float) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until one is free."""
        tokens, since = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - since) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
