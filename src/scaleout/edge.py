"""The compute-package API, kept compatible with Scaleout Edge.

A package's `startup(client)` registers callbacks on an `EdgeClient`; the client
role then calls `run_train` / `run_validate` / ... from a worker thread with raw
safetensors bytes and gets bytes and JSON-safe dicts back.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from scaleout.core.errors import TaskAborted, UpdateRejected
from scaleout.core.limits import MAX_METRIC_BYTES, MAX_RESULT_BYTES, check_size, metric_body
from scaleout.core.units import fmt_bytes

if TYPE_CHECKING:
    import numpy as np

    Params = Union[list[np.ndarray], dict[str, np.ndarray]]

TrainResult = tuple[Any, dict[str, Any]]
TrainCallback = Callable[["ScaleoutModel", dict[str, Any]], TrainResult]
ValidateCallback = Callable[["ScaleoutModel"], dict[str, Any]]
PredictCallback = Callable[["ScaleoutModel", dict[str, Any]], dict[str, Any]]
CustomCallback = Callable[[dict[str, Any]], dict[str, Any]]
MetricSink = Callable[[dict[str, float], Union[int, None]], None]


class ScaleoutModel:
    """A model as safetensors bytes; parameters are decoded on demand."""

    __slots__ = ("_data", "_id")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"ScaleoutModel needs bytes, got {type(data).__name__}")
        self._data = bytes(data)
        self._id: str | None = None

    @classmethod
    def from_bytes(cls, data: bytes) -> ScaleoutModel:
        """Wrap safetensors bytes (as produced by `to_bytes`)."""
        return cls(data)

    @classmethod
    def from_model_params(cls, arrays: Params | Sequence[np.ndarray], helper: object = None) -> ScaleoutModel:
        """Build from a list of arrays (order kept) or a dict of named arrays; `helper` is ignored."""
        from scaleout.core import payload

        if isinstance(arrays, Mapping):
            return cls(payload.encode(dict(arrays)))
        if isinstance(arrays, (list, tuple)):
            return cls(payload.encode(list(arrays)))
        raise TypeError(f"model params must be a list or dict of arrays, got {type(arrays).__name__}")

    from_training_model = from_model_params

    def get_model_params(self, helper: object = None) -> Params:
        """Fresh arrays: a list if built from a list, else a dict; `helper` is ignored."""
        from scaleout.core import payload

        return payload.decode(self._data)

    get_training_model = get_model_params

    def to_bytes(self) -> bytes:
        return self._data

    @property
    def model_id(self) -> str:
        """sha256 hex digest of the bytes."""
        if self._id is None:
            self._id = hashlib.sha256(self._data).hexdigest()
        return self._id

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ScaleoutModel) and other._data == self._data

    def __hash__(self) -> int:
        return hash(self.model_id)

    def __repr__(self) -> str:
        return f"ScaleoutModel({_tensor_count(self._data)} tensors, {fmt_bytes(len(self._data))}, id={self.model_id[:12]})"


def _tensor_count(data: bytes) -> str:
    from scaleout.core import payload
    from scaleout.core.errors import PayloadError

    try:
        return str(len(payload.describe(data)))
    except PayloadError:
        return "?"


class EdgeClient:
    """What a package's `startup(client)` receives: callback registry, metrics, abort checks."""

    def __init__(self, name: str | None = None) -> None:
        self.name: str = name or os.environ.get("SCALEOUT_CLIENT_NAME") or "client"
        self._train: TrainCallback | None = None
        self._validate: ValidateCallback | None = None
        self._predict: PredictCallback | None = None
        self._custom: dict[str, CustomCallback] = {}
        # Set by the runtime: where metrics go, and the current task's abort flag.
        self._metric_sink: MetricSink | None = None
        self._abort: threading.Event = threading.Event()
        self._abort_reason = "the session was stopped"
        self._pending: dict[str, float] = {}

    def registered(self) -> list[str]:
        """Names of the callbacks startup() registered, e.g. ['train', 'validate', 'custom:x']."""
        names = [k for k in ("train", "validate", "predict") if getattr(self, f"_{k}") is not None]
        return names + [f"custom:{k}" for k in sorted(self._custom)]

    # -- package side ---------------------------------------------------------

    def set_train_callback(self, callback: TrainCallback) -> None:
        self._train = _callable(callback, "train")

    def set_validate_callback(self, callback: ValidateCallback) -> None:
        self._validate = _callable(callback, "validate")

    def set_predict_callback(self, callback: PredictCallback) -> None:
        self._predict = _callable(callback, "predict")

    def set_custom_callback(self, name: str, callback: CustomCallback) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("custom callback name must be a non-empty string")
        self._custom[name] = _callable(callback, f"custom {name!r}")

    def log_metric(self, metrics: dict[str, float], step: int | None = None, commit: bool = True) -> None:
        """Report scalar metrics; with commit=False they are held and sent with the next commit.

        One message (the metrics held and these) may take at most 64 KiB as JSON: beyond that
        this raises LimitExceeded (a ValueError) and nothing is held. The combiner forwards
        about 16 KiB/s of metrics per client (bursts of 256 KiB) and drops the excess.
        """
        if not isinstance(metrics, Mapping):
            raise TypeError(f"log_metric expects a dict of name -> number, got {type(metrics).__name__}")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"log_metric step must be an int or None, got {type(step).__name__}")
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"metric names must be non-empty strings, got {key!r}")
            number = _number(value)
            if number is None:
                raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}")
            if not math.isfinite(number):
                raise ValueError(f"metric {key!r} is {number}, not a finite number")
            clean[key] = number
        check_size(
            metric_body({**self._pending, **clean}, step), MAX_METRIC_BYTES, "log_metric: this message",
            "log fewer or shorter metric names per call",
        )
        self._pending.update(clean)
        if not commit:
            return
        batch, self._pending = self._pending, {}
        if batch and self._metric_sink is not None:
            self._metric_sink(batch, step)

    def _flush_metrics(self) -> None:
        """Send what log_metric(commit=False) still holds (the runtime calls it as a task ends,
        so held metrics go with that task's round, not the next one's)."""
        batch, self._pending = self._pending, {}
        if batch and self._metric_sink is not None:
            self._metric_sink(batch, None)

    def check_task_abort(self) -> None:
        """Raise TaskAborted if the runtime has stopped the current task."""
        if self._abort.is_set():
            raise TaskAborted(f"task aborted: {self._abort_reason}")

    # -- runtime side ---------------------------------------------------------

    def _stop_task(self, reason: str) -> None:
        """Make check_task_abort() raise from now on, saying why (until the next task starts)."""
        self._abort_reason = reason
        self._abort.set()

    def run_train(self, model_bytes: bytes, settings: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """Run the train callback; return (model bytes, JSON-safe metadata)."""
        from scaleout.core import payload
        from scaleout.core.updates import read_num_examples

        if self._train is None:
            raise UpdateRejected("no train callback registered: call client.set_train_callback() in startup()")
        result = self._train(ScaleoutModel(model_bytes), dict(settings))
        if not isinstance(result, tuple) or len(result) != 2:
            raise UpdateRejected(
                f"train callback must return (model, metadata), got {_describe(result)}"
            )
        model, metadata = result
        if isinstance(model, ScaleoutModel):
            data = model.to_bytes()
        elif isinstance(model, (list, tuple, Mapping)):
            data = payload.encode(dict(model) if isinstance(model, Mapping) else list(model))
        else:
            raise UpdateRejected(
                f"train callback must return a ScaleoutModel or a list/dict of arrays as the model, got {_describe(model)}"
            )
        if not isinstance(metadata, Mapping):
            raise UpdateRejected(
                'train callback must return a metadata dict like {"training_metadata": {"num_examples": n}}, '
                f"got {_describe(metadata)}"
            )
        safe = json_safe(dict(metadata))
        read_num_examples(safe)
        check_size({"metadata": safe}, MAX_RESULT_BYTES, "the training metadata", "return a few numbers, not data")
        return data, safe

    def run_validate(self, model_bytes: bytes) -> dict[str, Any]:
        if self._validate is None:
            raise UpdateRejected("no validate callback registered: call client.set_validate_callback() in startup()")
        result = _result_dict(self._validate(ScaleoutModel(model_bytes)), "validate")
        check_size(result, MAX_RESULT_BYTES, "the validate result", "return a few numbers, not data")
        return result

    def run_predict(self, model_bytes: bytes, params: dict[str, Any]) -> dict[str, Any]:
        if self._predict is None:
            raise UpdateRejected("no predict callback registered: call client.set_predict_callback() in startup()")
        return _result_dict(self._predict(ScaleoutModel(model_bytes), dict(params)), "predict")

    def run_custom(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        callback = self._custom.get(name)
        if callback is None:
            known = ", ".join(sorted(self._custom)) or "none"
            raise UpdateRejected(f"no custom callback {name!r} registered (registered: {known})")
        return _result_dict(callback(dict(params)), f"custom {name!r}")


def json_safe(value: Any) -> Any:
    """Make `value` strict-JSON serialisable: numpy scalars/arrays to Python, non-finite floats
    to None, anything else unknown to its str()."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist) and type(value).__module__ == "numpy":
        return json_safe(tolist())
    return str(value)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    item = getattr(value, "item", None)  # 0-d numpy values
    if callable(item) and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return _number(item())
    return None


def _callable(callback: Any, what: str) -> Any:
    if not callable(callback):
        raise TypeError(f"{what} callback must be callable, got {type(callback).__name__}")
    return callback


def _result_dict(result: object, what: str) -> dict[str, Any]:
    if not isinstance(result, Mapping):
        raise UpdateRejected(f"{what} callback must return a dict, got {_describe(result)}")
    return json_safe(dict(result))  # type: ignore[no-any-return]


def _describe(value: object) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return "None" if value is None else f"a {type(value).__name__}"
