"""Aggregation strategies behind one streaming interface, looked up by name."""

from __future__ import annotations

from collections.abc import Mapping

from scaleout.core.aggregators.base import Aggregator, Partial, decode_partial, encode_partial
from scaleout.core.aggregators.fedavg import FedAvg
from scaleout.core.errors import ConfigError
from scaleout.core.payload import TensorSpec

AGGREGATORS: dict[str, type[Aggregator]] = {FedAvg.name: FedAvg}


def get_aggregator(name: str, template: Mapping[str, TensorSpec]) -> Aggregator:
    """A fresh aggregator of the named kind for a model shaped like `template`."""
    cls = AGGREGATORS.get(name)
    if cls is None:
        raise ConfigError("aggregator", f"unknown aggregator {name!r}; choose one of: {', '.join(sorted(AGGREGATORS))}")
    return cls(template)


__all__ = ["AGGREGATORS", "Aggregator", "FedAvg", "Partial", "decode_partial", "encode_partial", "get_aggregator"]
