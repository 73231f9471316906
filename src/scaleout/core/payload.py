"""Model payloads: safetensors bytes <-> named numpy arrays.

A model travels as one safetensors file. Lists of arrays are stored under the names
"0", "1", ... and the layout ("list" or "dict") is kept in the header metadata under
"scaleout.layout", so `decode(encode(x))` gives back the same kind of container.
safetensors readers sort tensors by name, so a dict's key order is kept under
"scaleout.order" (a JSON list of names): `read`, `describe` and `decode` give the tensors
back in that order. `encode` writes the file itself, so one model always gives the same bytes.
Every malformed input raises `PayloadError`; nothing else escapes from parsing.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NewType

import numpy as np

from scaleout.core.errors import ModelMismatchError, PayloadError, UpdateRejected

ModelId = NewType("ModelId", str)
Arrays = list[np.ndarray] | dict[str, np.ndarray]

LAYOUT_KEY = "scaleout.layout"
ORDER_KEY = "scaleout.order"
LAYOUTS = ("list", "dict")

# safetensors dtype tag -> numpy dtype name; other tags (BF16, F8_*, C64, ...) are refused.
_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip
_TAGS = {name: tag for tag, name in _DTYPES.items()}
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: what can be averaged
_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces
MAX_DIMS = 32  # dimensions of one tensor (numpy's own limit is 64)
MAX_ELEMENTS = 2**48  # elements a shape may describe, zero dims aside: numpy refuses far less


@dataclass(frozen=True)
class TensorSpec:
    """Dtype (numpy name, e.g. "float32") and shape of one tensor."""

    dtype: str
    shape: tuple[int, ...]


def model_id(data: bytes) -> ModelId:
    """Content address of a payload: the sha256 hex digest of its bytes."""
    return ModelId(hashlib.sha256(data).hexdigest())


def to_named(arrays: Arrays) -> tuple[dict[str, np.ndarray], str]:
    """Name the arrays ("0", "1", ... for a list) and return them with their layout."""
    if isinstance(arrays, dict):
        items, layout = list(arrays.items()), "dict"
    elif isinstance(arrays, list | tuple):
        items, layout = [(str(i), a) for i, a in enumerate(arrays)], "list"
    else:
        raise PayloadError(f"expected a list or dict of arrays, got {type(arrays).__name__}")
    named: dict[str, np.ndarray] = {}
    for name, value in items:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise PayloadError(f"tensor names must be non-empty strings other than '__metadata__', got {name!r}")
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as e:
            raise PayloadError(f"tensor {name!r} is not an array: {e}") from None
        if array.dtype.kind not in _NUMERIC_KINDS or array.dtype.name not in _TAGS:
            raise PayloadError(f"tensor {name!r} has dtype {array.dtype}; only bool, int, uint and float are supported")
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        named[name] = array if array.flags.c_contiguous else array.copy(order="C")
    return named, layout


def from_named(named: dict[str, np.ndarray], layout: str) -> Arrays:
    """Inverse of `to_named`: a list ordered by int(name) or the dict itself."""
    if layout == "dict":
        return dict(named)
    if layout == "list":
        _check_list_names(named)
        return [named[str(i)] for i in range(len(named))]
    raise PayloadError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def encode(arrays: Arrays, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize arrays (list or dict) to safetensors bytes, recording the layout."""
    named, layout = to_named(arrays)
    return _serialize(named, layout, metadata)


def encode_named(named: dict[str, np.ndarray], layout: str, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize already-named arrays with the given layout and extra string metadata."""
    checked, _ = to_named(dict(named))  # names, dtypes, byte order and contiguity
    return _serialize(checked, layout, metadata)


def _serialize(named: dict[str, np.ndarray], layout: str, metadata: dict[str, str] | None) -> bytes:
    """Write arrays that went through `to_named`."""
    # join copies each tensor once, straight into the result.
    return b"".join(_pieces(named, layout, metadata))


def encode_buffer(arrays: Arrays, metadata: dict[str, str] | None = None) -> memoryview:
    """`encode`'s bytes, written once into a new numpy buffer, as a read-only memoryview:
    numpy puts a large buffer on transparent huge pages, so filling it takes less than half
    the CPU of joining a bytes object (100 MB: 45 vs 107 ms, 400 vs 24,000 page faults)."""
    named, layout = to_named(arrays)
    pieces = [np.frombuffer(p, np.uint8) for p in _pieces(named, layout, metadata) if memoryview(p).nbytes]
    out = np.empty(sum(p.size for p in pieces), np.uint8)
    offset = 0
    for piece in pieces:
        out[offset : offset + piece.size] = piece
        offset += piece.size
    return out.data.toreadonly()


def encode_named_pieces(named: dict[str, np.ndarray], layout: str, metadata: dict[str, str] | None = None) -> list[Any]:
    """`encode_named`'s bytes as pieces (the header, then a byte view of each array), never
    joined: for a sender that streams them out without a second copy of the arrays. The
    arrays must not change while the pieces are in use."""
    checked, _ = to_named(dict(named))
    return _pieces(checked, layout, metadata)


def _pieces(named: dict[str, np.ndarray], layout: str, metadata: dict[str, str] | None) -> list[Any]:
    if not named:
        raise PayloadError("a model needs at least one tensor")
    if layout not in LAYOUTS:
        raise PayloadError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "list":
        _check_list_names(named)
    meta = dict(metadata or {})
    for key, value in meta.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PayloadError(f"metadata must map str to str, got {key!r}: {value!r}")
    meta[LAYOUT_KEY] = layout
    meta.pop(ORDER_KEY, None)
    if layout == "dict":
        meta[ORDER_KEY] = json.dumps(list(named))
    # Written here rather than by safetensors.numpy.save, whose metadata comes out in a
    # different order on every call: the same model must give the same bytes (its id).
    # As safetensors does, the data goes widest dtype first so every tensor is aligned.
    placed = sorted(named, key=lambda name: -named[name].dtype.itemsize)
    spans: dict[str, list[int]] = {}
    position = 0
    for name in placed:
        spans[name] = [position, position + named[name].nbytes]
        position += named[name].nbytes
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    for name, array in named.items():
        header[name] = {"dtype": _TAGS[array.dtype.name], "shape": list(array.shape), "data_offsets": spans[name]}
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        raise PayloadError(f"cannot serialize model: a name or metadata value is not valid text: {e}") from None
    raw += b" " * (-len(raw) % 8)
    if len(raw) > _MAX_HEADER:
        raise PayloadError(f"cannot serialize model: its header of {len(raw)} bytes exceeds {_MAX_HEADER}")
    little = (named[name].astype(named[name].dtype.newbyteorder("<"), copy=False) for name in placed)
    # Byte views of the (contiguous) arrays.
    return [struct.pack("<Q", len(raw)), raw, *(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in little)]


def read(data: bytes | memoryview) -> tuple[dict[str, np.ndarray], str, dict[str, str]]:
    """Parse a payload into (named arrays, layout, metadata without the layout and order keys).

    The arrays come in list order, or in the dict order recorded at encoding. Files written
    by other tools (no layout key) count as a list when their names are exactly "0".."n-1".
    """
    specs, layout, metadata = _header(data)
    # Copies of views (the header check makes the tensors tile the data exactly): numpy puts a
    # large array on transparent huge pages, so this takes half the CPU of safetensors' load
    # (100 MB: 61 vs 129 ms, 400 vs 24,000 page faults), and an mmap is not copied whole first.
    return {name: array.copy() for name, array in _views(data, specs).items()}, layout, metadata


def read_metadata(data: bytes) -> dict[str, str]:
    """The header's string metadata (without the layout and order keys), tensors untouched."""
    return _header(data)[2]


def views(data: bytes | memoryview) -> dict[str, np.ndarray]:
    """Read-only arrays that point into ``data`` (no copy), in the order `read` gives: for
    reading a large model whose bytes are kept anyway (the controller's global model)."""
    return _views(data, _header(data)[0])


def _views(data: bytes | memoryview, specs: dict[str, TensorSpec]) -> dict[str, np.ndarray]:
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(bytes(data[8 : 8 + size]))
    base = 8 + size
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        begin, _end = header[name]["data_offsets"]
        count = math.prod(spec.shape)
        array = np.frombuffer(data, dtype=np.dtype(spec.dtype).newbyteorder("<"), count=count, offset=base + begin)
        out[name] = array.reshape(spec.shape)
    return out


def decode(data: bytes | memoryview) -> Arrays:
    """Parse a payload back into the list or dict it was encoded from."""
    named, layout, _ = read(data)
    return from_named(named, layout)


def describe(data: bytes | memoryview) -> dict[str, TensorSpec]:
    """Tensor names, dtypes and shapes from the header alone, in the order `read` gives them."""
    return _header(data)[0]


def layout_of(data: bytes) -> str:
    """The layout ("list" or "dict") `read` would report, from the header alone."""
    return _header(data)[1]


def check_compatible(reference: dict[str, TensorSpec], update: Mapping[str, np.ndarray]) -> None:
    """Refuse an update whose tensor names, shapes or dtype kinds differ from the model's.

    A different numeric dtype (float64 for a float32 model) is fine: aggregation casts.
    """
    for name in reference:
        if name not in update:
            raise ModelMismatchError(name, "missing from the update")
    for name, value in update.items():
        if name not in reference:
            raise ModelMismatchError(name, "is not a tensor of the model")
        array = np.asarray(value)
        if array.dtype.kind not in _NUMERIC_KINDS:
            raise ModelMismatchError(name, f"dtype {array.dtype} is not bool, int, uint or float")
        want = reference[name].shape
        if array.shape != tuple(want):
            raise ModelMismatchError(name, f"shape {array.shape} does not match the model's {tuple(want)}")


_KIND_NAMES = {"b": "bool", "i": "integer", "u": "integer", "f": "float"}


def check_dtypes(reference: Mapping[str, TensorSpec], update: Mapping[str, np.ndarray]) -> list[str]:
    """Refuse an update tensor of another dtype kind than the model's (an int32 or bool
    update for a float32 tensor), naming it; run after `check_compatible`.

    The same kind at another width (float16 or float64 for float32, int64 for int32) is
    converted by the fold: its values are range-checked by `check_values`, and the names of
    such tensors are returned so the caller can say so.
    """
    converted: list[str] = []
    for name, spec in reference.items():
        have, want = np.asarray(update[name]).dtype, np.dtype(spec.dtype)
        if _KIND_NAMES[have.kind] != _KIND_NAMES[want.kind]:
            raise ModelMismatchError(
                name, f"dtype {have} is {_KIND_NAMES[have.kind]}, the model's {want} is {_KIND_NAMES[want.kind]}: send the model's dtype"
            )
        if have != want:
            converted.append(name)
    return converted


_FINITE_BLOCK = 1 << 16  # elements checked at once by check_finite


def check_finite(update: Mapping[str, np.ndarray]) -> None:
    """Refuse an update containing NaN or inf, naming the first offending tensor."""
    for name, value in update.items():
        array = np.asarray(value)
        if array.dtype.kind != "f":
            continue
        flat = array.reshape(-1)
        # Block by block: np.isfinite of the whole tensor is a bool array a quarter of a float32 model.
        if not all(np.isfinite(flat[start : start + _FINITE_BLOCK]).all() for start in range(0, flat.size, _FINITE_BLOCK)):
            raise UpdateRejected(f"tensor {name!r} contains NaN or inf")


def value_bounds(dtype: str | np.dtype) -> tuple[int | float, int | float]:
    """The least and greatest finite value a tensor of ``dtype`` holds (0 and 1 for bool)."""
    target = np.dtype(dtype)
    if target.kind == "f":
        largest = float(np.finfo(target).max)
        return -largest, largest
    if target.kind in "iu":
        info = np.iinfo(target)
        return int(info.min), int(info.max)
    return 0, 1


HEADROOM = 16.0  # a model's float values stay below 1/16 of their dtype's largest value


def headroom(dtype: str | np.dtype) -> float:
    """The largest |value| a float tensor of ``dtype`` may hold in an update or a committed
    model: 1/HEADROOM of the dtype's largest, so the next round's arithmetic on it (clients
    training, sums of weighted values) keeps room before inf. 3e38 is finite in float32
    but one step from inf: a model holding it made every client's next update NaN."""
    return float(np.finfo(np.dtype(dtype)).max) / HEADROOM


def check_values(
    reference: Mapping[str, TensorSpec], update: Mapping[str, np.ndarray], read: Callable[[np.ndarray], None] | None = None,
) -> dict[str, float]:
    """Refuse NaN, inf, values the model's dtype cannot hold (1e300 for float32, 2**40
    for int32) and float values beyond its `headroom` (3e38 for float32), naming the first
    offending tensor. Run after `check_compatible`.

    Returns a bound on each tensor's largest |value| (what a running sum needs to know it
    cannot overflow). Cheap on purpose (aggregation's hot path): one blocked pass over a
    float tensor (`peak_bound`; the exact `amax` only when that bound is too high to pass),
    a min and a max over an integer one that may not fit, nothing for integers that always
    do. ``read`` is told each stretch of a float tensor once read (`amax`).
    The peaks are only for a running sum's overflow check: a bound, never printed. A refusal
    is decided and printed from the exact value (`amax`, or the min and max).
    """
    from scaleout.core.aggregators.fold import amax, peak_bound

    peaks: dict[str, float] = {}
    for name, value in update.items():
        array = np.asarray(value)
        peaks[name] = 0.0
        if array.size == 0:
            continue
        target = reference[name].dtype
        low, high = value_bounds(target)
        own_low, own_high = value_bounds(array.dtype)
        fits = low <= own_low and own_high <= high
        if array.dtype.kind == "f":
            peak = peak_bound(array, read)  # a bound decides when it passes; else the exact peak (amax) does
            if not (peak <= (high if fits else min(-low, high)) and (np.dtype(target).kind != "f" or peak <= headroom(target))):
                peak = amax(array, read)
            if not math.isfinite(peak):
                raise UpdateRejected(f"tensor {name!r} contains NaN or inf")
            peaks[name] = peak
            if fits or peak <= min(-low, high):
                if np.dtype(target).kind == "f" and peak > headroom(target):
                    raise UpdateRejected(
                        f"tensor {name!r} holds {_number(peak)}, beyond {_number(headroom(target))}: too close to the largest {target} for the model to be trained on"
                    )
                continue
        elif fits:
            peaks[name] = float(max(-own_low, own_high))
            continue
        # .item() gives Python numbers: they compare exactly across int and float.
        least, greatest = array.min().item(), array.max().item()
        if least < low or greatest > high:
            bad = least if least < low else greatest
            kind = "finite range" if np.dtype(target).kind == "f" else "range"
            raise UpdateRejected(
                f"tensor {name!r} holds {_number(bad)}, outside the model's {target} {kind} [{_number(low)}, {_number(high)}]"
            )
        peaks[name] = float(max(-least, greatest))
    return peaks


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _header(data: bytes | memoryview) -> tuple[dict[str, TensorSpec], str, dict[str, str]]:
    """(specs in list or recorded order, layout, metadata without the layout and order keys)."""
    specs, metadata = _parse_header(data)
    layout = _layout(specs, metadata)
    metadata.pop(LAYOUT_KEY, None)
    order = metadata.pop(ORDER_KEY, None)
    if layout == "list":
        return {str(i): specs[str(i)] for i in range(len(specs))}, layout, metadata
    if order is not None:
        return {name: specs[name] for name in _order(order, specs)}, layout, metadata
    return specs, layout, metadata


def _order(text: str, specs: Mapping[str, TensorSpec]) -> list[str]:
    """The tensor order recorded under ORDER_KEY; it must name each tensor exactly once."""
    try:
        order = json.loads(text)
    except (ValueError, RecursionError):
        order = None
    names = order if isinstance(order, list) and all(isinstance(n, str) for n in order) else []
    if len(names) != len(specs) or set(names) != set(specs):
        raise PayloadError(f"safetensors metadata {ORDER_KEY!r} must be a JSON list naming each tensor once")
    return names


def _layout(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> str:
    layout = metadata.get(LAYOUT_KEY)
    if layout is None:  # written by another tool
        return "list" if _is_list_names(specs) else "dict"
    if layout not in LAYOUTS:
        raise PayloadError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if layout == "list":
        _check_list_names(specs)
    return layout


def _is_list_names(names: Mapping[str, object]) -> bool:
    return set(names) == {str(i) for i in range(len(names))}


def _check_list_names(names: Mapping[str, object]) -> None:
    if not _is_list_names(names):
        shown = sorted(names)[:5]
        raise PayloadError(f"list layout needs tensors named '0'..'{len(names) - 1}', got {shown}")


def _check_shape(name: str, shape: list[int]) -> None:
    """Refuse a shape numpy could not even describe: [0, 2**62, 2**62] holds no bytes (so
    its offsets fit) but would fail deep inside numpy ("array is too big")."""
    if len(shape) > MAX_DIMS:
        raise PayloadError(f"tensor {name!r}: {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    described = 1
    for d in shape:
        described *= max(d, 1)
        if described > MAX_ELEMENTS:
            raise PayloadError(f"tensor {name!r}: shape {shape!r:.100} is not plausible (more than 2**48 elements per dimension product)")


def _parse_header(data: bytes | memoryview) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Validate the safetensors header and return (specs in header order, metadata)."""
    if not isinstance(data, bytes | bytearray | memoryview | mmap.mmap):  # a mapped file is a model's bytes too
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise PayloadError(f"payload is {len(data)} bytes, too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or 8 + size > len(data):
        raise PayloadError(f"safetensors header claims {size} bytes but the payload has {len(data) - 8}")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
    except (ValueError, RecursionError) as e:
        raise PayloadError(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise PayloadError("safetensors header must be a JSON object")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PayloadError("safetensors __metadata__ must map strings to strings")
    if not header:
        raise PayloadError("payload holds no tensors")

    specs: dict[str, TensorSpec] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise PayloadError(f"tensor {name!r}: header entry must be an object")
        tag, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if tag not in _DTYPES:
            raise PayloadError(f"tensor {name!r}: unsupported dtype {tag!r}; use one of {', '.join(_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise PayloadError(f"tensor {name!r}: shape must be a list of non-negative ints, got {shape!r:.100}")
        _check_shape(name, shape)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise PayloadError(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
        dtype = _DTYPES[tag]
        begin, end = offsets
        if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise PayloadError(f"tensor {name!r}: data_offsets {offsets} do not fit a {dtype} tensor of shape {shape}")
        specs[name] = TensorSpec(dtype, tuple(shape))
        spans.append((begin, end, name))

    # safetensors requires the tensors to tile the data buffer exactly, in offset order.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise PayloadError(f"tensor {name!r}: data starts at {begin}, expected {position}")
        position = end
    if position != len(data) - 8 - size:
        raise PayloadError(f"tensors cover {position} bytes but the payload holds {len(data) - 8 - size}")
    return specs, metadata
