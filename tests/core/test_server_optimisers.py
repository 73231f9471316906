"""FedYogi, FedAdaGrad, FedAvgM and FedProx against plain numpy references of their
formulas over several rounds, float32/float64/float16 tensors (integer and bool ones take
the plain mean), state across rounds, and the same model however the clients are split."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from test_strategy import MODEL, clients, run_rounds, two_stage

from scaleout.core.aggregators import AGGREGATORS, FedAvg, make_strategy
from scaleout.core.aggregators.strategy import FedAdagrad, FedAvgM, FedProx, FedYogi
from scaleout.core.errors import ConfigError

History = list[tuple[list[dict[str, np.ndarray]], list[float]]]


def _means(updates: list[dict[str, np.ndarray]], weights: list[float], k: str) -> np.ndarray:
    return np.average(np.stack([u[k].astype(np.float64) for u in updates]), axis=0, weights=weights)


def reference_adaptive(history: History, lr: float, b1: float, tau: float, second: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """Reddi et al. 2021, Algorithm 2, written out plainly: m from 0, v from tau^2."""
    x = {k: v.astype(np.float64) for k, v in MODEL.items() if v.dtype.kind == "f"}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v2 = {k: np.full_like(v, tau**2) for k, v in x.items()}
    for updates, weights in history:
        for k in x:
            delta = _means(updates, weights, k) - x[k]
            m[k] = b1 * m[k] + (1 - b1) * delta
            v2[k] = second(v2[k], delta**2)
            x[k] = (x[k] + lr * m[k] / (np.sqrt(v2[k]) + tau)).astype(MODEL[k].dtype).astype(np.float64)
    return x


def reference_avgm(history: History, lr: float, beta: float) -> dict[str, np.ndarray]:
    """Hsu et al. 2019: velocity u = beta u + (mean - x); x += lr u."""
    x = {k: v.astype(np.float64) for k, v in MODEL.items() if v.dtype.kind == "f"}
    u = {k: np.zeros_like(v) for k, v in x.items()}
    for updates, weights in history:
        for k in x:
            u[k] = beta * u[k] + (_means(updates, weights, k) - x[k])
            x[k] = (x[k] + lr * u[k]).astype(MODEL[k].dtype).astype(np.float64)
    return x


def reference(name: str, kwargs: dict[str, float], history: History) -> dict[str, np.ndarray]:
    if name == "fedyogi":
        p = FedYogi(**kwargs).kwargs
        b2 = p["beta2"]
        return reference_adaptive(history, p["learning_rate"], p["beta1"], p["tau"], lambda v, d2: v - (1 - b2) * d2 * np.sign(v - d2))
    if name == "fedadagrad":
        p = FedAdagrad(**kwargs).kwargs
        return reference_adaptive(history, p["learning_rate"], p["beta1"], p["tau"], lambda v, d2: v + d2)
    p = FedAvgM(**kwargs).kwargs
    return reference_avgm(history, p["server_learning_rate"], p["momentum"])


CASES = [
    ("fedyogi", {}),
    ("fedyogi", {"learning_rate": 0.05, "beta1": 0.5, "beta2": 0.9, "tau": 1e-3}),
    ("fedadagrad", {}),
    ("fedadagrad", {"learning_rate": 0.05, "beta1": 0.3, "tau": 1e-2}),
    ("fedavgm", {}),
    ("fedavgm", {"server_learning_rate": 0.7, "momentum": 0.5}),
]


@pytest.mark.parametrize(("name", "kwargs"), CASES)
def test_optimiser_matches_its_reference_over_rounds(name: str, kwargs: dict[str, float]) -> None:
    model, history = run_rounds(name, kwargs, [[0, 1, 2, 3, 4]], n_rounds=4)
    for k, want in reference(name, kwargs, history).items():
        assert model[k].dtype == MODEL[k].dtype
        np.testing.assert_allclose(model[k].astype(np.float64), want, rtol=1e-3 if k == "h" else 1e-6, atol=1e-6)
    # Integer and bool tensors take the plain (cast) mean of the last round.
    updates, weights = history[-1]
    plain = two_stage(updates, weights, [[0, 1, 2, 3, 4]]).result()
    np.testing.assert_array_equal(model["n"], plain["n"])
    np.testing.assert_array_equal(model["on"], plain["on"])


@pytest.mark.parametrize(("name", "kwargs"), [c for c in CASES if c[1]])
def test_state_is_kept_across_rounds_and_matters(name: str, kwargs: dict[str, float]) -> None:
    """A resumed controller hands the stored state back: the step with it differs from a
    fresh start, and the state has one entry per float tensor, kept in float32 at least."""
    strategy = make_strategy(name, kwargs)
    model: dict[str, np.ndarray] = dict(MODEL)
    state: dict[str, np.ndarray] = {}
    for r in range(2):
        updates, weights = clients(5, seed=r)
        model, state = strategy.step(model, two_stage(updates, weights, [[0, 1, 2, 3, 4]]).mean(), state)
    keys = {"u/w", "u/b", "u/h"} if name == "fedavgm" else {f"{p}/{t}" for p in "mv" for t in "wbh"}
    assert set(state) == keys
    assert all(state[k].dtype == (np.float64 if k.endswith("/b") else np.float32) for k in keys)
    updates, weights = clients(5, seed=2)
    mean = two_stage(updates, weights, [[0, 1, 2, 3, 4]]).mean()
    with_state, _ = strategy.step(model, mean, state)
    without, _ = make_strategy(name, kwargs).step(model, mean, {})
    assert not np.allclose(with_state["w"], without["w"])


@pytest.mark.parametrize("name", ["fedyogi", "fedadagrad", "fedavgm", "fedprox"])
def test_same_model_with_one_or_three_combiners(name: str) -> None:
    one, _ = run_rounds(name, {}, [list(range(7))])
    three, _ = run_rounds(name, {}, [[0], [1, 2, 3, 4], [5, 6]])
    for k in MODEL:
        if MODEL[k].dtype.kind == "f":
            tol = 1e-3 if MODEL[k].dtype == np.float16 else 1e-6
            np.testing.assert_allclose(one[k].astype(np.float64), three[k].astype(np.float64), rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(one[k], three[k])


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_identical_updates_give_that_update(name: str) -> None:
    updates, _ = clients(1, seed=3)
    same = [updates[0]] * 4
    model, state = make_strategy(name).step(MODEL, two_stage(same, [5.0, 1.0, 30.0, 2.0], [[0, 1], [2, 3]]).mean(), {})
    assert state == {}
    for k, v in updates[0].items():
        assert model[k].dtype == v.dtype
        if v.dtype.kind == "f":  # float16/32 tensors are summed in float32 (see fold.py): within its rounding
            np.testing.assert_allclose(model[k], v, rtol=2e-7 if v.dtype != np.float16 else 1e-3, atol=0)
        else:
            np.testing.assert_array_equal(model[k], v)


def test_fedprox_is_fedavg_on_the_server_and_hands_mu_to_clients() -> None:
    updates, weights = clients(4, seed=9)
    mean = two_stage(updates, weights, [[0, 1, 2, 3]]).mean()
    prox, state = make_strategy("fedprox", {"mu": 0.5}).step(MODEL, mean, {})
    avg, _ = make_strategy("fedavg").step(MODEL, mean, {})
    assert state == {}
    for k in MODEL:
        np.testing.assert_array_equal(prox[k], avg[k])
    assert make_strategy("fedprox", {"mu": 0.5}).train_settings() == {"mu": 0.5}
    assert FedProx().train_settings() == {"mu": 0.01}
    assert make_strategy("fedavg").train_settings() == {}


def test_fedavgm_without_momentum_at_rate_one_is_fedavg() -> None:
    plain, _ = run_rounds("fedavg", {}, [[0, 1, 2]])
    avgm, _ = run_rounds("fedavgm", {"momentum": 0.0, "server_learning_rate": 1.0}, [[0, 1, 2]])
    for k in MODEL:
        np.testing.assert_allclose(avgm[k].astype(np.float64), plain[k].astype(np.float64), rtol=1e-6, atol=1e-6)


def test_every_new_strategy_folds_a_weighted_sum() -> None:
    for name in ("fedyogi", "fedadagrad", "fedavgm", "fedprox"):
        assert AGGREGATORS[name] is FedAvg


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("fedyogi", {"beta2": 1.0}, r"aggregator_kwargs.beta2.*\[0, 1\)"),
        ("fedadagrad", {"beta2": 0.99}, "fedadagrad takes no such setting; it takes: beta1, learning_rate, tau"),
        ("fedavgm", {"momentum": -0.1}, "aggregator_kwargs.momentum"),
        ("fedavgm", {"learning_rate": 1.0}, "it takes: momentum, server_learning_rate"),
        ("fedprox", {"mu": -1}, "aggregator_kwargs.mu"),
        ("fedprox", {"mu": "0.1"}, "must be a finite number"),
    ],
)
def test_bad_settings_are_refused_clearly(name: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_strategy(name, kwargs)
