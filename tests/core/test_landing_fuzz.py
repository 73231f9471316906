"""Fuzz (attack on issue 17 #2): `LandingCheck`'s verdict against `check_values` on the same
bytes. Random tensors of random dtypes (converted within their kind, as `check_dtypes`
allows), random bad values (NaN, inf, beyond the model dtype's range or headroom) at random
places, chunk borders included, fed in chunks of random sizes. A verdict that passes must
be one the whole check passes, with peaks that bound every value (a fold trusts them)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.aggregators.landing import LandingCheck
from scaleout.core.errors import UpdateRejected
from scaleout.core.payload import TensorSpec, check_values

FLOATS = ["float16", "float32", "float64"]
INTS = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


def _bad_for(rng: np.random.Generator, have: np.dtype, want: np.dtype) -> list[object]:
    if have.kind == "f":
        bad: list[object] = [np.nan, np.inf, -np.inf]
        big = float(np.finfo(have).max)
        for v in (float(np.finfo(want).max) * 2, payload.headroom(want) * 1.5, payload.headroom(want) * 0.99):
            if v <= big:
                bad += [v, -v]
        return bad
    info, target = np.iinfo(have), np.iinfo(want)
    bad = [info.max, info.min]
    if target.max < info.max:
        bad.append(target.max + 1)
    if target.min > info.min:
        bad.append(target.min - 1)
    return bad


def _case(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, TensorSpec]]:
    arrays, template = {}, {}
    for i in range(int(rng.integers(1, 5))):
        kind = FLOATS if rng.random() < 0.6 else INTS
        have, want = np.dtype(rng.choice(kind)), np.dtype(rng.choice(kind))
        n = int(rng.choice([0, 1, 3, 1000, 70_000, 140_000]))
        if have.kind == "f":
            a = (rng.standard_normal(n) * float(rng.choice([1e-3, 1, 100]))).astype(have)
        else:
            lo, hi = max(np.iinfo(have).min, -100), min(np.iinfo(have).max, 100)
            a = rng.integers(lo, hi, n, endpoint=True).astype(have)
        if n and rng.random() < 0.5:
            at = int(rng.choice([0, n - 1, n // 2, int(rng.integers(0, n))]))
            value = rng.choice(np.array(_bad_for(rng, have, want), dtype=object))
            with np.errstate(over="ignore", invalid="ignore"):
                a[at] = value
        name = f"t{i}"
        arrays[name] = a
        template[name] = TensorSpec(want.name, a.shape)
    return arrays, template


def _feed(data: bytes, template: dict[str, TensorSpec], rng: np.random.Generator) -> dict[str, float] | None:
    check = LandingCheck(template, len(data))
    view, at = memoryview(data), 0
    while at < len(data):
        step = int(rng.choice([1, 2, 3, 5, 7, 8, 255, 4096, 65_537, 256 << 10]))
        check.feed(at, view[at : at + step])
        at += step
    return check.verdict()


@pytest.mark.parametrize("seed", range(300))
def test_a_passing_landing_verdict_is_one_the_whole_check_gives(seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays, template = _case(rng)
    data = payload.encode_named(arrays, "dict")
    landed = _feed(data, template, rng)
    try:
        whole: dict[str, float] | None = check_values(template, payload.views(data))
    except UpdateRejected:
        whole = None
    if landed is None:
        return  # None is always allowed: the whole check decides
    assert whole is not None, f"landing passed what the whole check refuses: {[(k, v.dtype, template[k].dtype) for k, v in arrays.items()]}"
    assert landed.keys() == whole.keys()
    for name, values in arrays.items():
        if values.size:
            exact = max(abs(float(values.max())), abs(float(values.min())))
            assert math.isfinite(landed[name]) and landed[name] >= exact, (name, values.dtype, landed[name], exact)


@pytest.mark.parametrize("seed", range(40))
def test_a_clean_update_of_the_models_dtypes_passes_as_it_lands(seed: int) -> None:
    # The other direction: the fast path is taken for clean data, not only declined.
    rng = np.random.default_rng(1000 + seed)
    arrays = {f"t{i}": (rng.standard_normal(int(rng.integers(1, 90_000))) ).astype(rng.choice(FLOATS)) for i in range(3)}
    data = payload.encode_named(arrays, "dict")
    template = payload.describe(data)
    assert _feed(data, template, rng) is not None
