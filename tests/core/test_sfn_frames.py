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


def test_a_ragged_result_and_settings_over_the_bound_are_refused() -> None:
    template = {"w": np.zeros(3, np.float32), "n": np.zeros(2, np.int32)}
    with pytest.raises(ServerFunctionsError, match="aggregate returned what is not an array at position 0"):
        sf.check_model([[1, [2, 3]], [1, 2]], template, "aggregate")  # numpy raises ValueError on a ragged list
    sf.check_settings({"blob": "x" * (sf.MAX_SETTINGS - 20)})
    with pytest.raises(ServerFunctionsError, match=f"at most {sf.MAX_SETTINGS} bytes of settings"):
        sf.check_settings({"blob": "x" * sf.MAX_SETTINGS})


def test_a_malformed_frame_is_a_server_functions_error_and_an_oversized_one_is_refused_by_its_prefix() -> None:
    good = sf.encode({"op": "result", "value": [np.arange(4, dtype=np.float64)]})
    body = good[4:]
    hlen = int.from_bytes(body[:4], "big")
    header = body[4:4 + hlen]
    bad = [
        b"\x00\x00\x00\x05{bad}",  # JSON that does not parse
        b"\x00\x00\x00\x02[]",  # no "a"
        b"\x00\x00\x00\x0f" + b'{"m":1,"a":[]}X',  # a message that is not a dict (and a stray byte)
        b"\x00\x00\xff\xff{}",  # a header longer than the frame
        body[:-8],  # arrays past the frame's end
        (hlen + 0).to_bytes(4, "big") + header.replace(b"[4]", b"[-4]"),  # a negative shape
        (hlen + 2).to_bytes(4, "big") + header.replace(b"<f8", b"<xyz1") + body[4 + hlen:],  # no such dtype
        b"\x00\x00\x00\x0c" + b'{"m":{"__nd__":"x"},"a":[]}'[:12],
        b"\x00\x00\x00\x1b" + b'{"m":{"__nd__":"x"},"a":[]}',  # an array index that is not one
        b"\x00\x00\x00\x1f" + b'{"m":{"__float__":"abc"},"a":[]}',
        b"\x00\x00",  # no header length
        b"\x00\x00\x00\x08" + b"[" * 4 + b"]" * 4 + b"\x00" * 0,
        b"\x00\x01\x00\x00" + b"[" * 65536,  # nested deeper than the parser goes
    ]
    for frame in bad:
        with pytest.raises(ServerFunctionsError):
            sf.decode(frame)
    assert sf.frame_size(good[:4], len(good) - 4) == len(good) - 4
    with pytest.raises(ServerFunctionsError, match="a frame of 2147483647 bytes, more than the 1048576 this answer may take"):
        sf.frame_size(b"\x7f\xff\xff\xff", sf.reply_limit("client_settings"))
    template = {"w": np.zeros((10, 10), np.float32)}
    assert sf.reply_limit("aggregate", sf.model_bytes(template)) == 800 + sf.MAX_REPLY
