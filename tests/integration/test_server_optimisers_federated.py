"""FedYogi, FedAdaGrad and FedAvgM over real processes: with 1 and with 3 combiners (clients
spread unequally) each session commits the model its server step gives on the flat weighted
mean, round after round, keeping its state with each round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from conftest import FIXTURES, federation
from test_strategies import _shift, assert_models

from scaleout.core import payload
from scaleout.core.aggregators import make_strategy

PACKAGE = FIXTURES / "shift_client"
CLIENTS = [f"s{i}" for i in range(5)]
RUNS = [
    ("fedyogi", {"learning_rate": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}),
    ("fedadagrad", {"learning_rate": 0.05, "tau": 1e-3}),
    ("fedavgm", {"server_learning_rate": 0.8, "momentum": 0.6}),
]
ROUNDS = 2


def expected(seed: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The model after each round of each session, the sessions one after the other."""
    shift = _shift()
    deltas, weights = zip(*(shift(c) for c in CLIENTS))  # type: ignore[operator]
    w = np.array(weights, dtype=np.float64)
    model = [a.copy() for a in seed]
    out = []
    for name, kwargs in RUNS:
        strategy = make_strategy(name, kwargs)
        state: dict[str, Any] = {}
        for _ in range(ROUNDS):
            ups = [[model[0] + np.float32(d), model[1] - 2 * d, model[2] + round(100 * d)] for d in deltas]
            mean = {str(k): np.average(np.stack([u[k].astype(np.float64) for u in ups]), axis=0, weights=w) for k in range(3)}
            new, state = strategy.step({str(k): v for k, v in enumerate(model)}, mean, state)
            model = [new[str(k)] for k in range(3)]
            out.append(model)
    return out


def run(tmp: Path, n_combiners: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    tmp.mkdir()
    with federation(tmp) as fed:
        fed.controller()
        seed_id = fed.seed_from(PACKAGE)
        for c in range(n_combiners):
            fed.combiner(f"c{c}")
        for name in CLIENTS:
            fed.client(name, package=PACKAGE)
        fed.wait_clients(len(CLIENTS))

        def model(model_id: str) -> list[np.ndarray]:
            data = fed.admin("model.get", {"id": model_id})[1]
            assert data is not None
            decoded = payload.decode(data)
            assert isinstance(decoded, list)
            return decoded

        got = []
        for name, kwargs in RUNS:
            session = fed.run_session(rounds=ROUNDS, min_clients=len(CLIENTS), validate=False, aggregator=name, aggregator_kwargs=kwargs)
            assert session["status"] == "finished", session
            states = [r["server_state"] for r in session["rounds"]]
            assert all(states) and len(set(states)) == ROUNDS  # state kept with each round
            got += [model(r["model_id"]) for r in session["rounds"]]
        return model(seed_id), got


def test_optimisers_give_the_same_model_with_one_or_three_combiners(tmp_path: Path) -> None:
    seed, one = run(tmp_path / "one", 1)
    _, three = run(tmp_path / "three", 3)
    want = expected(seed)
    assert len(one) == len(three) == len(want) == ROUNDS * len(RUNS)
    for got1, got3, w in zip(one, three, want, strict=True):
        assert_models(got1, w)
        assert_models(got3, w)
