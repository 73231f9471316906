from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from scaleout.core.aggregators import (
    AGGREGATORS,
    FedAvg,
    Partial,
    decode_partial,
    encode_partial,
    get_aggregator,
)
from scaleout.core.aggregators.fold import BLOCK, acc_dtype
from scaleout.core.errors import ConfigError, ModelMismatchError, PayloadError, UpdateRejected
from scaleout.core.payload import TensorSpec, decode, describe, encode, encode_named, layout_of

MODEL: dict[str, np.ndarray] = {
    "w": np.zeros((3, 4), np.float32),
    "b": np.zeros(5, np.float64),
    "h": np.zeros((2, 2), np.float16),
    "s": np.array(0.0, np.float32),
}
TEMPLATE = describe(encode(MODEL))
RTOL = {"float64": 1e-12, "float32": 1e-6, "float16": 1e-3}


def make_updates(n: int, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    rng = np.random.default_rng(seed)
    updates = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in MODEL.items()} for _ in range(n)]
    weights = [float(w) for w in rng.integers(1, 500, size=n)]
    return updates, weights


def reference_mean(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Plain numpy weighted average, computed independently of the aggregator."""
    return {k: np.average(np.stack([u[k].astype(np.float64) for u in updates]), axis=0, weights=weights) for k in MODEL}


def assert_matches(result: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(result) == set(expected)
    for name, spec in TEMPLATE.items():
        assert result[name].dtype == np.dtype(spec.dtype) and result[name].shape == spec.shape
        np.testing.assert_allclose(result[name].astype(np.float64), expected[name], rtol=RTOL[spec.dtype], atol=1e-6)


def flat(updates: list[dict[str, np.ndarray]], weights: list[float]) -> FedAvg:
    agg = FedAvg(TEMPLATE)
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        agg.add(update, weight, f"client-{i}")
    return agg


def test_fedavg_matches_numpy_weighted_average() -> None:
    updates, weights = make_updates(7)
    agg = flat(updates, weights)
    assert agg.count == 7
    assert_matches(agg.result(), reference_mean(updates, weights))


def test_fedavg_differs_from_unweighted_mean() -> None:
    # Proves the weights matter, so the reference test above can fail.
    updates, _ = make_updates(3)
    result = flat(updates, [1.0, 1.0, 1000.0]).result()
    unweighted = np.mean([u["b"] for u in updates], axis=0)
    assert not np.allclose(result["b"], unweighted)
    np.testing.assert_allclose(result["b"], np.average([u["b"] for u in updates], axis=0, weights=[1, 1, 1000]))


def test_two_stage_equals_flat() -> None:
    updates, weights = make_updates(10, seed=4)
    reducer = FedAvg(TEMPLATE)
    start = 0
    for size in (1, 3, 6):  # uneven client splits across three combiners
        combiner = FedAvg(TEMPLATE)
        for i in range(start, start + size):
            combiner.add(updates[i], weights[i], f"client-{i}")
        reducer.add_partial(decode_partial(encode_partial(combiner.partial())))
        start += size
    flat_agg = flat(updates, weights)
    two, one = reducer.partial(), flat_agg.partial()
    assert two.weight == pytest.approx(one.weight, rel=1e-15) == sum(weights)
    assert reducer.count == 10 and sorted(two.contributors) == sorted(one.contributors)
    for name in TEMPLATE:
        # float16/float32 tensors are summed in float32 (see fold.py for the error bound)
        assert two.sums[name].dtype == one.sums[name].dtype == acc_dtype(TEMPLATE[name].dtype)
        tol = 1e-12 if two.sums[name].dtype == np.float64 else 1e-6
        np.testing.assert_allclose(two.sums[name], one.sums[name], rtol=tol, atol=tol * np.abs(one.sums[name]).max())
    assert_matches(reducer.result(), reference_mean(updates, weights))
    for name, spec in TEMPLATE.items():
        np.testing.assert_allclose(
            reducer.result()[name].astype(np.float64),
            flat_agg.result()[name].astype(np.float64),
            rtol=RTOL[spec.dtype],
        )


def test_integer_tensors_are_rounded_and_keep_dtype() -> None:
    template = {"i": TensorSpec("int32", (4,)), "u": TensorSpec("uint8", (3,)), "t": TensorSpec("bool", (4,))}
    updates: list[dict[str, np.ndarray]] = [
        {"i": np.array([1, 2, -3, 10], np.int32), "u": np.array([0, 255, 10], np.uint8),
         "t": np.array([1, 1, 0, 0], bool)},
        {"i": np.array([2, 2, -4, 11], np.int32), "u": np.array([1, 255, 13], np.uint8),
         "t": np.array([0, 1, 1, 0], bool)},
    ]
    weights = [3.0, 1.0]
    agg = FedAvg(template)
    for i, update in enumerate(updates):
        agg.add(update, weights[i], f"c{i}")
    result = agg.result()
    for name in template:
        assert result[name].dtype == np.dtype(template[name].dtype)
        mean = np.average(np.stack([u[name].astype(np.float64) for u in updates]), axis=0, weights=weights)
        expected = (mean >= 0.5) if name == "t" else np.rint(mean).astype(template[name].dtype)
        np.testing.assert_array_equal(result[name], expected)
    np.testing.assert_array_equal(result["i"], [1, 2, -3, 10])  # 1.25 -> 1, -3.25 -> -3, 10.25 -> 10
    np.testing.assert_array_equal(result["t"], [True, True, False, False])


def test_integer_results_at_the_dtype_edges_keep_dtype_without_wrapping() -> None:
    agg = FedAvg({"u": TensorSpec("uint8", (2,)), "big": TensorSpec("int64", (1,))})
    agg.add({"u": np.array([255, 0], np.uint16), "big": np.array([np.iinfo(np.int64).max])}, 1.0, "a")
    agg.add({"u": np.array([255, 0], np.uint8), "big": np.array([np.iinfo(np.int64).max])}, 3.0, "b")
    result = agg.result()
    np.testing.assert_array_equal(result["u"], np.array([255, 0], np.uint8))
    assert result["big"].dtype == np.int64 and result["big"][0] > 2**62  # no wrap-around to negative


def test_float64_update_for_float32_model_is_accepted() -> None:
    updates, weights = make_updates(2)
    widened = [{k: v.astype(np.float64) for k, v in u.items()} for u in updates]
    agg = flat(widened, weights)
    assert agg.result()["w"].dtype == np.float32
    assert_matches(agg.result(), reference_mean(widened, weights))


def assert_unchanged(before: Partial, agg: FedAvg) -> None:
    after = agg.partial()
    assert (after.weight, after.count, after.contributors) == (before.weight, before.count, before.contributors)
    for name in before.sums:
        np.testing.assert_array_equal(after.sums[name], before.sums[name])


def test_nan_update_refused_and_state_unchanged() -> None:
    updates, weights = make_updates(2)
    agg = FedAvg(TEMPLATE)
    agg.add(updates[0], weights[0], "good")
    before = agg.partial()
    poisoned = {k: v.copy() for k, v in updates[1].items()}
    poisoned["h"][1, 1] = np.nan
    with pytest.raises(UpdateRejected, match="'h'"):
        agg.add(poisoned, weights[1], "bad")
    assert_unchanged(before, agg)
    agg.add(updates[1], weights[1], "bad")  # the refused contributor was not recorded
    assert_matches(agg.result(), reference_mean(updates, weights))


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda u: {**u, "w": np.zeros((4, 3), np.float32)}, ModelMismatchError),
        (lambda u: {k: v for k, v in u.items() if k != "s"}, ModelMismatchError),
        (lambda u: {**u, "extra": np.zeros(1)}, ModelMismatchError),
        (lambda u: {**u, "b": np.array(["x"] * 5)}, ModelMismatchError),
        (lambda u: {**u, "b": np.full(5, np.inf)}, UpdateRejected),
    ],
)
def test_bad_update_refused_and_state_unchanged(change, error) -> None:  # type: ignore[no-untyped-def]
    updates, weights = make_updates(2)
    agg = FedAvg(TEMPLATE)
    agg.add(updates[0], weights[0], "first")
    before = agg.partial()
    with pytest.raises(error):
        agg.add(change(updates[1]), weights[1], "second")
    assert_unchanged(before, agg)


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), True, "3"])
def test_bad_weight_refused(weight: object) -> None:
    agg = FedAvg(TEMPLATE)
    with pytest.raises(UpdateRejected, match="weight"):
        agg.add(make_updates(1)[0][0], weight, "c")  # type: ignore[arg-type]
    assert agg.count == 0


def test_duplicate_contributor_counts_once() -> None:
    updates, weights = make_updates(2)
    agg = FedAvg(TEMPLATE)
    agg.add(updates[0], weights[0], "same")
    with pytest.raises(UpdateRejected, match="duplicate"):
        agg.add(updates[1], weights[1], "same")
    assert agg.count == 1
    assert_matches(agg.result(), reference_mean(updates[:1], weights[:1]))


def test_duplicate_contributor_across_partials_refused() -> None:
    updates, weights = make_updates(2)
    first, second = FedAvg(TEMPLATE), FedAvg(TEMPLATE)
    first.add(updates[0], weights[0], "c")
    second.add(updates[1], weights[1], "c")
    reducer = FedAvg(TEMPLATE)
    reducer.add_partial(first.partial())
    with pytest.raises(UpdateRejected, match="duplicate"):
        reducer.add_partial(second.partial())
    assert reducer.count == 1


def test_empty_partial_is_a_no_op_and_empty_result_refused() -> None:
    reducer = FedAvg(TEMPLATE)
    reducer.add_partial(FedAvg(TEMPLATE).partial())  # a combiner whose clients all failed
    assert reducer.count == 0
    with pytest.raises(UpdateRejected, match="no updates to aggregate"):
        reducer.result()


def test_inconsistent_partial_refused() -> None:
    partial = FedAvg(TEMPLATE).partial()
    with pytest.raises(UpdateRejected):
        FedAvg(TEMPLATE).add_partial(Partial(partial.sums, 5.0, 2, ["only-one"]))


def test_aggregator_keeps_no_reference_to_updates() -> None:
    agg = FedAvg(TEMPLATE)
    updates, weights = make_updates(1)
    ref = weakref.ref(updates[0]["w"])
    agg.add(updates[0], weights[0], "c")
    del updates
    gc.collect()
    assert ref() is None


def test_partial_round_trip() -> None:
    updates, weights = make_updates(3)
    partial = flat(updates, weights).partial()
    decoded = decode_partial(encode_partial(partial))
    assert decoded.weight == partial.weight and decoded.count == 3
    assert decoded.contributors == partial.contributors
    for name in TEMPLATE:
        assert decoded.sums[name].dtype == acc_dtype(TEMPLATE[name].dtype)  # sent as accumulated
        np.testing.assert_array_equal(decoded.sums[name], partial.sums[name])
    listed = Partial({"0": np.ones(2), "1": np.full(3, 2.0)}, 0.1 + 0.2, 1, ['c "quoted"'])
    back = decode_partial(encode_partial(listed, "list"))
    assert back.weight == 0.1 + 0.2 and back.contributors == ['c "quoted"']
    np.testing.assert_array_equal(back.sums["1"], np.full(3, 2.0))


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {"scaleout.weight": "1.0", "scaleout.count": "1"},
        {"scaleout.weight": "x", "scaleout.count": "1", "scaleout.contributors": '["a"]'},
        {"scaleout.weight": "nan", "scaleout.count": "1", "scaleout.contributors": '["a"]'},
        {"scaleout.weight": "1.0", "scaleout.count": "1.5", "scaleout.contributors": '["a"]'},
        {"scaleout.weight": "1.0", "scaleout.count": "2", "scaleout.contributors": '["a"]'},
        {"scaleout.weight": "1.0", "scaleout.count": "1", "scaleout.contributors": "[1]"},
        {"scaleout.weight": "1.0", "scaleout.count": "1", "scaleout.contributors": "{not json"},
    ],
)
def test_decode_partial_refuses_bad_metadata(metadata: dict[str, str] | None) -> None:
    with pytest.raises(PayloadError):
        decode_partial(encode({"w": np.zeros(2)}, metadata=metadata))


def test_decode_partial_refuses_non_float_sums_and_garbage() -> None:
    meta = {"scaleout.weight": "1.0", "scaleout.count": "1", "scaleout.contributors": '["a"]'}
    assert decode_partial(encode({"w": np.zeros(2)}, metadata=meta)).count == 1
    assert decode_partial(encode({"w": np.zeros(2, np.float32)}, metadata=meta)).sums["w"].dtype == np.float32
    for dtype in (np.float16, np.int64):
        with pytest.raises(PayloadError, match="expected float32 or float64"):
            decode_partial(encode({"w": np.zeros(2, dtype)}, metadata=meta))
    with pytest.raises(PayloadError):
        decode_partial(b"\x00" * 64)


def test_registry() -> None:
    assert AGGREGATORS["fedavg"] is FedAvg
    agg = get_aggregator("fedavg", TEMPLATE)
    assert isinstance(agg, FedAvg) and agg.name == "fedavg"
    with pytest.raises(ConfigError) as info:
        get_aggregator("fedsgdx", TEMPLATE)
    assert info.value.key == "aggregator"
    assert str(info.value).startswith("aggregator: unknown aggregator 'fedsgdx'; choose one of: bulyan, dpfedavg, fedadagrad, fedadam, fedavg, fedavgm, fedmedian, fedprox")


def test_update_whose_weighting_overflows_is_refused_and_state_kept() -> None:
    from scaleout.core.aggregators import FedAvg

    agg = FedAvg({"w": TensorSpec("float64", (2,))})
    agg.add({"w": np.array([1.0, 2.0])}, 1.0, "good")
    with pytest.raises(UpdateRejected, match="overflow"):
        agg.add({"w": np.array([1e300, 1.0])}, 1e10, "huge")
    with pytest.raises(UpdateRejected):
        agg.add({"w": np.array([1.0, 1.0])}, 10**400, "absurd")
    assert agg.count == 1
    np.testing.assert_allclose(agg.result()["w"], [1.0, 2.0])


def test_update_overflowing_in_a_later_tensor_leaves_every_tensor_untouched() -> None:
    # "a" alone would fit; "b" overflows: neither sum may change, nor the weight.
    agg = FedAvg({"a": TensorSpec("float64", (2,)), "b": TensorSpec("float64", (2,))})
    agg.add({"a": np.array([1.0, 2.0]), "b": np.array([1e300, 3.0])}, 1.0, "good")
    before = agg.partial()
    with pytest.raises(UpdateRejected, match="overflow"):
        agg.add({"a": np.array([5.0, 6.0]), "b": np.array([1e300, 1.0])}, 1e10, "huge")
    assert_unchanged(before, agg)
    agg.add({"a": np.array([3.0, 4.0]), "b": np.array([1.0, 5.0])}, 1.0, "second")
    np.testing.assert_allclose(agg.result()["a"], [2.0, 3.0])
    np.testing.assert_allclose(agg.result()["b"], [5e299 + 0.5, 4.0])



# -- values the model's dtype cannot hold ---------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    ("dtype", "value", "why"),
    [
        ("float32", np.float64(1e300), "outside the model's float32 finite range"),
        ("float32", np.float64(-1e39), "outside the model's float32 finite range"),
        ("float16", np.float64(1e6), "outside the model's float16 finite range"),
        ("float16", np.float32(70000.0), "outside the model's float16 finite range"),
        ("float32", np.float16(np.inf), "NaN or inf"),
        ("float32", np.float64(np.nan), "NaN or inf"),
        ("int32", np.int64(2**40), "outside the model's int32 range"),
        ("int32", np.float64(1e20), "dtype float64 is float, the model's int32 is integer"),
        ("int32", np.float64(np.nan), "dtype float64 is float, the model's int32 is integer"),
        ("int64", np.uint64(2**63), "outside the model's int64 range"),
        ("uint8", np.int16(-1), "outside the model's uint8 range"),
        ("uint8", np.float64(300.0), "dtype float64 is float, the model's uint8 is integer"),
        ("bool", np.int8(2), "dtype int8 is integer, the model's bool is bool"),
        ("float32", np.int32(1), "dtype int32 is integer, the model's float32 is float"),
        ("float32", np.float64(3e38), "beyond 2.127e+37: too close to the largest float32"),
        ("float16", np.float16(5000.0), "beyond 4094: too close to the largest float16"),
    ],
)
def test_update_outside_the_model_dtype_is_refused_and_state_unchanged(dtype: str, value: np.generic, why: str) -> None:
    agg = FedAvg({"ok": TensorSpec("float32", (2,)), "t": TensorSpec(dtype, (3,))})
    agg.add({"ok": np.ones(2, np.float32), "t": np.ones(3, dtype)}, 2.0, "good")
    before = agg.partial()
    bad = np.ones(3, value.dtype)
    bad[1] = value
    with pytest.raises((UpdateRejected, ModelMismatchError), match="'t'") as info:  # another dtype kind: a mismatch
        agg.add({"ok": np.ones(2, np.float32), "t": bad}, 1.0, "bad")
    assert why in str(info.value)
    assert_unchanged(before, agg)
    result = agg.result()
    assert all(np.isfinite(v.astype(np.float64)).all() for v in result.values())


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        ("float32", F32_MAX / 16),  # float64 values at the edge of the headroom still fit
        ("float32", -F32_MAX / 16),
        ("float16", 65504.0 / 16),
        ("int32", 2**31 - 1),
        ("int32", -(2**31)),
        ("uint8", 255),
    ],
)
def test_wider_update_at_the_dtype_edge_is_accepted(dtype: str, value: float) -> None:
    agg = FedAvg({"t": TensorSpec(dtype, (2,))})
    wide = np.float64 if isinstance(value, float) else np.int64
    agg.add({"t": np.full(2, value, wide)}, 3.0, "a")
    agg.add({"t": np.full(2, value, wide)}, 5.0, "b")
    result = agg.result()["t"]
    assert result.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(result, np.full(2, value).astype(dtype))


def test_partial_that_overflows_the_sum_is_refused_and_state_unchanged() -> None:
    # Two partials of 1.5e308 each are finite; their sum is not.
    template = {"w": TensorSpec("float64", (2,)), "b": TensorSpec("float32", (1,))}
    reducer = FedAvg(template)
    reducer.add_partial(Partial({"w": np.array([1.5e308, 1.0]), "b": np.ones(1)}, 1.0, 1, ["a"]))
    before = reducer.partial()
    with pytest.raises(UpdateRejected, match="overflow"):
        reducer.add_partial(Partial({"w": np.array([1.5e308, 1.0]), "b": np.ones(1)}, 1.0, 1, ["b"]))
    assert_unchanged(before, reducer)
    with pytest.raises(UpdateRejected, match="NaN or inf"):
        reducer.add_partial(Partial({"w": np.array([1.0, np.inf]), "b": np.ones(1)}, 1.0, 1, ["c"]))
    assert_unchanged(before, reducer)
    reducer.add_partial(Partial({"w": np.array([-1.5e308, 3.0]), "b": np.full(1, 3.0)}, 1.0, 1, ["d"]))
    result = reducer.result()
    np.testing.assert_allclose(result["w"], [0.0, 2.0])
    np.testing.assert_allclose(result["b"], [2.0])
    assert reducer.partial().contributors == ["a", "d"]


@pytest.mark.parametrize(
    ("dtype", "sums", "why"),
    [
        ("float32", 1e300, "not finite in float32"),
        ("float16", 1e6, "not finite in float16"),
        ("int32", 1e20, "does not fit int32"),
        ("uint8", -5.0, "does not fit uint8"),
    ],
)
def test_result_that_does_not_fit_the_model_dtype_is_refused(dtype: str, sums: float, why: str) -> None:
    # Partials from a combiner that did not check its updates (an old version): finite in
    # float64, but their mean is no value of the model's dtype.
    reducer = FedAvg({"t": TensorSpec(dtype, (2,))})
    reducer.add_partial(Partial({"t": np.array([sums, 1.0])}, 1.0, 1, ["old"]))
    with pytest.raises(UpdateRejected, match=why) as info:
        reducer.result()
    assert "'t'" in str(info.value)


def test_two_stage_aggregation_keeps_the_models_tensor_order() -> None:
    names = ["layer2.weight", "layer1.weight", "a.bias", "z"]
    seed = encode({n: np.zeros(3, np.float32) for n in names})
    template = describe(seed)
    assert list(template) == names
    partials = []
    for i in range(2):
        combiner = FedAvg(template)
        combiner.add({n: np.full(3, float(i)) for n in sorted(names)}, 1.0, f"c{i}")  # keys in another order
        partials.append(decode_partial(encode_partial(combiner.partial())))
        assert list(partials[-1].sums) == names
    reducer = FedAvg(template)
    for p in partials:
        reducer.add_partial(p)
    result = reducer.result()
    assert list(result) == names
    committed = decode(encode_named(result, layout_of(seed)))
    assert isinstance(committed, dict) and list(committed) == names
    np.testing.assert_array_equal(committed["z"], np.full(3, 0.5, np.float32))


def test_float32_sums_are_promoted_when_their_magnitude_needs_float64() -> None:
    template = {"w": TensorSpec("float32", (3,))}
    agg = FedAvg(template)
    agg.add({"w": np.array([1.0, 2.0, 3.0e30], np.float32)}, 1e6, "a")  # 3e36: float32 still holds it
    assert agg.partial().sums["w"].dtype == np.float32
    agg.add({"w": np.array([1.0, 2.0, 3.0e30], np.float32)}, 1e9, "b")  # 3e39 would overflow float32
    assert agg.partial().sums["w"].dtype == np.float64
    np.testing.assert_allclose(agg.result()["w"], [1.0, 2.0, 3.0e30], rtol=1e-6)
    assert agg.result()["w"].dtype == np.float32


def test_partials_of_either_precision_add_up() -> None:
    template = {"w": TensorSpec("float32", (2,))}
    low, high = FedAvg(template), FedAvg(template)
    low.add({"w": np.array([1.0, -1.0], np.float32)}, 2.0, "a")
    high.add({"w": np.array([1e30, 0.0], np.float32)}, 1e9, "b")  # promoted to float64
    top = FedAvg(template)
    for agg in (low, high):
        top.add_partial(decode_partial(encode_partial(agg.partial())))
    np.testing.assert_allclose(top.result()["w"], [(2.0 + 1e39) / (2.0 + 1e9), -2.0 / (2.0 + 1e9)], rtol=1e-6)


def test_refused_update_leaves_no_trace_even_mid_fold() -> None:
    # The last tensor is refused: none of the first ones may have been folded in.
    template = {"a": TensorSpec("float32", (BLOCK + 3,)), "b": TensorSpec("float64", (4,))}
    agg = FedAvg(template)
    agg.add({"a": np.ones(BLOCK + 3, np.float32), "b": np.ones(4)}, 1.0, "x")
    before = {k: v.copy() for k, v in agg.partial().sums.items()}
    with pytest.raises(UpdateRejected, match="overflows the running sum of tensor 'b'"):
        agg.add({"a": np.ones(BLOCK + 3, np.float32), "b": np.full(4, 1e300)}, 1e10, "y")
    after = agg.partial()
    assert after.count == 1 and after.weight == 1.0
    for k in before:
        np.testing.assert_array_equal(after.sums[k], before[k])


def test_check_then_add_equals_add_and_check_touches_nothing() -> None:
    updates, weights = make_updates(3, seed=9)
    direct, staged = FedAvg(TEMPLATE), FedAvg(TEMPLATE)
    checked = [staged.check(u) for u in updates]  # all checked first, as a combiner does
    assert staged.count == 0 and staged.partial().weight == 0.0
    for i, (u, c, w) in enumerate(zip(updates, checked, weights, strict=True)):
        direct.add(u, w, f"c{i}")
        staged.add(c, w, f"c{i}")
    for name in TEMPLATE:
        np.testing.assert_array_equal(staged.partial().sums[name], direct.partial().sums[name])
    bad = dict(updates[0], w=np.full((3, 4), np.nan, np.float32))
    with pytest.raises(UpdateRejected, match="'w' contains NaN or inf"):
        staged.check(bad)


def test_a_first_writable_partial_becomes_the_sums_and_gives_the_same_mean() -> None:
    """The controller's reducer takes the first partial's buffer (a writable payload) as its
    sums instead of folding it into zeros: the same result, one model-sized buffer fewer."""
    updates, weights = make_updates(3)
    combiners = [FedAvg(TEMPLATE), FedAvg(TEMPLATE)]
    combiners[0].add(updates[0], weights[0], "c0")
    combiners[0].add(updates[1], weights[1], "c1")
    combiners[1].add(updates[2], weights[2], "c2")
    blobs = [bytearray(encode_partial(c.partial())) for c in combiners]  # as a link hands them over when asked to
    reducer = FedAvg(TEMPLATE)
    first = decode_partial(blobs[0])
    reducer.add_partial(first)
    assert all(np.shares_memory(reducer._sums[name], first.sums[name]) for name in TEMPLATE)
    reducer.add_partial(decode_partial(blobs[1]))
    assert_matches(reducer.result(), reference_mean(updates, weights))
    # Read-only arrays (a payload as bytes) are folded into the aggregator's own sums.
    other = FedAvg(TEMPLATE)
    readonly = decode_partial(bytes(encode_partial(combiners[0].partial())))
    other.add_partial(readonly)
    assert not any(np.shares_memory(other._sums[name], readonly.sums[name]) for name in TEMPLATE)
    # A refused partial after an adopted one leaves the sums as they were.
    again = FedAvg(TEMPLATE)
    again.add_partial(decode_partial(bytearray(encode_partial(combiners[0].partial()))))
    kept = {name: s.copy() for name, s in again._sums.items()}
    with pytest.raises(UpdateRejected, match="duplicate"):
        again.add_partial(decode_partial(bytearray(encode_partial(combiners[0].partial()))))
    assert all(np.array_equal(again._sums[name], kept[name]) for name in TEMPLATE) and again.count == 2
