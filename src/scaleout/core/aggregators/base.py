"""The streaming aggregator interface, partial aggregates, and their wire form.

An aggregator folds updates in one at a time (`add`) and keeps only running sums, so
memory does not grow with the number of clients. Combiners ship their `partial()` to a
reducer, which folds partials in with `add_partial` and computes the `result()`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from scaleout.core.errors import PayloadError, UpdateRejected
from scaleout.core.payload import (
    TensorSpec,
    encode_named_pieces,
    headroom,
    read_metadata,
    views,
)

WEIGHT_KEY = "scaleout.weight"
COUNT_KEY = "scaleout.count"
CONTRIBUTORS_KEY = "scaleout.contributors"


@dataclass
class Partial:
    """Float64 weighted sums of `count` updates from `contributors`, with their total weight."""

    sums: dict[str, np.ndarray]
    weight: float
    count: int
    contributors: list[str]


class Aggregator(Protocol):
    """Fold updates (or other aggregators' partials) in, then read the aggregate out."""

    name: str

    def __init__(self, template: Mapping[str, TensorSpec]) -> None: ...

    def check(self, update: Mapping[str, np.ndarray]) -> Any: ...

    def add(self, update: Any, weight: float, contributor: str) -> None: ...

    def add_many(self, items: Any) -> list[Any]: ...

    def add_partial(self, p: Partial) -> None: ...

    def partial(self, copy: bool = True) -> Partial: ...

    def mean(self, in_place: bool = False) -> dict[str, np.ndarray]: ...

    def result(self) -> dict[str, np.ndarray]: ...

    @property
    def count(self) -> int: ...


def check_weight(weight: object, *, allow_zero: bool = False) -> float:
    """A weight must be a finite real number > 0 (>= 0 for an empty partial)."""
    value = math.nan
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        try:
            value = float(weight)
        except OverflowError:
            value = math.inf
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise UpdateRejected(f"weight must be a finite number > 0, got {weight!r}")
    return value


def cast_mean(name: str, mean: np.ndarray, dtype: str) -> np.ndarray:
    """Cast tensor ``name``'s float64 mean back to the model's dtype: round ints,
    majority-vote bools. Refused when it does not fit: a float mean beyond the dtype's
    finite range (it would become inf), an integer one beyond the type's range.
    """
    target = np.dtype(dtype)
    if target.kind == "b":
        return np.asarray(mean >= 0.5)
    if target.kind in "iu":
        info = np.iinfo(target)
        if mean.size:
            least, greatest = float(mean.min()), float(mean.max())
            # Rounding may take an in-range mean just past a bound: within 1, it is clipped.
            if not (least >= info.min - 1 and greatest <= info.max + 1):  # NaN fails too
                raise UpdateRejected(f"the aggregate of tensor {name!r} ({least:.4g} to {greatest:.4g}) does not fit {target}")
        # float(int64 max) rounds up past the range; step back to the largest safe float.
        high = float(info.max) if float(info.max) <= info.max else np.nextafter(float(info.max), -math.inf)
        return np.asarray(np.clip(np.rint(mean), float(info.min), high).astype(target))
    from scaleout.core.aggregators.fold import amax

    with np.errstate(over="ignore"):
        cast = np.asarray(mean.astype(target, copy=False))  # a float32 mean of a float32 tensor is used as is
    if not math.isfinite(amax(cast)):  # blocked: np.isfinite(cast) would be a bool array a quarter of the model
        largest = float(np.finfo(target).max)
        raise UpdateRejected(f"the aggregate of tensor {name!r} is not finite in {target} (its mean lies beyond ±{largest:.4g})")
    check_headroom(name, cast)
    return cast


def check_headroom(name: str, model: np.ndarray) -> None:
    """Refuse to commit a float tensor with values beyond its dtype's `headroom`: the next
    round would train on values one step from inf (NaN for every client)."""
    from scaleout.core.aggregators.fold import amax

    if model.dtype.kind == "f" and model.size and amax(model) > headroom(model.dtype):
        raise UpdateRejected(
            f"the aggregate of tensor {name!r} reaches {amax(model):.4g}, beyond {headroom(model.dtype):.4g} "
            f"(1/16 of the largest {model.dtype}): not committed, the next round's arithmetic could overflow"
        )


def encode_partial(p: Partial, layout: str = "dict") -> bytes:
    """Serialize a partial as safetensors of its sums (float32 or float64, as accumulated)
    plus weight/count/contributors."""
    return b"".join(encode_partial_pieces(p, layout))


def encode_partial_pieces(p: Partial, layout: str = "dict") -> list[Any]:
    """`encode_partial`'s bytes as pieces: its header, then byte views of the sums (no copy
    of them; a combiner streams them to the controller as they are)."""
    sums = {name: np.asarray(s) for name, s in p.sums.items()}
    metadata = {
        WEIGHT_KEY: repr(float(p.weight)),
        COUNT_KEY: str(int(p.count)),
        CONTRIBUTORS_KEY: json.dumps(list(p.contributors)),
    }
    return encode_named_pieces(sums, layout, metadata)


NAME_BYTES = 128  # a contributor is a node name: at most 128 ASCII characters (messages.check_name)


def partial_size_range(template: Mapping[str, TensorSpec], count: int) -> tuple[int, int]:
    """The least and most bytes `encode_partial` can give for a model of ``template`` folded
    from ``count`` updates: each sum is float32 or float64, and the header holds the tensor
    names, the contributors' names and three numbers. A partial announced outside this range
    is refused before a byte of it is pulled."""
    elements = sum(math.prod(spec.shape) for spec in template.values())
    names = sum(len(name.encode()) for name in template)
    # JSON escapes may take a name's byte to 6 characters, twice (the order list is a JSON string inside the header).
    header = 1024 + 12 * names + sum(64 + 24 * len(spec.shape) for spec in template.values()) + count * 2 * (NAME_BYTES + 8)
    return 8 + 4 * elements, 8 + 8 * elements + header + 8


def decode_partial(data: bytes) -> Partial:
    """Parse and sanity-check a partial written by `encode_partial`. The sums are read-only
    views into ``data`` (no copy: a partial can be as large as the model)."""
    metadata = read_metadata(data)
    sums = views(data)
    try:
        weight = float(metadata[WEIGHT_KEY])
        count = int(metadata[COUNT_KEY])
        contributors = json.loads(metadata[CONTRIBUTORS_KEY])
    except KeyError as e:
        raise PayloadError(f"partial aggregate lacks metadata {e.args[0]!r}") from None
    except (ValueError, RecursionError) as e:
        raise PayloadError(f"partial aggregate has malformed metadata: {e}") from None
    if not math.isfinite(weight) or weight < 0 or count < 0:
        raise PayloadError(f"partial aggregate has weight {weight} and count {count}; both must be >= 0")
    if not isinstance(contributors, list) or not all(isinstance(c, str) for c in contributors):
        raise PayloadError("partial aggregate contributors must be a JSON list of strings")
    if len(contributors) != count:
        raise PayloadError(f"partial aggregate names {len(contributors)} contributors but counts {count}")
    for name, s in sums.items():
        if s.dtype not in (np.float32, np.float64):
            raise PayloadError(f"partial aggregate tensor {name!r} is {s.dtype}, expected float32 or float64")
    return Partial(sums, weight, count, contributors)
