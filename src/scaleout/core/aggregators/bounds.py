"""Bounds on one client's say in a round (issue 20 #5): its weight and the size of its change.

FedAvg weighs an update by the ``num_examples`` its client claims, and nothing in the
mean limits how far one update sits from the model: one client claiming 2**53 examples,
or sending values of 3e38, decided the global model. Two bounds, both session settings:

- ``max_examples_per_client``: a client's weight is clipped to this many examples (0: no
  cap). Clipped, not refused: a large honest site still contributes, at the cap. A fixed
  cap because the fold is streaming: a combiner folds an update before it has heard the
  others, so a cap derived from the round's median cannot be applied without holding them.
- ``max_update_norm``: an update whose change ``||update - model||`` (L2 over the float
  tensors) exceeds this multiple of ``max(||model||, sqrt(n))`` is refused, naming the
  client (0: off). The ``sqrt(n)`` floor (n float elements, i.e. an RMS of 1 per element)
  keeps a zero or tiny seed model trainable: its first updates are measured against it.

Integer and bool tensors are left out of the norm: their values are range-checked and
their means cast back with a range check (`cast_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from scaleout.core.aggregators.fold import BLOCK, STRETCH
from scaleout.core.errors import ConfigError, UpdateRejected


def clip_examples(count: int, cap: int) -> int:
    """A client's weight: its claimed ``count``, at most ``cap`` (0: no cap)."""
    return min(count, cap) if cap > 0 else count


def sum_squares(x: np.ndarray, y: np.ndarray | None = None) -> float:
    """sum((x - y)**2) (or sum(x**2)) in float64, block by block: no model-sized temporary,
    and no overflow for any float32 values (3e38 squared is 9e76 in float64)."""
    a = x.reshape(-1)
    b = y.reshape(-1) if y is not None else None
    total = 0.0
    for start in range(0, a.size, BLOCK):
        block = a[start : start + BLOCK].astype(np.float64)
        if b is not None:
            block -= b[start : start + BLOCK]
        total += float(np.dot(block, block))
    return total


def norm_limit(model: Mapping[str, np.ndarray], multiple: float) -> float | None:
    """The largest change an update may make: ``multiple * max(||model||, sqrt(n))`` over
    the model's float tensors; None when the bound is off (``multiple`` 0)."""
    if multiple <= 0:
        return None
    squares, elements = 0.0, 0
    for array in model.values():
        if array.dtype.kind == "f":
            squares += sum_squares(array)
            elements += array.size
    return multiple * max(math.sqrt(squares), math.sqrt(elements))


def check_change(
    model: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], limit: float | None,
    read: Callable[[np.ndarray], None] | None = None,
) -> float:
    """Refuse an update that moves the model further than ``limit`` (L2 over the float
    tensors); returns the change's norm (0.0 when not measured, the bound being off).
    ``read``, when given, is told each stretch of the model and of the update once it has been
    read (a caller whose model or update is a mapped file lets those pages go, so the check
    holds neither)."""
    if limit is None:
        return 0.0
    squares = 0.0
    for name, array in model.items():
        if array.dtype.kind == "f":
            if read is None:
                squares += sum_squares(np.asarray(update[name]), array)
                continue
            flat, other = array.reshape(-1), np.asarray(update[name]).reshape(-1)
            for start in range(0, flat.size, STRETCH):
                squares += sum_squares(other[start : start + STRETCH], flat[start : start + STRETCH])
                read(flat[start : start + STRETCH])
                read(other[start : start + STRETCH])
    change = math.sqrt(squares)
    if not change <= limit:
        raise UpdateRejected(f"its change to the model has norm {change:.4g}, more than the bound {limit:.4g} (max_update_norm)")
    return change


def parse_examples_cap(value: object) -> int:
    """``max_examples_per_client``: a whole number >= 0 (0: no cap)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise ConfigError("max_examples_per_client", f"must be a whole number from 0 (no cap) to 2**53, got {value!r:.40}")
    return value


def parse_norm_bound(value: object) -> float:
    """``max_update_norm``: a multiple of the model's norm > 0, or 0 / "off" for no bound."""
    if isinstance(value, str) and value.strip().lower() == "off":
        return 0.0
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1e12:
        raise ConfigError("max_update_norm", f"must be a multiple of the model's norm > 0, or 0 or 'off' for no bound, got {value!r:.40}")
    return float(value)
