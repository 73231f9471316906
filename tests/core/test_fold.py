from __future__ import annotations

import math

import numpy as np
import pytest

from scaleout.core.aggregators.fold import BLOCK, acc_dtype, amax, fold_into


@pytest.mark.parametrize("n", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17])
@pytest.mark.parametrize("acc_type", [np.float32, np.float64])
def test_fold_into_matches_plain_numpy(n: int, acc_type: type) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32).reshape(-1, 1) if n else np.zeros((0, 3), np.float32)
    acc = rng.standard_normal(x.shape).astype(acc_type)
    want = acc.astype(np.float64) + 2.5 * x.astype(np.float64)
    fold_into(acc, x, 2.5)
    assert acc.dtype == acc_type
    np.testing.assert_allclose(acc, want, rtol=1e-6 if acc_type is np.float32 else 1e-15, atol=1e-6 if acc_type is np.float32 else 0)


@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool", "float16", "float64"])
def test_fold_into_takes_any_numeric_update(dtype: str) -> None:
    x = (np.arange(2 * BLOCK + 5) % 3).astype(dtype)
    acc = np.zeros(x.shape, acc_dtype(dtype))
    scratch = np.empty(BLOCK, acc.dtype)
    fold_into(acc, x, 3.0, scratch)
    fold_into(acc, x, 1.0, scratch)
    np.testing.assert_array_equal(acc, 4.0 * x.astype(np.float64))


def test_acc_dtype() -> None:
    assert acc_dtype("float16") == np.float32 and acc_dtype("float32") == np.float32
    assert all(acc_dtype(d) == np.float64 for d in ("float64", "int64", "int8", "uint32", "bool"))


def test_amax() -> None:
    x = np.zeros(3 * BLOCK, np.float32)
    assert amax(x) == 0.0 and amax(np.zeros(0)) == 0.0
    x[BLOCK + 3] = -7.5
    x[2 * BLOCK] = 4.0
    assert amax(x) == 7.5
    x[-1] = np.inf
    assert amax(x) == math.inf
    x[5] = np.nan
    assert math.isnan(amax(x))
    assert amax(np.array([-(2**62), 5], np.int64)) == 2.0**62
    assert amax(np.array([0, 255], np.uint8)) == 255.0
    assert amax(np.array([False, True])) == 1.0 and amax(np.array([False])) == 0.0
    assert amax(np.full((4, 4), -1e300)) == 1e300


@pytest.mark.parametrize("n", [1, BLOCK + 3, 2 * (64 * BLOCK) + 5])
def test_amax_fold_and_fedavg_tell_each_stretch_of_the_update_once_per_pass(n: int) -> None:
    """The read hook (a combiner lets a mapped update's pages go): amax and fold_into tell each
    element of the update once, as views of it, in order; FedAvg.check then add tell it twice
    (one check pass, one fold pass) and give the same sums as without the hook."""
    from scaleout.core.aggregators.fedavg import FedAvg
    from scaleout.core.aggregators.fold import STRETCH
    from scaleout.core.payload import TensorSpec

    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    for run in (lambda seen: amax(x, seen.append), lambda seen: fold_into(np.zeros(n, np.float32), x, 1.5, None, seen.append)):
        seen: list[np.ndarray] = []
        run(seen)
        assert all(np.shares_memory(s, x) and s.size <= STRETCH for s in seen)
        assert [s.ctypes.data for s in seen] == [x.ctypes.data + 4 * sum(t.size for t in seen[:i]) for i in range(len(seen))]
        assert sum(s.size for s in seen) == n
    template = {"w": TensorSpec("float32", (n,)), "i": TensorSpec("int32", (2,))}
    update = {"w": x, "i": np.array([1, 2], np.int32)}
    hooked, plain, told = FedAvg(template), FedAvg(template), []
    hooked.add(hooked.check(update, told.append), 2.0, "a")
    plain.add(plain.check(update), 2.0, "a")
    assert sum(s.size for s in told if np.shares_memory(s, x)) == 2 * n  # the int tensor is told as it is folded
    np.testing.assert_array_equal(hooked.partial().sums["w"], plain.partial().sums["w"])
