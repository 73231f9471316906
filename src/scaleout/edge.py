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
MetricSink = Callable[[dict[str, float], Union[int, None]], Union[bool, None]]
LogSink = Callable[[str, dict[str, Any]], Union[bool, None]]  # ("attributes" | "telemetry", data) -> sent


class ScaleoutModel:
    """A model as safetensors bytes; parameters are decoded on demand."""

    __slots__ = ("_data", "_id")

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"ScaleoutModel needs bytes, got {type(data).__name__}")
        self._data: bytes | memoryview = bytes(data)
        self._id: str | None = None

    @classmethod
    def _owning(cls, data: memoryview) -> ScaleoutModel:
        """Wrap a read-only buffer nothing else holds (payload.encode_buffer's), uncopied."""
        model = cls.__new__(cls)
        model._data, model._id = data, None
        return model

    @classmethod
    def from_bytes(cls, data: bytes) -> ScaleoutModel:
        """Wrap safetensors bytes (as produced by `to_bytes`)."""
        return cls(data)

    @classmethod
    def from_model_params(cls, arrays: Params | Sequence[np.ndarray], helper: object = None) -> ScaleoutModel:
        """Build from a list of arrays (order kept) or a dict of named arrays; `helper` is ignored."""
        from scaleout.core import payload

        if isinstance(arrays, Mapping):
            return cls._owning(payload.encode_buffer(dict(arrays)))
        if isinstance(arrays, (list, tuple)):
            return cls._owning(payload.encode_buffer(list(arrays)))
        raise TypeError(f"model params must be a list or dict of arrays, got {type(arrays).__name__}")

    from_training_model = from_model_params

    def get_model_params(self, helper: object = None) -> Params:
        """Fresh arrays: a list if built from a list, else a dict; `helper` is ignored."""
        from scaleout.core import payload

        return payload.decode(self._data)

    get_training_model = get_model_params

    def to_bytes(self) -> bytes:
        if not isinstance(self._data, bytes):  # built from arrays: made bytes once, when asked
            self._data = bytes(self._data)
        return self._data

    @classmethod
    def from_stream(cls, stream: Any) -> ScaleoutModel:
        """Read a model from a binary stream: safetensors bytes, or a .npz from numpyhelper."""
        return cls(_as_safetensors(stream.read()))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ScaleoutModel:
        """Read a model file: .safetensors, or a .npz written by numpyhelper (as Edge saves them)."""
        with open(path, "rb") as fh:
            return cls.from_stream(fh)

    def save_to_file(self, path: str | os.PathLike[str]) -> None:
        """Write the model: as a numpyhelper .npz when ``path`` ends in .npz, else as safetensors."""
        if os.fspath(path).endswith(".npz"):
            from scaleoututil.helpers.numpyhelper import Helper

            Helper().save(self.get_model_params(), path)
        else:
            with open(path, "wb") as fh:
                fh.write(self._data)

    def get_stream(self) -> Any:
        """A fresh binary stream of the model's (safetensors) bytes."""
        import io

        return io.BytesIO(self._data)

    @property
    def checksum(self) -> str:
        """sha256 hex digest of the bytes (the model id)."""
        return self.model_id

    def verify_checksum(self, checksum: str | None) -> bool:
        return checksum is None or checksum == self.model_id

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


def _as_safetensors(data: bytes) -> bytes:
    """``data`` as safetensors bytes: a .npz (a zip, as numpyhelper writes) is converted."""
    if data[:2] != b"PK":
        return data
    import io

    from scaleout.core import payload
    from scaleoututil.helpers.numpyhelper import Helper

    params = Helper().load(io.BytesIO(data))
    return payload.encode(params if isinstance(params, dict) else list(params))


def _tensor_count(data: bytes | memoryview) -> str:
    from scaleout.core import payload
    from scaleout.core.errors import PayloadError

    try:
        return str(len(payload.describe(data)))
    except PayloadError:
        return "?"


class EdgeClient:
    """What a package's `startup(client)` receives: callback registry, metrics, attributes,
    telemetry, abort checks. Constructed as in Scaleout Edge: ``EdgeClient(train_callback=...,
    validate_callback=...)``; the runtime names it (``name``, ``client_id``) before startup().
    """

    def __init__(
        self,
        train_callback: TrainCallback | str | None = None,
        validate_callback: ValidateCallback | None = None,
        runtime: object = None,
        *,
        name: str | None = None,
    ) -> None:
        if isinstance(train_callback, str):  # EdgeClient("site-1"): a name, as earlier versions took it
            name, train_callback = train_callback, None
        self.name: str = name or os.environ.get("SCALEOUT_CLIENT_NAME") or "client"
        self.client_id: str = self.name  # Scaleout Edge's server-given id: here the client's name
        self.package_path: str = "."
        self._train: TrainCallback | None = None
        self._validate: ValidateCallback | None = None
        self._predict: PredictCallback | None = None
        self._custom: dict[str, CustomCallback] = {}
        # Set by the runtime: where metrics, attributes and telemetry go, and the current task's abort flag.
        self._metric_sink: MetricSink | None = None
        self._log_sink: LogSink | None = None
        self._abort: threading.Event = threading.Event()
        self._abort_reason = "the session was stopped"
        self._step = 0  # log_metric's step within the current task (Edge's logging context)
        self._attributes: dict[str, Any] = {}  # all attributes logged so far, sent again on reconnect
        if train_callback is not None:
            self.set_train_callback(train_callback)
        if validate_callback is not None:
            self.set_validate_callback(validate_callback)

    def registered(self) -> list[str]:
        """Names of the callbacks startup() registered, e.g. ['train', 'validate', 'custom:x']."""
        names = [k for k in ("train", "validate", "predict") if getattr(self, f"_{k}") is not None]
        return names + [f"custom:{k}" for k in sorted(self._custom)]

    # -- package side ---------------------------------------------------------

    def set_name(self, name: str) -> None:
        """Set the name the package uses for this client (its logs, its data shard). The
        client is known to the federation by its ``--name``; this does not rename it there."""
        if not isinstance(name, str) or not name:
            raise ValueError("set_name needs a non-empty string")
        self.name = name

    def set_client_id(self, client_id: str) -> None:
        self.client_id = str(client_id)

    def set_train_callback(self, callback: TrainCallback) -> None:
        self._train = _callable(callback, "train")

    def set_validate_callback(self, callback: ValidateCallback) -> None:
        self._validate = _callable(callback, "validate")

    def set_predict_callback(self, callback: PredictCallback) -> None:
        """``callback(model, params) -> dict``, run by ``scaleout predict run``."""
        self._predict = _callable(callback, "predict")

    set_inference_callback = set_predict_callback  # Scaleout Edge's newer name

    def set_custom_callback(self, name: str, callback: CustomCallback) -> None:
        """``callback(params) -> dict``, run by ``scaleout command run NAME``. Edge's
        ``Custom_`` prefix is optional: ``Custom_x`` and ``x`` name the same command."""
        from scaleout.core.commands import command_key

        if not isinstance(name, str) or not name:
            raise ValueError("custom callback name must be a non-empty string")
        self._custom[command_key(name)] = _callable(callback, f"custom {name!r}")

    def remove_custom_callback(self, name: str) -> None:
        from scaleout.core.commands import command_key

        self._custom.pop(command_key(name), None)

    def log_metric(self, metrics: dict[str, float], step: int | None = None, commit: bool = True, check_task_abort: bool = True) -> bool:
        """Report scalar metrics of the running task, as Scaleout Edge does: each call is sent
        at once, at ``step``; without ``step`` the task's current step is used (it starts at
        0 in each task); a given ``step`` becomes the current one; ``commit`` (the default)
        then moves the current step on by one, so ``commit=False`` logs more metrics at the
        same step. Returns False when nothing could be sent (outside a task, or offline).
        With ``check_task_abort`` it then raises TaskAborted if the task was stopped.

        One call may take at most 64 KiB as JSON: beyond that this raises LimitExceeded (a
        ValueError). The combiner forwards about 16 KiB/s of metrics per client (bursts of
        256 KiB) and drops the excess.
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
        if step is None:
            step = self._step
        else:
            self._step = step
        check_size(metric_body(clean, step), MAX_METRIC_BYTES, "log_metric: this message", "log fewer or shorter metric names per call")
        if commit:
            self._step += 1
        sent = bool(clean) and self._metric_sink is not None and self._metric_sink(clean, step) is not False
        if check_task_abort:
            self.check_task_abort()
        return sent

    def log_attributes(self, attributes: dict[str, Any], priority: str | None = None, check_task_abort: bool = True) -> bool:
        """Describe this client (``{"site": "lab-3", "gpu": "none"}``): merged into what it
        logged before, stored with the client and shown by ``scaleout client show NAME`` and
        ``client ls --json``. Values must be JSON (text, numbers, lists, dicts); at most 64 KiB
        in all. Sent again whenever the client reconnects. ``priority`` is accepted and ignored."""
        if not isinstance(attributes, Mapping):
            raise TypeError(f"log_attributes expects a dict, got {type(attributes).__name__}")
        clean = _strict_json(attributes, "log_attributes")
        check_size({**self._attributes, **clean}, MAX_METRIC_BYTES, "log_attributes: all attributes", "describe the client in a few words")
        self._attributes.update(clean)
        sent = self._log_sink is not None and self._log_sink("attributes", dict(self._attributes)) is not False
        if check_task_abort:
            self.check_task_abort()
        return sent

    def log_telemetry(
        self,
        key: str | dict[str, Any] | None = None,
        payload: dict[str, Any] | None = None,
        telemetry: dict[str, Any] | None = None,
        priority: str | None = None,
        check_task_abort: bool = True,
    ) -> bool:
        """Report an observation about the device: ``log_telemetry(key="gpu_temp",
        payload={"value": 71})``. The legacy form ``log_telemetry({"cpu": 0.4, "mem": 0.7})``
        (or ``telemetry=``) sends one record per pair, each as ``{"value": v}``. Stored with
        the client's reports (``scaleout telemetry ls``); same size and rate limits as
        log_metric. ``priority`` is accepted and ignored."""
        if isinstance(key, Mapping):
            import warnings

            warnings.warn("log_telemetry: passing a dict positionally is deprecated; use key= and payload=", DeprecationWarning, stacklevel=2)
            telemetry, key = dict(key), None
        records: list[tuple[str, Any]] = []
        if key is not None:
            if not isinstance(key, str) or not key:
                raise TypeError(f"log_telemetry key must be a non-empty string, got {key!r:.40}")
            if payload is not None and not isinstance(payload, Mapping):
                raise TypeError(f"log_telemetry payload must be a dict, got {type(payload).__name__}")
            records.append((key, _strict_json(payload or {}, "log_telemetry")))
        if telemetry is not None:
            if not isinstance(telemetry, Mapping):
                raise TypeError(f"log_telemetry telemetry must be a dict of key -> value, got {type(telemetry).__name__}")
            for k, v in telemetry.items():
                if not isinstance(k, str) or not k:
                    raise TypeError(f"telemetry keys must be non-empty strings, got {k!r:.40}")
                records.append((k, _strict_json({"value": v}, "log_telemetry")))
        if not records:
            raise TypeError("log_telemetry needs key= (and payload=) or a dict of key -> value")
        for k, p in records:
            check_size({"key": k, "payload": p}, MAX_METRIC_BYTES, "log_telemetry: this record", "send a few numbers, not data")
        sent = self._log_sink is not None
        for k, p in records:
            sent = sent and self._log_sink is not None and self._log_sink("telemetry", {"key": k, "payload": p}) is not False
        if check_task_abort:
            self.check_task_abort()
        return sent

    def _flush_metrics(self) -> None:
        """Called by the runtime as a task ends. Nothing is held: log_metric sends every call
        at once, as Scaleout Edge does (commit=False only keeps the step), so each metric goes
        with the round of the task that logged it."""

    def check_task_abort(self) -> None:
        """Raise TaskAborted if the runtime has stopped the current task."""
        if self._abort.is_set():
            raise TaskAborted(f"task aborted: {self._abort_reason}")

    # -- runtime side ---------------------------------------------------------

    def _stop_task(self, reason: str) -> None:
        """Make check_task_abort() raise from now on, saying why (until the next task starts)."""
        self._abort_reason = reason
        self._abort.set()

    def run_train(self, model_bytes: bytes, settings: dict[str, Any]) -> tuple[bytes | memoryview, dict[str, Any]]:
        """Run the train callback; return (model bytes, JSON-safe metadata). The bytes may be
        a read-only memoryview (payload.encode_buffer's): sent and hashed as they are, never
        joined into a bytes object."""
        from scaleout.core import payload
        from scaleout.core.updates import read_num_examples

        if self._train is None:
            raise UpdateRejected("no train callback registered: call client.set_train_callback() in startup()")
        self._step = 0  # each task logs its metrics from step 0
        result = self._train(ScaleoutModel(model_bytes), dict(settings))
        if not isinstance(result, tuple) or len(result) != 2:
            raise UpdateRejected(
                f"train callback must return (model, metadata), got {_describe(result)}"
            )
        model, metadata = result
        data: bytes | memoryview
        if isinstance(model, ScaleoutModel):
            data = model._data
        elif isinstance(model, (list, tuple, Mapping)):
            data = payload.encode_buffer(dict(model) if isinstance(model, Mapping) else list(model))
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
        self._step = 0
        result = _result_dict(self._validate(ScaleoutModel(model_bytes)), "validate")
        check_size(result, MAX_RESULT_BYTES, "the validate result", "return a few numbers, not data")
        return result

    def run_predict(self, model_bytes: bytes, params: dict[str, Any]) -> dict[str, Any]:
        """The predict callback on a model; its result must be a JSON object of at most 64 KiB
        (else CommandFailed: ``no_such_command``, ``not_json`` or ``too_large``). This is the
        hook a package runtime implements for ``scaleout predict run``."""
        from scaleout.core.commands import NO_SUCH_COMMAND, json_result
        from scaleout.core.errors import CommandFailed

        if self._predict is None:
            raise CommandFailed(NO_SUCH_COMMAND, "no predict callback registered: call client.set_predict_callback() in startup()")
        return json_result(self._predict(ScaleoutModel(model_bytes), dict(params)), "predict")

    def run_custom(self, name: str, params: dict[str, Any]) -> dict[str, Any]:
        """The custom callback ``name`` (with or without Edge's ``Custom_`` prefix)."""
        from scaleout.core.commands import NO_SUCH_COMMAND, command_key, json_result
        from scaleout.core.errors import CommandFailed

        callback = self._custom.get(command_key(name))
        if callback is None:
            known = ", ".join(sorted(self._custom)) or "none"
            raise CommandFailed(NO_SUCH_COMMAND, f"no custom command {name!r} registered (registered: {known})")
        return json_result(callback(dict(params)), f"command {command_key(name)!r}")


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


def _strict_json(value: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``value`` as plain JSON types (numpy values converted); a TypeError says where it is not JSON."""
    from scaleout.core.commands import strict_json
    from scaleout.core.errors import CommandFailed

    try:
        return strict_json(dict(value), "it", what)  # type: ignore[no-any-return]
    except CommandFailed as exc:
        raise TypeError(str(exc)) from None


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
