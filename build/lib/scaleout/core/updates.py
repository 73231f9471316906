"""Checks on what a client's train callback hands back alongside its model update."""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Mapping

from scaleout.core.errors import UpdateRejected

MAX_EXAMPLES = 2**53  # beyond this a float64 weight cannot count examples exactly
_EXPECTED = 'train callback must return metadata {"training_metadata": {"num_examples": N}} with N > 0'


def read_num_examples(metadata: object) -> int:
    """The number of training examples behind an update: its FedAvg weight.

    Accepts an int or an integral float; bools and anything not > 0 are refused.
    """
    training = metadata.get("training_metadata") if isinstance(metadata, Mapping) else None
    n = training.get("num_examples") if isinstance(training, Mapping) else None
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        count = None
    elif isinstance(n, numbers.Integral):
        count = int(n)
    else:
        count = int(float(n)) if float(n).is_integer() else None
    if count is None or count <= 0:
        raise UpdateRejected(f"{_EXPECTED}; got {reprlib.repr(metadata)}")
    if count > MAX_EXAMPLES:
        raise UpdateRejected(f"num_examples {reprlib.repr(count)} is not plausible (more than 2**53)")
    return count
