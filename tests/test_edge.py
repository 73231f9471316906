from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from scaleout import EdgeClient, ScaleoutModel
from scaleout.core import payload
from scaleout.core.errors import CommandFailed, LimitExceeded, TaskAborted, UpdateRejected
from scaleoututil.helpers.helpers import get_helper

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "sample_projects" / "quickstart" / "client"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD_META = {"training_metadata": {"num_examples": 5}}


def mixed_arrays() -> list[np.ndarray]:
    dtypes = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8] * 2
    return [(np.arange(i + 2) * (i + 1)).astype(dt) for i, dt in enumerate(dtypes)]


def model_bytes() -> bytes:
    return ScaleoutModel.from_model_params([np.arange(3, dtype=np.float32)]).to_bytes()


# -- ScaleoutModel --------------------------------------------------------------


def test_list_of_twelve_keeps_order_and_dtypes() -> None:
    arrays = mixed_arrays()
    model = ScaleoutModel.from_bytes(ScaleoutModel.from_model_params(arrays).to_bytes())
    out = model.get_model_params()
    assert isinstance(out, list) and len(out) == 12
    for a, b in zip(arrays, out):
        assert b.dtype == a.dtype and b.shape == a.shape
        assert_array_equal(a, b)
    assert model.model_id == hashlib.sha256(model.to_bytes()).hexdigest()
    assert "12 tensors" in repr(model) and len(repr(model)) < 80


def test_dict_round_trip_and_aliases() -> None:
    named = {"dense.weight": np.ones((2, 3), np.float32), "dense.bias": np.zeros(3, np.float64)}
    model = ScaleoutModel.from_training_model(named, helper=get_helper("numpyhelper"))
    out = model.get_training_model(get_helper("numpyhelper"))
    assert isinstance(out, dict) and list(out) == list(named)  # not sorted, as safetensors would
    assert out["dense.bias"].dtype == np.float64
    assert model == ScaleoutModel.from_model_params(named)
    with pytest.raises(TypeError):
        ScaleoutModel.from_model_params(np.ones(3))  # type: ignore[arg-type]


def test_dict_key_order_survives_a_train_callback() -> None:
    order = ["layer2.weight", "layer1.weight", "a.bias", "z"]
    seen: list[list[str]] = []

    def train(model: ScaleoutModel, settings: dict[str, Any]) -> Any:
        params = model.get_model_params()
        seen.append(list(params))
        return {k: v + 1 for k, v in params.items()}, {"training_metadata": {"num_examples": 1}}

    client = EdgeClient("c")
    client.set_train_callback(train)
    seed = ScaleoutModel.from_model_params({k: np.zeros(2, np.float32) for k in order}).to_bytes()
    data, _ = client.run_train(seed, {})
    assert seen == [order]
    out = payload.decode(data)
    assert isinstance(out, dict) and list(out) == order


# -- run_train ------------------------------------------------------------------


def test_run_train_accepts_model_or_raw_arrays_and_makes_metadata_json_safe() -> None:
    client = EdgeClient("c1")
    seen: dict[str, Any] = {}

    def train(model: ScaleoutModel, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        seen["settings"] = settings
        params = model.get_model_params()
        params[0] = params[0] + 1
        meta = {
            "training_metadata": {"num_examples": np.int64(7), "loss": np.float32(0.5)},
            "hist": np.arange(2),
            "when": object(),
            "bad": float("nan"),
        }
        return (params if settings["raw"] else ScaleoutModel.from_model_params(params)), meta

    client.set_train_callback(train)
    for raw in (False, True):
        data, meta = client.run_train(model_bytes(), {"raw": raw})
        assert_array_equal(payload.decode(data)[0], [1.0, 2.0, 3.0])
        assert meta["training_metadata"] == {"num_examples": 7, "loss": 0.5}
        assert type(meta["training_metadata"]["num_examples"]) is int
        assert meta["hist"] == [0, 1] and meta["bad"] is None and isinstance(meta["when"], str)
        json.dumps(meta, allow_nan=False)
    assert seen["settings"] == {"raw": True}


@pytest.mark.parametrize(
    ("result", "match"),
    [
        (lambda m: m, r"\(model, metadata\)"),
        (lambda m: (m, GOOD_META, 1), r"\(model, metadata\)"),
        (lambda m: (42, GOOD_META), "ScaleoutModel or a list/dict"),
        (lambda m: (m, ["no"]), "metadata dict"),
        (lambda m: (m, {"training_metadata": {"epochs": 1}}), "num_examples"),
        (lambda m: (m, {"training_metadata": {"num_examples": 0}}), "num_examples"),
    ],
)
def test_run_train_rejects_bad_results(result: Any, match: str) -> None:
    client = EdgeClient()
    client.set_train_callback(lambda model, settings: result(model))
    with pytest.raises(UpdateRejected, match=match):
        client.run_train(model_bytes(), {})


def test_run_train_without_callback_and_user_errors_propagate() -> None:
    client = EdgeClient()
    with pytest.raises(UpdateRejected, match=r"set_train_callback\(\) in startup\(\)"):
        client.run_train(model_bytes(), {})
    client.set_train_callback(lambda model, settings: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        client.run_train(model_bytes(), {})
    with pytest.raises(TypeError):
        client.set_train_callback("train")  # type: ignore[arg-type]


def test_check_task_abort() -> None:
    client = EdgeClient()
    client._abort = threading.Event()

    def train(model: ScaleoutModel, settings: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        client.check_task_abort()
        return model, GOOD_META

    client.set_train_callback(train)
    client.run_train(model_bytes(), {})
    client._abort.set()
    with pytest.raises(TaskAborted):
        client.run_train(model_bytes(), {})


def test_log_metric_forwards_to_sink_and_validates() -> None:
    client = EdgeClient()
    assert client.log_metric({"loss": 1.0}) is False  # no sink (outside a task): not sent
    sent: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: sent.append((metrics, step))
    assert client.log_metric({"loss": np.float32(0.25), "it": 3}, step=2) is True
    assert type(sent[0][0]["loss"]) is float
    for bad, error in [
        ("loss", TypeError),
        ({"loss": "high"}, TypeError),
        ({"ok": True}, TypeError),
        ({3: 1.0}, TypeError),
        ({"loss": float("nan")}, ValueError),
    ]:
        with pytest.raises(error):
            client.log_metric(bad)  # type: ignore[arg-type]
    assert len(sent) == 1


def test_log_metric_steps_as_scaleout_edge() -> None:
    """Each call is sent at once; without step= the task's current step is used (from 0 in
    each task); a given step becomes the current one; commit moves it on by one afterwards."""
    client = EdgeClient()
    sent: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: sent.append((metrics, step))
    steps: list[int | None] = []

    def train(model: ScaleoutModel, settings: dict) -> tuple[ScaleoutModel, dict]:
        client.log_metric({"a": 1.0})
        client.log_metric({"b": 1.0}, commit=False)
        client.log_metric({"c": 1.0})
        client.log_metric({"d": 1.0}, step=10)
        client.log_metric({"e": 1.0})
        steps.extend(step for _, step in sent)
        return model, {"training_metadata": {"num_examples": 1}}

    client.set_train_callback(train)
    client.run_train(model_bytes(), {})
    assert steps == [0, 1, 1, 10, 11]
    sent.clear()
    steps.clear()
    client.run_train(model_bytes(), {})  # the next task starts again from 0
    assert steps == [0, 1, 1, 10, 11]
    # An aborted task: log_metric raises (after sending), unless told not to check.
    client._stop_task("the session was stopped")
    assert client.log_metric({"x": 1.0}, check_task_abort=False) is True
    with pytest.raises(TaskAborted):
        client.log_metric({"x": 1.0})


def test_log_metric_refuses_a_message_above_64_kib() -> None:
    client = EdgeClient()
    sent: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: sent.append((metrics, step))
    with pytest.raises(LimitExceeded, match=r"log_metric: this message is 390\.7 KiB as JSON; the limit is 64\.0 KiB") as info:
        client.log_metric({"\u00e9" * 200_000: 1.0})
    assert isinstance(info.value, ValueError)  # what user code checking metrics may catch
    client.log_metric({"b": 2.0})
    assert sent == [({"b": 2.0}, 0)]


def test_run_train_and_validate_refuse_results_above_64_kib() -> None:
    client = EdgeClient()
    meta = {"training_metadata": {"num_examples": 3}, "history": list(range(20_000))}
    client.set_train_callback(lambda model, settings: (model, meta))
    with pytest.raises(LimitExceeded, match="the training metadata is .* the limit is 64.0 KiB"):
        client.run_train(model_bytes(), {})
    client.set_validate_callback(lambda model: {"per_sample": [0.5] * 20_000})
    with pytest.raises(LimitExceeded, match="the validate result is"):
        client.run_validate(model_bytes())
    client.set_validate_callback(lambda model: {"accuracy": 0.5})
    assert client.run_validate(model_bytes()) == {"accuracy": 0.5}


def test_name_defaults_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALEOUT_CLIENT_NAME", raising=False)
    assert EdgeClient().name == "client"
    monkeypatch.setenv("SCALEOUT_CLIENT_NAME", "site-7")
    assert EdgeClient().name == "site-7"
    assert EdgeClient("explicit").name == "explicit"


def test_run_validate_predict_custom() -> None:
    client = EdgeClient()
    with pytest.raises(UpdateRejected, match="set_validate_callback"):
        client.run_validate(model_bytes())
    client.set_validate_callback(lambda model: [0.9])
    with pytest.raises(UpdateRejected, match="must return a dict"):
        client.run_validate(model_bytes())
    client.set_validate_callback(lambda model: {"acc": np.float64(0.9), "n": len(model.get_model_params())})
    assert client.run_validate(model_bytes()) == {"acc": 0.9, "n": 1}
    client.set_predict_callback(lambda model, params: {"y": np.arange(2) * params["k"]})
    assert client.run_predict(model_bytes(), {"k": 3}) == {"y": [0, 3]}
    client.set_custom_callback("ping", lambda params: {"pong": params})
    assert client.run_custom("ping", {"x": 1}) == {"pong": {"x": 1}}
    with pytest.raises(CommandFailed, match=r"no custom command 'nope' registered \(registered: ping\)") as info:
        client.run_custom("nope", {})
    assert info.value.reason == "no_such_command"


def test_custom_prefix_inference_alias_and_strict_json_results() -> None:
    client = EdgeClient()
    with pytest.raises(CommandFailed, match="no predict callback registered") as info:
        client.run_predict(model_bytes(), {})
    assert info.value.reason == "no_such_command"
    client.set_inference_callback(lambda model, params: {"n": len(model)})  # Edge's newer name
    assert client.run_predict(model_bytes(), {}) == {"n": len(model_bytes())}
    client.set_custom_callback("Custom_a", lambda params: {"a": 1})  # Edge's prefix, either side
    client.set_custom_callback("b", lambda params: {"b": 2})
    assert client.run_custom("a", {}) == client.run_custom("Custom_a", {}) == {"a": 1}
    assert client.run_custom("Custom_b", {}) == {"b": 2}
    assert client.registered() == ["predict", "custom:a", "custom:b"]
    client.remove_custom_callback("Custom_b")
    assert client.registered() == ["predict", "custom:a"]
    for value, reason, text in [
        ([1], "not_json", "must return a dict (a JSON object), got a list"),
        (None, "not_json", "got None"),
        ({"x": {1}}, "not_json", "the command 'c' result holds a set at result['x']: not JSON"),
        ({"x": [1, float("nan")]}, "not_json", "holds nan at result['x'][1]"),
        ({1: "a"}, "not_json", "has a key 1 at result that is not a string"),
        ({"x": "y" * (70 << 10)}, "too_large", "the command 'c' result is 70.0 KiB as JSON; the limit is 64.0 KiB"),
    ]:
        client.set_custom_callback("c", lambda params, value=value: value)
        with pytest.raises(CommandFailed) as failed:
            client.run_custom("c", {})
        assert failed.value.reason == reason and text in str(failed.value), str(failed.value)
    client.set_custom_callback("c", lambda params: {"a": np.float32(0.5), "b": np.arange(3), "c": (1, "x")})
    assert client.run_custom("c", {}) == {"a": 0.5, "b": [0, 1, 2], "c": [1, "x"]}


def test_edge_client_constructor_names_attributes_and_telemetry() -> None:
    def train(model: ScaleoutModel, settings: dict) -> tuple[ScaleoutModel, dict]:
        return model, {"training_metadata": {"num_examples": 1}}

    client = EdgeClient(train_callback=train, validate_callback=lambda model: {"acc": 1.0}, name="site-1")
    assert client.registered() == ["train", "validate"]
    assert (client.name, client.client_id) == ("site-1", "site-1")
    client.set_name("renamed")
    client.set_client_id("id-7")
    assert (client.name, client.client_id) == ("renamed", "id-7")
    assert EdgeClient("old-style").name == "old-style"  # a name given positionally, as before
    logged: list[tuple[str, dict]] = []
    # Before the runtime is connected: kept (sent on connect), reported as not sent.
    assert client.log_attributes({"site": "lab", "gpus": np.int64(2)}) is False
    client._log_sink = lambda kind, data: logged.append((kind, data))
    assert client.log_attributes({"os": "linux"}) is True
    assert logged == [("attributes", {"site": "lab", "gpus": 2, "os": "linux"})]
    logged.clear()
    assert client.log_telemetry(key="temp", payload={"value": 41.5, "unit": "C"}) is True
    with pytest.warns(DeprecationWarning):
        client.log_telemetry({"cpu": 0.25, "mem": np.float32(0.5)})
    client.log_telemetry(telemetry={"disk": 3})
    assert logged == [
        ("telemetry", {"key": "temp", "payload": {"value": 41.5, "unit": "C"}}),
        ("telemetry", {"key": "cpu", "payload": {"value": 0.25}}),
        ("telemetry", {"key": "mem", "payload": {"value": 0.5}}),
        ("telemetry", {"key": "disk", "payload": {"value": 3}}),
    ]
    for call, error, text in [
        (lambda: client.log_attributes(["a"]), TypeError, "expects a dict"),  # type: ignore[arg-type]
        (lambda: client.log_attributes({"a": {1, 2}}), TypeError, "log_attributes holds a set at it['a']"),
        (lambda: client.log_attributes({"a": "x" * (70 << 10)}), LimitExceeded, "log_attributes: all attributes is"),
        (lambda: client.log_telemetry(), TypeError, "needs key="),
        (lambda: client.log_telemetry(key=""), TypeError, "non-empty string"),
        (lambda: client.log_telemetry(key="k", payload=[1]), TypeError, "payload must be a dict"),  # type: ignore[arg-type]
        (lambda: client.log_telemetry(key="k", payload={"v": float("inf")}), TypeError, "not JSON"),
        (lambda: client.log_telemetry(key="k", payload={"v": "x" * (70 << 10)}), LimitExceeded, "log_telemetry: this record"),
    ]:
        with pytest.raises(error, match=re.escape(text)):
            call()
    assert client._attributes == {"site": "lab", "gpus": 2, "os": "linux"}  # a refused call changes nothing


def test_scaleoututil_model_import_and_files(tmp_path: Path) -> None:
    from scaleoututil.helpers.numpyhelper import Helper
    from scaleoututil.utils.model import ScaleoutModel as UtilModel

    import scaleout

    assert UtilModel is ScaleoutModel is scaleout.ScaleoutModel
    params = [np.arange(3, dtype=np.float32), np.ones((2, 2))]
    model = ScaleoutModel.from_model_params(params)
    model.save_to_file(tmp_path / "m.safetensors")
    model.save_to_file(tmp_path / "m.npz")  # as Edge's numpyhelper writes it
    for name in ("m.safetensors", "m.npz"):
        back = ScaleoutModel.from_file(tmp_path / name)
        for a, b in zip(back.get_model_params(), params):
            np.testing.assert_array_equal(a, b)
    assert [np.asarray(x).tolist() for x in Helper().load(tmp_path / "m.npz")] == [x.tolist() for x in params]
    assert ScaleoutModel.from_stream(model.get_stream()) == model
    assert model.checksum == model.model_id and model.verify_checksum(model.model_id) and not model.verify_checksum("0" * 64)


# -- packages under FedAvg --------------------------------------------------------


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"pkg_{path.parent.name}_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_and_clients(package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int = 3) -> tuple[bytes, list[EdgeClient]]:
    monkeypatch.setenv("SCALEOUT_BUILD_OUTPUT_DIR", str(tmp_path))
    load_module(package / "build.py").build()
    seed = get_helper("numpyhelper").load(tmp_path / "seed.npz")
    startup = load_module(package / "startup.py")
    clients = []
    for i in range(n):
        client = EdgeClient(f"client-{i + 1}")
        startup.startup(client)
        clients.append(client)
    return ScaleoutModel.from_model_params(seed).to_bytes(), clients


def fedavg(updates: list[tuple[bytes, dict[str, Any]]]) -> bytes:
    """Plain weighted mean in float64, cast back to each tensor's dtype (ints rounded)."""
    models = [payload.decode(data) for data, _ in updates]
    weights = np.array([meta["training_metadata"]["num_examples"] for _, meta in updates], dtype=np.float64)
    out = []
    for tensors in zip(*models):
        mean = sum(w * t.astype(np.float64) for w, t in zip(weights, tensors)) / weights.sum()
        dtype = tensors[0].dtype
        out.append((np.rint(mean) if dtype.kind in "iu" else mean).astype(dtype))
    return payload.encode(out)


def run_rounds(global_bytes: bytes, clients: list[EdgeClient], rounds: int, metric: str) -> tuple[bytes, list[float]]:
    history = [float(np.mean([c.run_validate(global_bytes)[metric] for c in clients]))]
    for _ in range(rounds):
        global_bytes = fedavg([c.run_train(global_bytes, {}) for c in clients])
        history.append(float(np.mean([c.run_validate(global_bytes)[metric] for c in clients])))
    return global_bytes, history


def test_quickstart_learns_under_fedavg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    global_bytes, clients = seed_and_clients(QUICKSTART, tmp_path, monkeypatch)
    logged: list[dict[str, float]] = []
    clients[0]._metric_sink = lambda metrics, step: logged.append(metrics)
    _, accuracy = run_rounds(global_bytes, clients, 3, "validation_accuracy")
    print("quickstart validation_accuracy per round:", [round(a, 3) for a in accuracy])
    assert accuracy[0] < 0.5
    assert all(b > a for a, b in zip(accuracy, accuracy[1:])), accuracy
    assert accuracy[-1] > 0.8
    assert len(logged) == 3 and "train_loss" in logged[0]


def test_quickstart_shards_differ_per_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    startup = load_module(QUICKSTART / "startup.py")
    a, b = startup.make_shard("client-1"), startup.make_shard("client-2")
    assert_array_equal(a[0], startup.make_shard("client-1")[0])
    assert not np.array_equal(a[0], b[0])
    assert not np.array_equal(np.bincount(a[1]), np.bincount(b[1]))


def test_mixed_client_converges_and_keeps_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    global_bytes, clients = seed_and_clients(FIXTURES / "mixed_client", tmp_path, monkeypatch)
    seed = payload.decode(global_bytes)
    assert isinstance(seed, list) and len(seed) == 12
    assert {t.dtype.name for t in seed} >= {"float32", "float64", "float16", "int32", "int64", "uint8"}
    final, mse = run_rounds(global_bytes, clients, 4, "mse")
    print("mixed_client mse per round:", [round(m, 3) for m in mse])
    assert all(b < a for a, b in zip(mse, mse[1:])), mse
    assert mse[-1] < mse[0] / 4
    out = payload.decode(final)
    assert [t.dtype for t in out] == [t.dtype for t in seed]
    assert [t.shape for t in out] == [t.shape for t in seed]
    assert int(out[4][0]) == 4  # the round counter survives averaging as int32


def test_bad_and_nan_fixtures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed, (bad,) = seed_and_clients(FIXTURES / "bad_client", tmp_path, monkeypatch, n=1)
    with pytest.raises(UpdateRejected, match="num_examples"):
        bad.run_train(seed, {})
    seed, (nan,) = seed_and_clients(FIXTURES / "nan_client", tmp_path, monkeypatch, n=1)
    data, meta = nan.run_train(seed, {})  # the client forwards it; the combiner must refuse it
    assert meta["training_metadata"]["num_examples"] == 10
    assert all(np.isnan(t).all() for t in payload.decode(data))
    with pytest.raises(UpdateRejected, match="NaN"):
        payload.check_finite({str(i): t for i, t in enumerate(payload.decode(data))})


def test_a_model_from_arrays_is_a_snapshot_and_gives_bytes() -> None:
    w = np.arange(6, dtype=np.float32)
    model = ScaleoutModel.from_model_params([w])
    w += 100  # after the snapshot: the model keeps the values it was built from
    expected = payload.encode([np.arange(6, dtype=np.float32)])
    assert model == ScaleoutModel(expected) and model.model_id == hashlib.sha256(expected).hexdigest()
    assert_array_equal(model.get_model_params()[0], np.arange(6, dtype=np.float32))
    data = model.to_bytes()
    assert type(data) is bytes and data == expected and len(model) == len(expected)
    # run_train sends what the callback returned without joining it into bytes first
    edge = EdgeClient()
    edge.set_train_callback(lambda m, s: ([p + 1 for p in m.get_model_params()], {"training_metadata": {"num_examples": 1}}))
    update, _ = edge.run_train(expected, {})
    assert isinstance(update, memoryview) and bytes(update) == payload.encode([np.arange(6, dtype=np.float32) + 1])
