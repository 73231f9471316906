"""Server functions, the pure part: the frames the controller and its server-functions
worker exchange, and the checks on what the user's methods return.

A frame is JSON plus raw arrays, never pickle, so the controller decodes nothing that could
run code: ``len(4) | header_len(4) | header JSON | array bytes...``. In the JSON an array is
``{"__nd__": i}`` (dtype and shape listed in the header), bytes are ``{"__bytes__": i}``.

Pure: no I/O; roles/serverfunctions.py (controller) and roles/sfn_worker.py (worker) move
the bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scaleout.core.errors import ScaleoutError, ServerFunctionsError

MAX_SOURCE = 256 << 10  # bytes of a server-functions file
MAX_STATE = 16 << 20  # bytes of the class's pickled attributes kept with each round
MAX_FRAME = 8 << 30
MAX_REPLY = 1 << 20  # bytes of a worker's frame other than a model (a selection, settings, a printed line)
MAX_SETTINGS = 1 << 20  # bytes of client_settings' answer, JSON-encoded
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 3600.0
MEMORY_LIMIT = 4 << 30  # the worker's address space (RLIMIT_AS)
STATE_KEY = "serverfunctions/state"  # the class's state in the round's server state (uint8 bytes)
CLASS_NAME = "ServerFunctions"
METHODS = ("client_selection", "client_settings", "aggregate", "incremental_aggregate", "get_incremental_aggregate_model")
ROUND_TYPES = ("training", "validation", "prediction")

# What the user's file may import (top-level names; submodules of these too). Imports from
# numpy, the standard library and scaleout inside those modules are not checked.
ALLOWED_MODULES = frozenset({
    "scaleoututil.serverfunctions", "scaleoututil.serverfunctions.allowed_import", "scaleoututil.serverfunctions.serverfunctionsbase",
    "fedn", "fedn.network", "fedn.network.combiner", "fedn.network.combiner.hooks",
    "fedn.network.combiner.hooks.allowed_import", "fedn.network.combiner.hooks.serverfunctionsbase",
    "fedn.common", "fedn.common.log_config",
    "__future__", "numpy", "random", "math", "typing", "collections", "itertools", "functools", "statistics",
    "enum", "dataclasses", "abc", "copy", "operator", "heapq", "bisect", "json",
})
_NUMERIC_KINDS = "biuf"


def allowed(name: str) -> bool:
    return name in ALLOWED_MODULES or name.split(".")[0] in ALLOWED_MODULES and not name.startswith(("fedn.", "scaleoututil."))


# -- frames -----------------------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    """One frame (length prefix included) from a JSON-able message holding arrays and bytes."""
    arrays: list[np.ndarray] = []

    def walk(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            a = x if x.flags.c_contiguous else np.array(x, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
            if a.dtype.kind not in _NUMERIC_KINDS:
                raise ServerFunctionsError(f"an array of dtype {a.dtype} cannot be sent (numbers and bools only)")
            arrays.append(a)
            return {"__nd__": len(arrays) - 1}
        if isinstance(x, np.generic):
            return walk(x.item())
        if isinstance(x, (bytes, bytearray, memoryview)):
            arrays.append(np.frombuffer(bytes(x), dtype=np.uint8))
            return {"__bytes__": len(arrays) - 1}
        if isinstance(x, Mapping):
            return {str(k) if isinstance(k, str) else _key(k): walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        raise ServerFunctionsError(f"a {type(x).__name__} cannot be sent (numbers, strings, lists, dicts and numpy arrays only)")

    body = walk(dict(message))
    header = json.dumps({"m": body, "a": [[a.dtype.str, list(a.shape)] for a in arrays]}, separators=(",", ":")).encode()
    size = 4 + len(header) + sum(a.nbytes for a in arrays)
    if size > MAX_FRAME:
        raise ServerFunctionsError(f"a message of {size} bytes is more than {MAX_FRAME} allows")
    return b"".join([struct.pack(">II", size, len(header)), header, *(a.tobytes() for a in arrays)])


def _key(k: Any) -> str:
    if isinstance(k, (int, float, bool)) or k is None:
        return json.dumps(k)
    raise ServerFunctionsError(f"a dict key of type {type(k).__name__} cannot be sent")


def frame_size(prefix: bytes, limit: int = MAX_FRAME) -> int:
    """The size of the frame that follows its 4-byte length prefix; refused (before the
    frame is read) when it is more than ``limit``."""
    (size,) = struct.unpack(">I", prefix)
    if size > limit:
        raise ServerFunctionsError(f"a frame of {size} bytes, more than the {limit} this answer may take")
    if not 4 <= size <= MAX_FRAME:
        raise ServerFunctionsError(f"a frame of {size} bytes")
    return int(size)


def reply_limit(method: str, model_bytes: int = 0) -> int:
    """The largest frame the worker may answer ``method`` with: a model (as float64, the
    widest dtype an aggregate is cast from) plus slack for aggregates, the class's kept
    state for a snapshot, ``MAX_REPLY`` for anything else."""
    if method in ("aggregate", "get_incremental_aggregate_model"):
        return model_bytes + MAX_REPLY
    if method == "state":
        return MAX_STATE + MAX_REPLY
    return MAX_REPLY


def model_bytes(template: Mapping[str, np.ndarray]) -> int:
    """The bytes of ``template`` as float64."""
    return sum(int(a.size) * 8 for a in template.values())


def decode(frame: bytes | memoryview) -> dict[str, Any]:
    """A message from a frame (without its length prefix). Arrays are read-only views.
    Whatever is malformed in it is a ServerFunctionsError."""
    try:
        return _decode(memoryview(frame))
    except ServerFunctionsError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError, MemoryError, struct.error) as exc:
        raise ServerFunctionsError(f"a malformed frame from the worker ({type(exc).__name__}: {str(exc)[:200]})") from None


def _decode(view: memoryview) -> dict[str, Any]:
    (hlen,) = struct.unpack(">I", view[:4])
    if 4 + hlen > len(view):
        raise ValueError(f"a header of {hlen} bytes in a frame of {len(view)}")
    header = json.loads(bytes(view[4:4 + hlen]))
    offset = 4 + hlen
    arrays: list[np.ndarray] = []
    for dtype_str, shape in header["a"]:
        dtype = np.dtype(dtype_str)
        if dtype.kind not in _NUMERIC_KINDS:
            raise ServerFunctionsError(f"an array of dtype {dtype} in a frame")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape):
            raise ValueError(f"an array of shape {str(shape)[:60]}")
        n = math.prod(shape) * dtype.itemsize
        if offset + n > len(view):
            raise ValueError("arrays past the frame's end")
        arrays.append(np.frombuffer(view[offset:offset + n], dtype=dtype).reshape(shape))
        offset += n

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if len(x) == 1 and "__nd__" in x:
                return arrays[x["__nd__"]]
            if len(x) == 1 and "__bytes__" in x:
                return arrays[x["__bytes__"]].tobytes()
            if len(x) == 1 and "__float__" in x:
                return float(x["__float__"])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    out = walk(header["m"])
    if not isinstance(out, dict):
        raise TypeError("a frame that holds no message")
    return out


# -- checks on results --------------------------------------------------------------------------


def check_selection(result: Any, offered: Sequence[str]) -> list[str]:
    """``client_selection``'s answer: a list of names among those offered, each once."""
    if isinstance(result, np.ndarray):
        result = result.tolist()
    if not isinstance(result, (list, tuple)) or not all(isinstance(c, str) for c in result):
        raise ServerFunctionsError(f"client_selection must return a list of client names, it returned {_what(result)}")
    strangers = sorted(set(result) - set(offered))
    if strangers:
        raise ServerFunctionsError(f"client_selection returned clients that were not offered: {', '.join(strangers[:5])}")
    return list(dict.fromkeys(result))


def check_settings(result: Any) -> dict[str, Any]:
    """``client_settings``'s answer: a JSON object (string keys, finite numbers)."""
    if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
        raise ServerFunctionsError(f"client_settings must return a dict with string keys, it returned {_what(result)}")
    try:
        size = len(json.dumps(result, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:
        raise ServerFunctionsError(f"client_settings must return primitive values (numbers, strings, lists, dicts): {str(exc)[:200]}") from None
    if size > MAX_SETTINGS:
        raise ServerFunctionsError(f"client_settings must return at most {MAX_SETTINGS} bytes of settings (JSON), it returned {size}")
    return result


def check_model(result: Any, template: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    """An aggregate as Edge returns it (a list of arrays in the model's tensor order) checked
    against the model: as many tensors, the same shapes, numbers; cast to the model's dtypes
    (ints rounded; a value the dtype cannot hold or a NaN is refused)."""
    from scaleout.core.aggregators.base import cast_mean

    names = list(template)
    if not isinstance(result, (list, tuple)):
        raise ServerFunctionsError(f"{what} must return a list of numpy arrays, it returned {_what(result)}")
    if len(result) != len(names):
        raise ServerFunctionsError(f"{what} returned {len(result)} arrays; the model has {len(names)} tensors")
    out: dict[str, np.ndarray] = {}
    for i, (name, value) in enumerate(zip(names, result)):
        try:
            a = np.asarray(value)
        except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as exc:  # a ragged list, say
            raise ServerFunctionsError(f"{what} returned what is not an array at position {i} ({type(exc).__name__}: {str(exc)[:120]})") from None
        want = template[name]
        if a.dtype.kind not in _NUMERIC_KINDS:
            raise ServerFunctionsError(f"{what} returned an array of dtype {a.dtype} at position {i}; tensor {name!r} is {want.dtype}")
        if a.shape != want.shape:
            raise ServerFunctionsError(f"{what} returned shape {a.shape} at position {i}; tensor {name!r} has shape {want.shape}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ServerFunctionsError(f"{what} returned NaN or inf in tensor {name!r} (position {i})")
        try:
            out[name] = a if a.dtype == want.dtype else cast_mean(name, a.astype(np.float64), want.dtype.name)
        except ScaleoutError as exc:
            raise ServerFunctionsError(f"{what}: {exc}") from None
    return out


def _what(x: Any) -> str:
    text = repr(x)
    return f"{type(x).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
