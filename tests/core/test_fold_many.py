"""Folding several checked updates in one pass over the sums (issue 17 #2): `fold_many_into`
and `FedAvg.add_many` give the sums of folding each in turn, bit for bit."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest

from scaleout.core.aggregators.fedavg import FedAvg
from scaleout.core.aggregators.fold import (
    FOLD_BLOCK,
    STRETCH,
    acc_dtype,
    fold_into,
    fold_many_into,
)
from scaleout.core.errors import UpdateRejected
from scaleout.core.payload import TensorSpec


def _updates(dtype: str, n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return [(rng.standard_normal(n) * 10 ** rng.uniform(-3, 3)).astype(dtype) for _ in range(k)]
    if dtype == "bool":
        return [rng.integers(0, 2, n).astype(bool) for _ in range(k)]
    return [rng.integers(0, 100, n).astype(dtype) for _ in range(k)]


@pytest.mark.parametrize("n", [0, 1, FOLD_BLOCK - 1, FOLD_BLOCK, 2 * FOLD_BLOCK + 17])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "uint8", "bool"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_fold_many_into_is_fold_into_of_each_in_turn_bit_for_bit(n: int, dtype: str, k: int) -> None:
    xs = _updates(dtype, n, k, seed=n + k)
    ws = [1.0 + 0.37 * i for i in range(k)]  # weights that do not round evenly
    start = np.random.default_rng(1).standard_normal(n).astype(acc_dtype(dtype))
    want = start.copy()
    for x, w in zip(xs, ws, strict=True):
        fold_into(want, x, w)
    got = start.copy()
    fold_many_into(got, xs, ws)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    exact = start.astype(np.float64) + sum(w * x.astype(np.float64) for x, w in zip(xs, ws, strict=True))
    np.testing.assert_allclose(got, exact, rtol=1e-5 if got.dtype == np.float32 else 1e-12, atol=1e-3 if got.dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("block", [1 << 14, 1 << 15, 1 << 17, 1 << 18])
def test_fold_many_into_any_block_size_gives_the_same_sums(block: int) -> None:
    xs = _updates("float32", 3 * block + 5, 4)
    want = np.zeros(xs[0].shape, np.float32)
    for i, x in enumerate(xs):
        fold_into(want, x, i + 0.5)
    got = np.zeros_like(want)
    fold_many_into(got, xs, [i + 0.5 for i in range(4)], np.empty(block, np.float32), block=block)
    np.testing.assert_array_equal(got, want)


def test_fold_many_into_tells_each_update_each_stretch_once_in_order() -> None:
    n = 2 * STRETCH + 5
    xs = [np.ones(n, np.float32), np.full(n, 2.0, np.float32)]
    told: list[list[tuple[int, int]]] = [[], []]

    def hook(i: int) -> Callable[[np.ndarray], None]:
        def read(stretch: np.ndarray) -> None:
            told[i].append(((stretch.ctypes.data - xs[i].ctypes.data) // 4, stretch.size))
        return read

    acc = np.zeros(n, np.float32)
    fold_many_into(acc, xs, [1.0, 1.0], reads=[hook(0), hook(1)])
    for spans in told:
        assert spans[0][0] == 0 and sum(size for _, size in spans) == n
        assert all(a + s == b for (a, s), (b, _) in itertools.pairwise(spans))
    assert (acc == 3.0).all()


TEMPLATE = {
    "w": TensorSpec("float32", (3, FOLD_BLOCK // 2 + 7)),
    "h": TensorSpec("float16", (40,)),
    "d": TensorSpec("float64", (5, 5)),
    "steps": TensorSpec("int64", (3,)),
    "mask": TensorSpec("bool", (9,)),
    "empty": TensorSpec("float32", (0, 4)),
}


def _update(seed: int, template: dict[str, TensorSpec] = TEMPLATE) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in template.items():
        if np.dtype(spec.dtype).kind == "f":
            out[name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            out[name] = rng.integers(0, 2, spec.shape).astype(bool)
        else:
            out[name] = rng.integers(-1000, 1000, spec.shape).astype(spec.dtype)
    return out


def _same(a: FedAvg, b: FedAvg) -> None:
    pa, pb = a.partial(), b.partial()
    assert pa.sums.keys() == pb.sums.keys()
    for name in pa.sums:
        assert pa.sums[name].dtype == pb.sums[name].dtype, name
        np.testing.assert_array_equal(pa.sums[name], pb.sums[name], err_msg=name)
    assert (pa.weight, pa.count, pa.contributors) == (pb.weight, pb.count, pb.contributors)
    assert a._ceiling == b._ceiling


@pytest.mark.parametrize("batches", [[1, 1, 1, 1, 1, 1, 1], [7], [2, 5], [3, 3, 1], [8]])
def test_add_many_equals_add_one_at_a_time_bit_for_bit(batches: list[int]) -> None:
    updates = [_update(i) for i in range(sum(batches))]
    weights = [1.5, 3.0, 0.25, 7.0, 2.0, 11.0, 0.1, 5.0][: len(updates)]
    one, many = FedAvg(TEMPLATE), FedAvg(TEMPLATE)
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        one.add(one.check(u), w, f"c{i}")
    i = 0
    for size in batches:
        items = [(many.check(updates[j]), weights[j], f"c{j}") for j in range(i, i + size)]
        assert many.add_many(items) == [None] * size
        i += size
    _same(one, many)
    # and the plain reference: the weighted mean within rounding
    total = sum(weights)
    for name, value in many.result().items():
        if np.dtype(TEMPLATE[name].dtype).kind == "f":
            want = sum(w * u[name].astype(np.float64) for u, w in zip(updates, weights, strict=True)) / total
            np.testing.assert_allclose(value.astype(np.float64), want, rtol=2e-3 if TEMPLATE[name].dtype == "float16" else 1e-5, atol=1e-3)


FLOATS = {"w": TensorSpec("float32", (2, FOLD_BLOCK + 7)), "d": TensorSpec("float64", (5,)), "e": TensorSpec("float16", (0,))}


@pytest.mark.parametrize("one_pass", [True, False])
def test_add_many_refuses_only_the_bad_ones_and_leaves_no_trace_of_them(one_pass: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each item is refused for what `add` would refuse it for, given the items before it;
    the others are folded, and the sums are those of `add` of each (bit for bit), whether
    the batch is folded in one pass or (a sum near its limit) one at a time."""
    agg, ref = FedAvg(FLOATS), FedAvg(FLOATS)
    for a in (agg, ref):
        a.add(a.check(_update(0, FLOATS)), 1.0, "c0")
    good = [agg.check(_update(i, FLOATS)) for i in range(1, 4)]
    zero = agg.check({name: np.zeros(spec.shape, spec.dtype) for name, spec in FLOATS.items()})  # peaks 0: any weight is safe
    items = [
        (good[0], 2.0, "c1"),
        (good[1], 3.0, "c0"),  # already in
        (good[1], 0.0, "c2"),  # weight
        (good[2], 4.0, "c1"),  # a duplicate within the batch
        (zero, 1e308, "c3"),
        (zero, 1e308, "c4"),  # the total weight overflows
        (good[2], float("nan"), "c5"),
        (good[1], 5.0, ""),
        (good[2], 6.0, "c6"),
    ]
    if one_pass:
        monkeypatch.setattr(FedAvg, "_try_add", lambda *a: pytest.fail("folded one at a time"))
    else:
        items.append((good[0], 1e300, "c7"))  # its sums could outgrow float32: all one at a time, promoted to float64 at c7
    outcomes = agg.add_many(items)
    assert [o is None for o in outcomes] == [True, False, False, False, True, False, False, False, True] + ([] if one_pass else [True])
    assert agg.partial().sums["w"].dtype == (np.float32 if one_pass else np.float64)
    messages = [str(o) for o in outcomes if o is not None]
    assert "duplicate" in messages[0] and "weight must be" in messages[1] and "duplicate" in messages[2]
    assert "total weight overflow" in messages[3] and "weight must be" in messages[4] and "non-empty" in messages[5]
    assert np.isfinite(agg.partial().sums["w"]).all()  # weight 1e308 on a zero update: no 0 * inf
    for item in items:  # the same outcomes as add, one at a time
        try:
            ref.add(*item)
        except UpdateRejected:
            pass
    _same(agg, ref)


def test_add_many_near_the_accumulators_limit_goes_one_at_a_time_and_stays_exact() -> None:
    """A batch that could take a float32 sum beyond SAFE_SUM: promoted to float64 at the very
    update `add` would promote it, so the sums are still bit for bit add's."""
    template = {"w": TensorSpec("float32", (FOLD_BLOCK + 3,))}
    big = {"w": np.full(FOLD_BLOCK + 3, 2e37, np.float32)}
    small = {"w": np.linspace(-1, 1, FOLD_BLOCK + 3, dtype=np.float32)}
    one, many = FedAvg(template), FedAvg(template)
    seq = [(small, 1.5), (big, 1.0), (small, 2.5), (big, 2.0)]
    for i, (u, w) in enumerate(seq):
        one.add(one.check(u), w, f"c{i}")
    assert many.add_many([(many.check(u), w, f"c{i}") for i, (u, w) in enumerate(seq)]) == [None] * 4
    assert many.partial().sums["w"].dtype == np.float64
    _same(one, many)


def test_add_many_of_nothing_and_of_empty_tensors() -> None:
    template = {"e": TensorSpec("float32", (0,)), "f": TensorSpec("int8", (0, 3))}
    agg = FedAvg(template)
    assert agg.add_many([]) == [] and agg.count == 0
    items = [(agg.check({"e": np.zeros(0, np.float32), "f": np.zeros((0, 3), np.int8)}), 2.0, f"c{i}") for i in range(3)]
    assert agg.add_many(items) == [None] * 3
    assert agg.count == 3 and agg.partial().weight == 6.0
    assert agg.result()["e"].shape == (0,) and agg.result()["f"].shape == (0, 3)


def test_add_many_folds_converted_updates_like_add() -> None:
    """A float64 update for a float32 model is cast by the fold, as `add` casts it."""
    template = {"w": TensorSpec("float32", (FOLD_BLOCK + 9,))}
    rng = np.random.default_rng(3)
    updates = [{"w": rng.standard_normal(FOLD_BLOCK + 9)} for _ in range(3)]  # float64
    one, many = FedAvg(template), FedAvg(template)
    for i, u in enumerate(updates):
        one.add(one.check(u), 1.0 + i / 3, f"c{i}")
    many.add_many([(many.check(u), 1.0 + i / 3, f"c{i}") for i, u in enumerate(updates)])
    _same(one, many)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [0.0, 1e-300, 1e-40, 1e-20, 1e-10, 1e-3, 1.0, 1e10, 1e18, 1e30])
def test_peak_bound_is_never_below_the_largest_magnitude(dtype: str, scale: float) -> None:
    from scaleout.core.aggregators.fold import BLOCK, DOT_BLOCK, amax, peak_bound

    rng = np.random.default_rng(int(np.log10(scale + 1e-320) + 400))
    with np.errstate(under="ignore", over="ignore"):
        x = (rng.standard_normal(3 * BLOCK + 11) * scale).astype(dtype)
    x[BLOCK + 5] = np.float64(scale * 7.5).astype(dtype)  # one clear maximum among the rest
    bound, exact = peak_bound(x), amax(x)
    assert bound >= exact or not np.isfinite(bound), (bound, exact)
    if scale <= 1e10 or dtype == "float64":  # float32 squares of 1e18 overflow: inf, and amax decides
        assert np.isfinite(bound) and bound <= 2 * np.sqrt(min(DOT_BLOCK, x.size)) * exact  # sqrt(n) x the peak at most
    if scale < (1e-15 if dtype == "float32" else 1e-145):
        assert bound == exact  # tiny values (squares lost to underflow): the exact peak


def test_peak_bound_says_nan_and_inf_and_check_values_decides_as_with_the_exact_peak() -> None:
    from scaleout.core.aggregators.fold import BLOCK, peak_bound
    from scaleout.core.payload import check_values

    x = np.ones(2 * BLOCK, np.float32)
    x[BLOCK + 1] = np.nan
    assert np.isnan(peak_bound(x))
    x[BLOCK + 1] = -np.inf
    assert peak_bound(x) == np.inf
    spec = {"w": TensorSpec("float32", (2 * BLOCK,))}
    # beyond float32's headroom (2.1e37) but whose bound is inf (squares overflow): decided exactly
    for value, refused in [(2e37, False), (2.2e37, True), (1e20, False), (-3e38, True)]:
        y = np.zeros(2 * BLOCK, np.float32)
        y[7] = value
        try:
            peaks = check_values(spec, {"w": y})
        except UpdateRejected:
            assert refused, value
        else:
            assert not refused and peaks["w"] >= abs(float(y[7])), value
    # a float64 update for a float32 model: beyond float32's range, refused; within, passes
    spec64 = {"w": TensorSpec("float32", (3,))}
    with pytest.raises(UpdateRejected, match="outside the model's float32 finite range"):
        check_values(spec64, {"w": np.array([1.0, 1e39, 0.0])})
    assert check_values(spec64, {"w": np.array([1.0, -2e37, 0.0])})["w"] >= 2e37


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_add_many_with_extreme_weights_and_repeats_among_good_ones_is_add_in_turn(dtype: str) -> None:
    """Batches mixing good updates with weights that overflow the total (1e308 twice), are not
    numbers > 0 (-1, NaN, 10**400, 0), push a sum past float32 (a promotion on the way), and
    contributors named twice, batch after batch on one aggregator: each outcome, the sums (bit
    for bit, and their dtype), the weight, the contributors and the ceilings are those of
    `add` one at a time; a refused update leaves no trace."""
    import random
    import warnings

    rng = random.Random(dtype)
    template = {"a": TensorSpec(shape=(300,), dtype=dtype), "b": TensorSpec(shape=(7, 3), dtype=dtype)}
    for trial in range(25):
        ours, theirs = FedAvg(template), FedAvg(template)
        n = 0
        for _ in range(4):
            items = []
            for _ in range(rng.randrange(0, 9)):
                n += 1
                scale = rng.choice([1, 1e3, 1e18, 1e30, 3e37, 1e300])
                with warnings.catch_warnings(), np.errstate(over="ignore"):
                    warnings.simplefilter("ignore")
                    update = {k: (np.random.default_rng(trial * 100 + n).standard_normal(s.shape) * scale).astype(dtype) for k, s in template.items()}
                try:
                    checked = ours.check(update)
                except UpdateRejected:  # inf after the cast, say: refused before any fold
                    continue
                weight = rng.choice([1, 3.5, 1e30, 1e300, 1e308, 1.7e308, -1, float("nan"), 10**400, 0, 2.0**-1074])
                items.append((checked, weight, rng.choice([f"c{n}", "c1", f"c{n}"])))
            got = [None if r is None else str(r) for r in ours.add_many(items)]
            want: list[str | None] = []
            for checked, weight, who in items:
                try:
                    theirs.add(checked, weight, who)
                    want.append(None)
                except UpdateRejected as exc:
                    want.append(str(exc))
            assert got == want
            assert (ours._weight, ours._contributors, ours._ceiling) == (theirs._weight, theirs._contributors, theirs._ceiling)
            for name in template:
                assert ours._sums[name].dtype == theirs._sums[name].dtype and ours._sums[name].tobytes() == theirs._sums[name].tobytes(), name
