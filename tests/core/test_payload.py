from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import safetensors.numpy

from scaleout.core.errors import ModelMismatchError, PayloadError, UpdateRejected
from scaleout.core.payload import (
    TensorSpec,
    check_compatible,
    check_finite,
    check_values,
    decode,
    describe,
    encode,
    encode_named,
    from_named,
    layout_of,
    model_id,
    read,
    to_named,
    value_bounds,
)


def mixed_arrays() -> list[np.ndarray]:
    """12 arrays of distinct dtypes/shapes/values, so "10" and "11" test list ordering."""
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal(5),
        rng.standard_normal((2, 2)).astype(np.float16),
        rng.integers(-128, 127, size=(4,), dtype=np.int8),
        rng.integers(-(2**31), 2**31 - 1, size=(2, 3), dtype=np.int32),
        np.array([2**62, -(2**62), 7], dtype=np.int64),
        rng.integers(0, 255, size=(6,), dtype=np.uint8),
        np.array([True, False, True]),
        np.array(3.5, dtype=np.float32),  # 0-d
        np.zeros((0, 3), dtype=np.float64),  # empty dim
        np.arange(10, dtype=np.int64) + 1000,
        np.full((2, 1, 2), 11, dtype=np.int32),
    ]


def craft(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def test_list_round_trip_keeps_order_dtype_and_shape() -> None:
    arrays = mixed_arrays()
    data = encode(arrays)
    out = decode(data)
    assert isinstance(out, list) and len(out) == len(arrays)
    for original, got in zip(arrays, out, strict=True):
        assert got.dtype == original.dtype
        assert got.shape == original.shape
        np.testing.assert_array_equal(got, original)
    # Independent check with the plain safetensors reader: names are the list indices.
    raw = safetensors.numpy.load(data)
    assert set(raw) == {str(i) for i in range(12)}
    np.testing.assert_array_equal(raw["10"], arrays[10])
    np.testing.assert_array_equal(raw["2"], arrays[2])


def test_read_returns_list_order_layout_and_metadata() -> None:
    named, layout, metadata = read(encode(mixed_arrays(), metadata={"round": "3"}))
    assert list(named) == [str(i) for i in range(12)]
    assert layout == "list"
    assert metadata == {"round": "3"}


def test_dict_round_trip_keeps_names() -> None:
    model: dict[str, np.ndarray] = {
        "dense.weight": np.ones((2, 3), np.float32),
        "dense.bias": np.zeros(3, np.float64),
        "step": np.array(4),
    }
    out = decode(encode(model))
    assert isinstance(out, dict)
    assert set(out) == set(model)
    for name, array in model.items():
        assert out[name].dtype == array.dtype and out[name].shape == array.shape
        np.testing.assert_array_equal(out[name], array)


UNSORTED = ["layer2.weight", "layer1.weight", "a.bias", "z", "10", "2"]


def unsorted_model() -> dict[str, np.ndarray]:
    return {name: np.full(i + 1, float(i), np.float32 if i % 2 else np.float64) for i, name in enumerate(UNSORTED)}


def test_dict_keeps_the_users_key_order_through_every_reader() -> None:
    model = unsorted_model()
    data = encode(model, metadata={"note": "x"})
    out = decode(data)
    assert isinstance(out, dict) and list(out) == UNSORTED
    named, layout, metadata = read(data)
    assert list(named) == UNSORTED and layout == "dict"
    assert metadata == {"note": "x"}  # the order is ours, not the user's metadata
    assert list(describe(data)) == UNSORTED and layout_of(data) == "dict"
    for name, array in model.items():
        np.testing.assert_array_equal(out[name], array)
    again = encode_named(named, layout, metadata)
    assert list(decode(again)) == UNSORTED
    shuffled = {k: model[k] for k in reversed(UNSORTED)}
    assert list(decode(encode(shuffled))) == list(reversed(UNSORTED))


def test_encoding_is_deterministic_aligned_and_readable_by_safetensors() -> None:
    model = {**unsorted_model(), "i8": np.arange(3, dtype=np.int8), "flag": np.array([True]), "e": np.zeros((0, 2))}
    data = encode(model, metadata={"b": "2", "a": "1"})
    for _ in range(5):  # same model, same bytes: the model id is its content address
        assert encode(dict(model), metadata={"a": "1", "b": "2"}) == data
    loaded = safetensors.numpy.load(data)
    assert loaded.keys() == model.keys()
    for name, array in model.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    (size,) = struct.unpack("<Q", data[:8])
    assert size % 8 == 0
    header = json.loads(data[8 : 8 + size])
    for name, array in model.items():
        assert header[name]["data_offsets"][0] % array.dtype.itemsize == 0, name
    assert safetensors.numpy.load(encode(mixed_arrays()))["10"].tolist() == mixed_arrays()[10].tolist()


def test_names_that_are_not_text_are_refused() -> None:
    with pytest.raises(PayloadError, match="not valid text"):
        encode({"\ud800": np.zeros(1)})
    if np.dtype(np.longdouble).itemsize > 8:  # where long double is wider than float64
        with pytest.raises(PayloadError, match="only bool, int, uint and float"):
            encode([np.zeros(1, np.longdouble)])


def test_order_metadata_from_the_caller_is_replaced() -> None:
    model = unsorted_model()
    stale = json.dumps(sorted(model)[:2])
    assert list(decode(encode(model, metadata={"scaleout.order": stale}))) == UNSORTED
    listed = decode(encode([np.zeros(1), np.ones(2)], metadata={"scaleout.order": stale}))
    assert isinstance(listed, list) and len(listed) == 2


@pytest.mark.parametrize(
    "order",
    ['["b"]', '["a", "a"]', '["a", "b", "c"]', '["a", 1]', "{not json", '{"a": 1, "b": 2}', '[["a"], "b"]'],
)
def test_order_metadata_that_does_not_name_the_tensors_is_refused(order: str) -> None:
    header = {
        "__metadata__": {"scaleout.layout": "dict", "scaleout.order": order},
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    data = craft(header, bytes(16))
    for reader in (read, decode, describe):
        with pytest.raises(PayloadError, match="scaleout.order"):
            reader(data)
    header["__metadata__"]["scaleout.order"] = '["b", "a"]'
    assert list(read(craft(header, bytes(16)))[0]) == ["b", "a"]


def test_decoded_arrays_are_writable() -> None:
    out = decode(encode([np.zeros(3, np.float32)]))
    assert isinstance(out, list)
    out[0] += 1  # training code updates weights in place
    np.testing.assert_array_equal(out[0], np.ones(3, np.float32))


def test_describe_matches_arrays() -> None:
    arrays = mixed_arrays()
    expected = {str(i): TensorSpec(a.dtype.name, a.shape) for i, a in enumerate(arrays)}
    assert describe(encode(arrays)) == expected


def test_model_id_is_sha256() -> None:
    data = encode([np.arange(4.0)])
    assert model_id(data) == hashlib.sha256(data).hexdigest()
    assert model_id(data) != model_id(encode([np.arange(5.0)]))


def test_to_named_and_from_named() -> None:
    named, layout = to_named([np.float32(1.5), [1, 2, 3]])  # type: ignore[list-item]  # scalars and lists are coerced
    assert layout == "list"
    assert named["0"].shape == () and named["0"].dtype == np.float32
    assert named["1"].dtype.kind == "i"
    # Names inserted out of order, with "10" sorting before "2" as a string.
    shuffled = {name: np.full(1, float(name)) for name in ["1", "10", "0", *map(str, range(2, 10))]}
    restored = from_named(shuffled, "list")
    assert isinstance(restored, list)
    assert [float(a[0]) for a in restored] == [float(i) for i in range(11)]


def test_non_contiguous_and_big_endian_round_trip() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    arrays = [base.T, base[:, ::2], base.astype(">f4")]
    for original, got in zip(arrays, decode(encode(arrays)), strict=True):
        np.testing.assert_array_equal(got, original)


def test_foreign_files_infer_layout() -> None:
    as_list = safetensors.numpy.save({"1": np.ones(2), "0": np.zeros(2)})
    out = decode(as_list)
    assert isinstance(out, list)
    np.testing.assert_array_equal(out[0], np.zeros(2))
    assert isinstance(decode(safetensors.numpy.save({"w": np.ones(2)})), dict)
    assert isinstance(decode(safetensors.numpy.save({"1": np.ones(2), "2": np.ones(2)})), dict)


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ([], "at least one tensor"),
        ({}, "at least one tensor"),
        ({"ok": np.zeros(1), "names": np.array(["a", "b"])}, "'names'"),
        ([np.array([object()])], "'0'"),
        ([np.array([1 + 2j])], "complex"),
        ({"": np.zeros(1)}, "non-empty"),
        ({"__metadata__": np.zeros(1)}, "__metadata__"),
        ("not arrays", "list or dict"),
    ],
)
def test_encode_refuses_bad_models(arrays: object, fragment: str) -> None:
    with pytest.raises(PayloadError, match=fragment):
        encode(arrays)  # type: ignore[arg-type]


def test_encode_refuses_non_string_metadata() -> None:
    with pytest.raises(PayloadError, match="metadata"):
        encode([np.zeros(1)], metadata={"round": 3})  # type: ignore[dict-item]


GOOD = encode({"a": np.arange(4, dtype=np.float32), "b": np.ones(2, dtype=np.int8)})
BODY = np.arange(4, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x01\x02\x03", id="shorter-than-length"),
        pytest.param(np.random.default_rng(1).bytes(256), id="random"),
        pytest.param(GOOD[:-1], id="truncated-body"),
        pytest.param(GOOD[:20], id="truncated-header"),
        pytest.param(GOOD + b"\x00", id="trailing-byte"),
        pytest.param(struct.pack("<Q", 2**40) + b"{}", id="header-length-lies"),
        pytest.param(struct.pack("<Q", 4) + b"{{{{", id="bad-json"),
        pytest.param(struct.pack("<Q", 2) + b"[]", id="json-array"),
        pytest.param(struct.pack("<Q", 2) + b"{}", id="no-tensors"),
        pytest.param(struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", id="not-utf8"),
        pytest.param(struct.pack("<Q", 4000) + b"[" * 4000, id="deep-json"),
        pytest.param(craft({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, BODY), id="offsets-lie"),
        pytest.param(craft({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, BODY), id="shape-lies"),
        pytest.param(craft({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, BODY[:8]), id="body-short"),
        pytest.param(craft({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, BODY), id="negative-dim"),
        pytest.param(craft({"a": {"dtype": "F32", "shape": [4]}}, BODY), id="no-offsets"),
        pytest.param(craft({"a": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, BODY), id="unknown-dtype"),
        pytest.param(craft({"a": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}, BODY), id="bf16"),
        pytest.param(craft({"a": "F32"}, BODY), id="entry-not-object"),
        pytest.param(
            craft(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                BODY[:12],
            ),
            id="overlap",
        ),
        pytest.param(craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, BODY), id="gap"),
        pytest.param(
            craft({"__metadata__": {"n": 1}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, BODY),
            id="metadata-not-str",
        ),
    ],
)
def test_malformed_payloads_raise_payload_error(data: bytes) -> None:
    with pytest.raises(PayloadError):
        read(data)
    with pytest.raises(PayloadError):
        decode(data)
    with pytest.raises(PayloadError):
        describe(data)


@pytest.mark.parametrize("layout", ["tree", "list"])
def test_bad_layout_metadata_raises_payload_error(layout: str) -> None:
    # "list" is bad here because the only tensor is named "a", not "0".
    header = {"__metadata__": {"scaleout.layout": layout}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    data = craft(header, BODY)
    with pytest.raises(PayloadError, match="layout"):
        decode(data)
    with pytest.raises(PayloadError, match="layout"):
        describe(data)  # it gives the tensors in layout order, so it needs a valid layout


def test_layout_of_reads_the_header_only_and_agrees_with_read() -> None:
    cases = [
        encode(mixed_arrays()),
        encode({"w": np.ones(2), "0": np.zeros(1)}),
        safetensors.numpy.save({"1": np.ones(2), "0": np.zeros(2)}),  # foreign: inferred
        safetensors.numpy.save({"w": np.ones(2)}),
    ]
    for data in cases:
        assert layout_of(data) == read(data)[1]
    assert [layout_of(d) for d in cases] == ["list", "dict", "list", "dict"]
    # Header only: tensor bytes that no reader could load do not matter to it.
    header = {"__metadata__": {"scaleout.layout": "list"}, "0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    assert layout_of(craft(header, b"\xff" * 16)) == "list"


@pytest.mark.parametrize("layout", ["tree", "list"])
def test_layout_of_refuses_what_read_refuses(layout: str) -> None:
    header = {"__metadata__": {"scaleout.layout": layout}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(PayloadError, match="layout"):
        layout_of(craft(header, BODY))
    with pytest.raises(PayloadError):
        layout_of(b"not a payload")


def test_crafted_valid_payload_is_accepted() -> None:
    # Guards the malformed cases above: the same crafting with honest values decodes.
    data = craft({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, BODY)
    np.testing.assert_array_equal(decode(data)["a"], np.arange(4, dtype=np.float32))  # type: ignore[call-overload]


def test_bf16_error_names_dtype() -> None:
    data = craft({"a": {"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}}, BODY)
    with pytest.raises(PayloadError, match="BF16"):
        describe(data)


def test_every_truncation_and_byte_flip_raises_only_payload_error() -> None:
    for end in range(len(GOOD)):
        with pytest.raises(PayloadError):
            decode(GOOD[:end])
    rng = np.random.default_rng(3)
    for _ in range(300):
        corrupt = bytearray(GOOD)
        corrupt[int(rng.integers(len(GOOD)))] = int(rng.integers(256))
        try:
            decode(bytes(corrupt))
        except PayloadError:
            pass


REFERENCE = {"w": TensorSpec("float32", (2, 3)), "b": TensorSpec("float32", (3,))}


def test_check_compatible_accepts_other_numeric_dtype() -> None:
    check_compatible(REFERENCE, {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.int16)})


@pytest.mark.parametrize(
    "update, tensor",
    [
        ({"w": np.zeros((2, 3))}, "b"),
        ({"w": np.zeros((2, 3)), "b": np.zeros(3), "extra": np.zeros(1)}, "extra"),
        ({"w": np.zeros((3, 2)), "b": np.zeros(3)}, "w"),
        ({"w": np.zeros((2, 3)), "b": np.array(["x", "y", "z"])}, "b"),
    ],
)
def test_check_compatible_refuses_mismatch(update: dict[str, np.ndarray], tensor: str) -> None:
    with pytest.raises(ModelMismatchError) as info:
        check_compatible(REFERENCE, update)
    assert info.value.tensor == tensor


def test_check_finite_names_first_bad_tensor() -> None:
    check_finite({"a": np.ones(3), "i": np.array([2**40], np.int64), "t": np.array([True])})
    with pytest.raises(UpdateRejected, match="'b'"):
        check_finite({"a": np.ones(3), "b": np.array([1.0, np.nan]), "c": np.array([np.inf])})
    with pytest.raises(UpdateRejected, match="'c'"):
        check_finite({"a": np.ones(3), "c": np.array([-np.inf], np.float16)})


def test_value_bounds() -> None:
    assert value_bounds("float32") == (-float(np.finfo(np.float32).max), float(np.finfo(np.float32).max))
    assert value_bounds("float16") == (-65504.0, 65504.0)
    assert value_bounds("int32") == (-(2**31), 2**31 - 1)
    assert value_bounds(np.dtype("uint64")) == (0, 2**64 - 1)
    assert value_bounds("bool") == (0, 1)


def test_check_values_refuses_what_the_model_dtype_cannot_hold() -> None:
    reference = {"f": TensorSpec("float32", (2,)), "i": TensorSpec("int32", (2,)), "e": TensorSpec("float16", (0,))}
    fine = {"f": np.array([2e37, -2e37]), "i": np.array([2**31 - 1, -(2**31)], np.int64), "e": np.zeros(0)}
    check_values(reference, fine)
    check_values(reference, {**fine, "i": np.array([7, -7], np.int16)})  # always fits: no pass at all
    with pytest.raises(UpdateRejected, match=r"'f' holds 1e\+300, outside the model's float32 finite range"):
        check_values(reference, {**fine, "f": np.array([0.0, 1e300])})
    with pytest.raises(UpdateRejected, match=r"'f' holds 3e\+38, beyond 2.127e\+37: too close to the largest float32"):
        check_values(reference, {**fine, "f": np.array([0.0, 3e38], np.float32)})  # finite, but one step from inf
    with pytest.raises(UpdateRejected, match="'i' holds 2147483648, outside the model's int32 range"):
        check_values(reference, {**fine, "i": np.array([0, 2**31], np.int64)})
    with pytest.raises(UpdateRejected, match="'f' contains NaN or inf"):
        check_values(reference, {**fine, "f": np.array([np.nan, 1.0], np.float32)})
    with pytest.raises(UpdateRejected, match="'f' contains NaN or inf"):
        check_values(reference, {**fine, "f": np.array([np.nan, 1e300])})


def test_views_point_into_the_bytes_without_copying() -> None:
    from scaleout.core.payload import views

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "flag": np.array([True, False]), "e": np.zeros((0, 4), np.int16)}
    data = encode(arrays)
    got = views(data)
    assert set(got) == set(arrays)
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value)
    assert not got["a"].flags.writeable and not got["a"].flags.owndata
    with pytest.raises(PayloadError):
        views(data[:-1])


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param([0, 2**62, 2**62], id="empty-but-too-big"),
        pytest.param([2**49, 0], id="one-huge-dim"),
        pytest.param([1] * 40, id="too-many-dims"),
    ],
)
def test_shapes_numpy_cannot_describe_are_refused_before_numpy_sees_them(shape: list[int]) -> None:
    # No bytes, so the offsets fit; numpy would fail with "array is too big" (a ValueError).
    from scaleout.core.aggregators import decode_partial
    from scaleout.core.payload import views

    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "z": {"dtype": "F32", "shape": shape, "data_offsets": [16, 16]}}
    data = craft(header, BODY)
    for reader in (views, describe, read, decode, decode_partial):
        with pytest.raises(PayloadError, match="tensor 'z'"):
            reader(data)
    # An empty tensor of an ordinary shape is fine.
    header["z"]["shape"] = [0, 1000, 3]
    assert views(craft(header, BODY))["z"].shape == (0, 1000, 3)


def test_check_dtypes_refuses_another_kind_and_names_another_width() -> None:
    from scaleout.core.payload import check_dtypes

    reference = {"f": TensorSpec("float32", (2,)), "i": TensorSpec("int32", (2,)), "t": TensorSpec("bool", (2,))}
    same = {"f": np.zeros(2, np.float32), "i": np.zeros(2, np.int32), "t": np.zeros(2, bool)}
    assert check_dtypes(reference, same) == []
    wider = {"f": np.zeros(2, np.float16), "i": np.zeros(2, np.uint8), "t": np.zeros(2, bool)}
    assert check_dtypes(reference, wider) == ["f", "i"]  # same kind: converted, and said
    for name, bad, kinds in [
        ("f", np.zeros(2, np.int32), "dtype int32 is integer, the model's float32 is float"),
        ("f", np.zeros(2, bool), "dtype bool is bool, the model's float32 is float"),
        ("i", np.zeros(2, np.float16), "dtype float16 is float, the model's int32 is integer"),
        ("t", np.zeros(2, np.int8), "dtype int8 is integer, the model's bool is bool"),
    ]:
        with pytest.raises(ModelMismatchError, match=kinds) as info:
            check_dtypes(reference, {**same, name: bad})
        assert info.value.tensor == name


def test_check_finite_finds_a_nan_or_inf_in_any_block_of_a_large_tensor() -> None:
    big = np.zeros((3, (1 << 16) + 7), np.float32)  # blocks of 2**16 elements: the last one short
    check_finite({"w": big})
    for index in (0, (1 << 16) - 1, 1 << 16, big.size - 1):
        bad = big.copy().reshape(-1)
        bad[index] = np.inf if index % 2 else np.nan
        with pytest.raises(UpdateRejected, match="'w'"):
            check_finite({"w": bad.reshape(big.shape)})


def test_encode_buffer_is_encode_in_a_read_only_buffer_and_read_hands_out_owned_arrays() -> None:
    import mmap

    from scaleout.core.payload import encode_buffer

    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False]), "n": np.arange(3, dtype=np.int64)}
    buffer = encode_buffer(arrays, {"k": "v"})
    assert isinstance(buffer, memoryview) and buffer.readonly
    assert bytes(buffer) == encode(arrays, {"k": "v"})
    for data in (buffer, bytes(buffer)):
        named, layout, metadata = read(data)
        assert layout == "dict" and metadata == {"k": "v"} and list(named) == ["w", "b", "n"]
        for name, array in named.items():
            np.testing.assert_array_equal(array, arrays[name])
            assert array.flags.writeable and array.flags.owndata  # a callback may change them in place
    mapped = mmap.mmap(-1, len(buffer))
    mapped[:] = buffer
    named, _, _ = read(mapped)  # a mapped payload is read without a copy of it first
    named["w"][0, 0] = 99
    assert bytes(mapped) == bytes(buffer)  # ...and the arrays are not views of it
