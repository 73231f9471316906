"""Metric reduction: per-client metric dicts in, one summary per metric out."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spread:
    """A metric over the clients that reported it: mean, population std, min, max, count."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max, "n": self.n}


def _numbers(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Finite numeric values of each metric (bools, strings, NaN and overflowing ints skipped)."""
    values: dict[str, list[float]] = {}
    for data in rows:
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    number = float(value)
                except OverflowError:
                    continue
                if math.isfinite(number):
                    values.setdefault(key, []).append(number)
    return values


def spread(rows: Iterable[Mapping[str, Any]]) -> dict[str, Spread]:
    """Each metric's spread across clients, sorted by name."""
    out: dict[str, Spread] = {}
    for key, xs in sorted(_numbers(rows).items()):
        n = len(xs)
        mean = math.fsum(x / n for x in xs)  # divided first: a sum of huge values must not overflow
        try:
            std = math.sqrt(math.fsum(((x - mean) / n) * (x - mean) for x in xs))
        except OverflowError:
            std = math.inf
        out[key] = Spread(mean, std if math.isfinite(std) else math.inf, min(xs), max(xs), n)
    return out


def mean_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each numeric metric over the clients that reported it."""
    return {key: s.mean for key, s in spread(rows).items()}
