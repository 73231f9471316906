from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from scaleoututil.helpers.helpers import get_helper
from scaleoututil.helpers.numpyhelper import Helper


@pytest.fixture
def helper() -> Helper:
    return get_helper("numpyhelper")


def twelve() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((i + 1, 2)).astype(np.float32) * (i + 1) for i in range(12)]


def test_get_helper_unknown_name_lists_supported() -> None:
    with pytest.raises(ValueError, match="numpyhelper"):
        get_helper("torchhelper")


def test_save_load_keeps_order_of_twelve_arrays(helper: Helper, tmp_path: Path) -> None:
    arrays = twelve()
    path = helper.save(arrays, tmp_path / "m.npz")
    assert path == str(tmp_path / "m.npz")
    loaded = helper.load(path)
    assert isinstance(loaded, list) and len(loaded) == 12
    for a, b in zip(arrays, loaded):  # "10" and "11" must come after "9", not after "1"
        assert b.dtype == a.dtype
        assert_array_equal(a, b)
    with np.load(path) as npz:
        assert sorted(npz.files, key=int) == [str(i) for i in range(12)]


def test_save_without_path_uses_tmp_file_and_adds_suffix(helper: Helper, tmp_path: Path) -> None:
    path = helper.save([np.ones(3)])
    try:
        assert path.endswith(".npz") and Path(path).stat().st_size > 0
    finally:
        Path(path).unlink()
    assert helper.save([np.ones(3)], str(tmp_path / "seed")) == str(tmp_path / "seed.npz")
    assert (tmp_path / "seed.npz").exists()


def test_save_load_dict_and_filelike(helper: Helper) -> None:
    model = {"w": np.arange(4.0), "b": np.zeros(1, dtype=np.int64)}
    buf = io.BytesIO()
    helper.save(model, buf)
    buf.seek(0)
    loaded = helper.load(buf)
    assert isinstance(loaded, dict) and list(loaded) == ["w", "b"]
    assert_array_equal(loaded["w"], model["w"])
    assert loaded["b"].dtype == np.int64


def test_increment_average_equals_weighted_mean(helper: Helper) -> None:
    rng = np.random.default_rng(1)
    models = [[rng.standard_normal(5), rng.standard_normal((2, 3))] for _ in range(3)]
    weights = [10, 30, 60]
    avg, total = models[0], weights[0]
    for m, n in zip(models[1:], weights[1:]):
        total += n
        avg = helper.increment_average(avg, m, n, total)
    for i in range(2):
        expected = sum(w * m[i] for w, m in zip(weights, models)) / sum(weights)
        assert_allclose(avg[i], expected)


def test_arithmetic(helper: Helper) -> None:
    a = [np.array([1.0, 4.0]), np.array([[9.0]])]
    b = [np.array([2.0, 2.0]), np.array([[3.0]])]
    assert_allclose(helper.add(a, b)[0], [3.0, 6.0])
    assert_allclose(helper.add(a, b, 2.0, 0.5)[1], [[19.5]])
    assert_allclose(helper.subtract(a, b, 1.0, 2.0)[0], [-3.0, 0.0])
    assert_allclose(helper.divide(a, b)[0], [0.5, 2.0])
    assert_allclose(helper.multiply(a, b)[1], [[27.0]])
    assert_allclose(helper.sqrt(a)[0], [1.0, 2.0])
    assert_allclose(helper.power(a, 2)[1], [[81.0]])
    assert_allclose(helper.sign([np.array([-2.0, 0.0, 3.0])])[0], [-1.0, 0.0, 1.0])
    ones = helper.ones(a, 3.0)
    assert ones[1].shape == (1, 1) and float(ones[0].sum()) == 6.0


def test_norm_is_entrywise_l1(helper: Helper) -> None:
    m = [np.array([-1.0, 2.0]), np.array([[1.0, -1.0], [3.0, 0.0]]), np.ones((2, 2, 2))]
    assert helper.norm(m) == pytest.approx(3.0 + 5.0 + 8.0)


def test_dict_models_and_mismatches(helper: Helper) -> None:
    a = {"w": np.ones(2), "b": np.zeros(1)}
    out = helper.add(a, a, 1.0, 2.0)
    assert isinstance(out, dict)
    assert_allclose(out["w"], [3.0, 3.0])
    with pytest.raises(ValueError, match="same keys"):
        helper.add(a, {"w": np.ones(2)})
    with pytest.raises(ValueError, match="same length"):
        helper.add([np.ones(2)], [np.ones(2), np.ones(2)])
