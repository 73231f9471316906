"""Aggregation strategies: a streaming reducer (combiner side) and a server step
(controller side, see `strategy`), looked up by name."""

from __future__ import annotations

from collections.abc import Mapping

from scaleout.core.aggregators.base import Aggregator, Partial, decode_partial, encode_partial
from scaleout.core.aggregators.fedavg import FedAvg
from scaleout.core.aggregators.strategy import STRATEGIES, FedAdam, Strategy, make_strategy
from scaleout.core.errors import ConfigError
from scaleout.core.payload import TensorSpec

_REDUCERS: dict[str, type[Aggregator]] = {"weighted_sum": FedAvg}
# Strategy name -> the reducer its combiners run (every strategy so far folds a weighted sum).
AGGREGATORS: dict[str, type[Aggregator]] = {name: _REDUCERS[cls.reducer] for name, cls in STRATEGIES.items()}


def needs_updates(name: str) -> bool:
    """Whether strategy ``name`` needs each update on its own (forwarded, not folded)."""
    cls = STRATEGIES.get(name)
    return cls is not None and cls.needs_updates


def get_aggregator(name: str, template: Mapping[str, TensorSpec]) -> Aggregator:
    """A fresh reducer for strategy `name`, for a model shaped like `template`."""
    cls = AGGREGATORS.get(name)
    if cls is None:
        raise ConfigError("aggregator", f"unknown aggregator {name!r}; choose one of: {', '.join(sorted(AGGREGATORS))}")
    return cls(template)


__all__ = [
    "AGGREGATORS", "STRATEGIES", "Aggregator", "FedAdam", "FedAvg", "Partial", "Strategy",
    "decode_partial", "encode_partial", "get_aggregator", "make_strategy", "needs_updates",
]  # fmt: skip
