"""`LandingCheck`: `check_values` one chunk at a time as an update lands (issue 17 #2). It
agrees with the whole-update check on every dtype, whatever the chunks' borders, and says
None (the whole check decides) for anything that does not clearly pass."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.aggregators.landing import LandingCheck
from scaleout.core.errors import UpdateRejected
from scaleout.core.payload import TensorSpec, check_values

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool"]
CHUNKS = [1, 3, 7, 64, 4096, 1 << 20]


def _values(dtype: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = np.dtype(dtype)
    if d.kind == "f":
        return (rng.standard_normal(n) * 3).astype(d)
    if d.kind == "b":
        return rng.integers(0, 2, n).astype(bool)
    info = np.iinfo(d)
    return rng.integers(info.min, info.max, n, dtype=d, endpoint=True)


def _landed(data: bytes, template: dict[str, TensorSpec], chunk: int) -> dict[str, float] | None:
    check = LandingCheck(template, len(data))
    view = memoryview(data)
    for at in range(0, len(data), chunk):
        check.feed(at, view[at : at + chunk])
    return check.verdict()


def _whole(data: bytes, template: dict[str, TensorSpec]) -> dict[str, float] | None:
    try:
        return check_values(template, payload.views(data))
    except UpdateRejected:
        return None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_it_passes_what_the_whole_check_passes_with_peaks_that_bound_the_values(dtype: str, chunk: int) -> None:
    arrays = {"a": _values(dtype, 1001), "b": _values(dtype, 5, 1), "e": np.zeros(0, dtype), "c": _values(dtype, 77, 2)}
    data = payload.encode_named(arrays, "dict")
    template = payload.describe(data)
    whole, landed = _whole(data, template), _landed(data, template, chunk)
    assert whole is not None and landed is not None and landed.keys() == whole.keys()
    for name, values in arrays.items():
        exact = float(np.abs(values.astype(np.float64)).max()) if values.size else 0.0
        if np.dtype(dtype).kind == "f":
            # A bound (the root of a piece's sum of squares), at most sqrt(elements) times the peak.
            assert exact <= landed[name] <= exact * math.sqrt(max(1, values.size)) * 1.25, (name, exact, landed[name])
            assert whole[name] >= exact
        else:
            assert landed[name] == whole[name]  # exact for integers and bools


@pytest.mark.parametrize(("dtype", "target"), [("float64", "float32"), ("int64", "int32"), ("float16", "float32"), ("uint64", "int64")])
def test_a_wider_update_is_judged_against_the_models_dtype(dtype: str, target: str) -> None:
    values = _values(dtype, 300) if np.dtype(dtype).kind == "f" else np.arange(300, dtype=dtype)
    data = payload.encode_named({"w": values}, "dict")
    template = {"w": TensorSpec(target, (300,))}
    assert _landed(data, template, 7) is not None and _whole(data, template) is not None
    big = values.copy()
    big[299] = np.finfo(dtype).max if big.dtype.kind == "f" else np.iinfo(dtype).max
    data = payload.encode_named({"w": big}, "dict")
    assert (_landed(data, template, 7) is None) == (_whole(data, template) is None)  # refused by both or passed by both


BAD = {"float32": [np.nan, np.inf, -np.inf, 3e38, -3e38], "float64": [np.nan, -np.inf, 1e308, -2e307], "float16": [np.nan, np.inf, -np.inf]}


@pytest.mark.parametrize("dtype", sorted(BAD))
@pytest.mark.parametrize("chunk", [5, 7, 1001, 4097])
def test_nan_inf_and_overflow_anywhere_even_cut_by_a_chunk_border_are_never_passed(dtype: str, chunk: int) -> None:
    """A bad value first, last, and at every element a chunk's border cuts (chunk sizes
    that are not a multiple of the element): the landed check gives no verdict, the whole
    check refuses, and a template of float32 for a float64 update too."""
    n = 3000
    good = payload.encode_named({"w": _values(dtype, n), "z": _values(dtype, 3, 1)}, "dict")
    start = len(good) - n * np.dtype(dtype).itemsize - 3 * np.dtype(dtype).itemsize  # where w's data begins
    size = np.dtype(dtype).itemsize
    borders = [at for at in range(0, len(good), chunk) if start < at < start + n * size and (at - start) % size]
    cut = sorted({0, n - 1} | {(at - start) // size for at in borders})
    assert len(cut) > 2
    for bad in BAD[dtype]:
        for i in cut[:40]:
            values = _values(dtype, n)
            values[i] = bad
            data = payload.encode_named({"w": values, "z": _values(dtype, 3, 1)}, "dict")
            template = payload.describe(data)
            assert _whole(data, template) is None, (bad, i)
            assert _landed(data, template, chunk) is None, (bad, i, chunk)


def test_values_in_the_header_region_are_not_checked_and_a_long_header_may_span_chunks() -> None:
    """The header is JSON: bytes 0x7f 0x7f 0x7f 0x7f there would read as 3.4e38 in float32.
    A header longer than a chunk is collected across chunks before any value is read."""
    values = np.ones(1000, np.float32)
    data = payload.encode_named({"w": values}, "dict", {"note": "\x7f" * 5000})
    assert b"\x7f\x7f\x7f\x7f" in data[:5100]
    template = payload.describe(data)
    for chunk in (3, 64, 4097, len(data)):
        landed = _landed(data, template, chunk)
        assert landed is not None and 1.0 <= landed["w"] <= math.sqrt(1000) * 1.25


def test_out_of_order_missing_or_extra_bytes_and_foreign_headers_give_no_verdict() -> None:
    data = payload.encode_named({"w": np.ones(1000, np.float32)}, "dict")
    template = payload.describe(data)
    check = LandingCheck(template, len(data))
    check.feed(0, data[:100])
    check.feed(200, data[200:])  # a gap
    assert check.verdict() is None
    check = LandingCheck(template, len(data))
    check.feed(0, data[:-1])  # the last byte missing
    assert check.verdict() is None
    assert _landed(data, {"v": TensorSpec("float32", (1000,))}, 64) is None  # a name the model lacks
    assert _landed(b"\xff" * 64, template, 8) is None  # no header at all
    assert _landed(data[:8] + b"[" + data[9:], template, 64) is None  # not JSON
    check = LandingCheck(template, len(data) - 4)
    check.feed(0, data)  # more than announced
    assert check.verdict() is None


def test_tensors_stored_in_another_order_than_their_header_lists_them() -> None:
    arrays = {"z": np.full(10, 2.0, np.float32), "a": np.arange(7, dtype=np.int32), "m": np.full(5, -4.0, np.float64)}
    data = payload.encode_named(arrays, "dict")
    template = payload.describe(data)
    landed = _landed(data, template, 5)
    assert landed is not None and _whole(data, template) is not None
    assert 2.0 <= landed["z"] < 2.0 * math.sqrt(10) * 1.25 and 4.0 <= landed["m"] < 4.0 * math.sqrt(5) * 1.25
    assert landed["a"] == _whole(data, template)["a"] == 2.0**31  # the type's extent: an int32 always fits
    assert not math.isnan(sum(landed.values()))


@pytest.mark.parametrize(("dtype", "target", "value", "said"), [("float64", "float32", 1e39, "1e+39"), ("float32", "float32", 3e37, "3e+37"), ("float64", "float64", -1.5e307, "1.5e+307")])
def test_a_refusal_prints_the_exact_value_not_a_bound(dtype: str, target: str, value: float, said: str) -> None:
    """The peaks that pass are bounds (the root of a sum of squares, up to sqrt(n) times the
    largest value); a refusal is decided, and printed, from the exact values: the landed
    check gives no verdict, and the whole check names the value itself."""
    values = np.full(4096, value, dtype)
    data = payload.encode_named({"w": values}, "dict")
    template = {"w": TensorSpec(target, (4096,))}
    assert _landed(data, template, 1 << 20) is None
    with pytest.raises(UpdateRejected) as info:
        check_values(template, payload.views(data))
    assert said in str(info.value) and "'w'" in str(info.value), info.value
