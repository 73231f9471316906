"""The frames between the controller and its server-functions worker, and the checks on
what a ServerFunctions method returns (pure: no process)."""

from __future__ import annotations

import numpy as np
import pytest

from scaleout.core import serverfunctions as sf
from scaleout.core.errors import ServerFunctionsError


def roundtrip(message: dict) -> dict:
    frame = sf.encode(message)
    assert sf.frame_size(frame[:4]) == len(frame) - 4
    return sf.decode(frame[4:])


def test_frames_carry_json_arrays_and_bytes_never_pickle() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([True, False]), np.array(7, np.int64), np.zeros((0, 4), np.float16)]
    out = roundtrip({"op": "call", "args": [arrays, {"a": (1, 2.5, None, "x")}, b"\x00\xff", np.float64(0.25), float("inf")]})
    got, meta, raw, scalar, inf = out["args"]
    for a, b in zip(arrays, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert meta == {"a": [1, 2.5, None, "x"]} and raw == b"\x00\xff" and scalar == 0.25 and inf == float("inf")
    for bad in (object(), np.array(["text"]), np.array([object()], dtype=object), {1j: 1}):
        with pytest.raises(ServerFunctionsError, match="cannot be sent"):
            sf.encode({"value": bad})


def test_selection_settings_and_models_are_checked() -> None:
    assert sf.check_selection(["b", "a", "b"], ["a", "b", "c"]) == ["b", "a"]
    assert sf.check_selection(np.array(["a"]), ["a"]) == ["a"]
    for bad, why in ((None, "must return a list"), ([1], "must return a list"), (["z"], "not offered: z")):
        with pytest.raises(ServerFunctionsError, match=why):
            sf.check_selection(bad, ["a"])
    assert sf.check_settings({"learning_rate": 0.01}) == {"learning_rate": 0.01}
    for bad in (None, {1: 2}, {"x": float("nan")}, {"x": {1, 2}}):
        with pytest.raises(ServerFunctionsError, match="client_settings must return"):
            sf.check_settings(bad)
    template = {"w": np.zeros((2, 2), np.float32), "n": np.zeros(3, np.int32)}
    out = sf.check_model([np.ones((2, 2)), np.array([1.4, 2.6, -3.5])], template, "aggregate")
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int32
    np.testing.assert_array_equal(out["n"], [1, 3, -4])
    for bad, why in (
        ([np.ones((2, 2))], "returned 1 arrays; the model has 2"),
        ([np.ones((2, 3)), np.ones(3)], r"shape \(2, 3\) at position 0"),
        ([np.ones((2, 2)), np.array(["a", "b", "c"])], "dtype <U1 at position 1"),
        ([np.full((2, 2), np.nan), np.ones(3)], "NaN or inf"),
        ([np.ones((2, 2)), np.full(3, 1e20)], "does not fit int32"),
        ("model", "must return a list of numpy arrays"),
    ):
        with pytest.raises(ServerFunctionsError, match=why):
            sf.check_model(bad, template, "aggregate")


def test_only_the_allowed_modules_are_allowed() -> None:
    for ok in ("numpy", "numpy.linalg", "random", "scaleoututil.serverfunctions.allowed_import", "fedn.network.combiner.hooks.allowed_import"):
        assert sf.allowed(ok), ok
    for no in ("os", "subprocess", "socket", "scaleout", "scaleoututil.helpers", "fedn.utils", "importlib", "builtins"):
        assert not sf.allowed(no), no
