from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from scaleout import EdgeClient, ScaleoutModel
from scaleout.core import payload
from scaleout.core.errors import LimitExceeded, TaskAborted, UpdateRejected
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
    client.log_metric({"loss": 1.0})  # no sink: dropped quietly
    sent: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: sent.append((metrics, step))
    client.log_metric({"loss": np.float32(0.25), "it": 3}, step=2)
    client.log_metric({"a": 1.0}, commit=False)
    assert len(sent) == 1
    client.log_metric({"b": 2.0})
    assert sent == [({"loss": 0.25, "it": 3}, 2), ({"a": 1.0, "b": 2.0}, None)]
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
    assert len(sent) == 2


def test_log_metric_refuses_a_message_above_64_kib_and_holds_nothing() -> None:
    client = EdgeClient()
    sent: list[tuple[dict[str, float], int | None]] = []
    client._metric_sink = lambda metrics, step: sent.append((metrics, step))
    client.log_metric({"a": 1.0}, commit=False)
    with pytest.raises(LimitExceeded, match=r"log_metric: this message is 390\.7 KiB as JSON; the limit is 64\.0 KiB") as info:
        client.log_metric({"\u00e9" * 200_000: 1.0})
    assert isinstance(info.value, ValueError)  # what user code checking metrics may catch
    # Held metrics count too: many small ones committed later may not add up past the limit.
    with pytest.raises(LimitExceeded):
        for i in range(10_000):
            client.log_metric({f"metric-{i:05}": 1.0}, commit=False)
    client._pending.clear()
    client.log_metric({"b": 2.0})
    assert sent == [({"b": 2.0}, None)]


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
    with pytest.raises(UpdateRejected, match=r"'nope'.*registered: ping"):
        client.run_custom("nope", {})


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
