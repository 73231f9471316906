"""Strategies over real processes: FedAvg then FedAdam, with 1 and with 3 combiners, give the
model a plain numpy computation predicts, and FedAdam keeps its moments across rounds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from conftest import FIXTURES, federation

from scaleout.core import payload

PACKAGE = FIXTURES / "shift_client"
CLIENTS = [f"s{i}" for i in range(5)]
ADAM = {"learning_rate": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}


def _shift() -> object:
    spec = importlib.util.spec_from_file_location("shift_startup", PACKAGE / "startup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shift


def expected(seed: list[np.ndarray]) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Models after each round of 2 FedAvg rounds then 2 FedAdam rounds, computed plainly."""
    shift = _shift()
    deltas, weights = zip(*(shift(c) for c in CLIENTS))  # type: ignore[operator]
    w = np.array(weights, dtype=np.float64)

    def mean(p: list[np.ndarray]) -> list[np.ndarray]:
        ups = [[p[0] + np.float32(d), p[1] - 2 * d, p[2] + int(round(100 * d))] for d in deltas]
        return [np.average(np.stack([u[k].astype(np.float64) for u in ups]), axis=0, weights=w) for k in range(3)]

    model = [a.copy() for a in seed]
    avg_rounds = []
    for _ in range(2):
        m = mean(model)
        model = [m[0].astype(np.float32), m[1], np.rint(m[2]).astype(np.int32)]
        avg_rounds.append(model)
    lr, b1, b2, tau = ADAM["learning_rate"], ADAM["beta1"], ADAM["beta2"], ADAM["tau"]
    mom = [np.zeros(model[k].shape) for k in range(2)]
    vel = [np.zeros(model[k].shape) for k in range(2)]
    adam_rounds = []
    for _ in range(2):
        m = mean(model)
        new = []
        for k in range(2):
            delta = m[k] - model[k].astype(np.float64)
            mom[k] = b1 * mom[k] + (1 - b1) * delta
            vel[k] = b2 * vel[k] + (1 - b2) * delta**2
            new.append((model[k] + lr * mom[k] / (np.sqrt(vel[k]) + tau)).astype(model[k].dtype))
        model = [*new, np.rint(m[2]).astype(np.int32)]
        adam_rounds.append(model)
    return avg_rounds, adam_rounds


def run(tmp: Path, n_combiners: int) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[list[np.ndarray]], list[dict]]:
    tmp.mkdir()
    with federation(tmp) as fed:
        fed.controller()
        seed_id = fed.seed_from(PACKAGE)
        for c in range(n_combiners):
            fed.combiner(f"c{c}")
        for name in CLIENTS:
            fed.client(name, package=PACKAGE)
        fed.wait_clients(len(CLIENTS))
        loads = sorted(c["clients"] for c in fed.admin("combiner.ls")[0]["combiners"])
        assert loads == ([5] if n_combiners == 1 else [1, 2, 2])  # unequal clients per combiner

        def model(model_id: str) -> list[np.ndarray]:
            data = fed.admin("model.get", {"id": model_id})[1]
            assert data is not None
            decoded = payload.decode(data)
            assert isinstance(decoded, list)
            return decoded

        runs = []
        for config in ({}, {"aggregator": "fedadam", "aggregator_kwargs": ADAM}):
            session = fed.run_session(rounds=2, min_clients=len(CLIENTS), validate=False, **config)
            assert session["status"] == "finished", session
            runs.append(session)
        avg = [model(r["model_id"]) for r in runs[0]["rounds"]]
        adam = [model(r["model_id"]) for r in runs[1]["rounds"]]
        assert all(r["server_state"] is None for r in runs[0]["rounds"])  # FedAvg keeps no state
        states = [r["server_state"] for r in runs[1]["rounds"]]
        assert all(states) and states[0] != states[1]
        assert set(states) <= fed.stored("state")
        return model(seed_id), avg, adam, runs


def assert_models(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=1e-6, atol=1e-6)


def test_fedavg_and_fedadam_same_model_with_one_or_three_combiners(tmp_path: Path) -> None:
    seed, avg1, adam1, _ = run(tmp_path / "one", 1)
    _, avg3, adam3, runs = run(tmp_path / "three", 3)
    want_avg, want_adam = expected(seed)
    for got1, got3, want in zip(avg1 + adam1, avg3 + adam3, want_avg + want_adam, strict=True):
        assert_models(got1, want)
        assert_models(got3, want)
    # FedAdam really stepped: its models differ from what FedAvg would have given.
    assert not np.allclose(adam3[0][0], want_avg[-1][0], atol=1e-3)
    assert runs[1]["config"]["aggregator_kwargs"] == ADAM
