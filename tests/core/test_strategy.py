"""Server steps: FedAvg and FedAdam against plain numpy references, state across rounds,
and the same model however the clients are split over combiners."""

from __future__ import annotations

import numpy as np
import pytest

from scaleout.core.aggregators import AGGREGATORS, FedAdam, FedAvg, decode_partial, encode_partial, make_strategy
from scaleout.core.errors import ConfigError, UpdateRejected
from scaleout.core.payload import describe, encode

MODEL: dict[str, np.ndarray] = {
    "w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "b": np.arange(5, dtype=np.float64) / 7,
    "h": np.full((2, 2), 0.5, np.float16),
    "n": np.array([3, -4, 10], np.int32),
    "on": np.array([True, False]),
}
TEMPLATE = describe(encode(MODEL))


def clients(n: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    rng = np.random.default_rng(seed)
    updates = []
    for _ in range(n):
        u = {}
        for k, v in MODEL.items():
            if v.dtype.kind == "f":
                u[k] = (v + rng.standard_normal(v.shape) * 0.1).astype(v.dtype)
            elif v.dtype.kind == "b":
                u[k] = rng.random(v.shape) < 0.5
            else:
                u[k] = v + rng.integers(-3, 4, v.shape).astype(v.dtype)
        updates.append(u)
    return updates, [float(w) for w in rng.integers(1, 1000, n)]


def two_stage(updates: list[dict[str, np.ndarray]], weights: list[float], groups: list[list[int]]) -> FedAvg:
    """Each group reduced by one combiner, partials sent through their wire form, summed at the controller."""
    top = FedAvg(TEMPLATE)
    for group in groups:
        combiner = FedAvg(TEMPLATE)
        for i in group:
            combiner.add(updates[i], weights[i], f"client-{i}")
        top.add_partial(decode_partial(encode_partial(combiner.partial())))
    return top


def reference_adam(x: dict[str, np.ndarray], rounds: list[tuple[list[dict[str, np.ndarray]], list[float]]], lr: float, b1: float, b2: float, tau: float) -> dict[str, np.ndarray]:
    """Reddi et al.'s FedAdam written out plainly, float tensors only."""
    x = {k: v.astype(np.float64) for k, v in x.items() if v.dtype.kind == "f"}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v2 = {k: np.zeros_like(v) for k, v in x.items()}
    for updates, weights in rounds:
        for k in x:
            mean = np.average(np.stack([u[k].astype(np.float64) for u in updates]), axis=0, weights=weights)
            delta = mean - x[k]
            m[k] = b1 * m[k] + (1 - b1) * delta
            v2[k] = b2 * v2[k] + (1 - b2) * delta**2
            x[k] = (x[k] + lr * m[k] / (np.sqrt(v2[k]) + tau)).astype(MODEL[k].dtype).astype(np.float64)
    return x


def run_rounds(strategy_name: str, kwargs: dict[str, float], groups: list[list[int]], n_rounds: int = 3) -> tuple[dict[str, np.ndarray], list]:
    strategy = make_strategy(strategy_name, kwargs)
    model = dict(MODEL)
    state: dict[str, np.ndarray] = {}
    history = []
    for r in range(n_rounds):
        updates, weights = clients(sum(map(len, groups)), seed=r)
        history.append((updates, weights))
        model, state = strategy.step(model, two_stage(updates, weights, groups).mean(), state)
    return model, history


def test_fedavg_step_is_the_cast_weighted_mean() -> None:
    updates, weights = clients(4, seed=1)
    agg = two_stage(updates, weights, [[0, 1, 2, 3]])
    model, state = make_strategy("fedavg").step(MODEL, agg.mean(), {})
    assert state == {}
    for k, v in agg.result().items():
        assert model[k].dtype == v.dtype
        np.testing.assert_array_equal(model[k], v)


@pytest.mark.parametrize("kwargs", [{}, {"learning_rate": 0.05, "beta1": 0.5, "beta2": 0.9, "tau": 1e-3}])
def test_fedadam_matches_reference_and_keeps_moments_across_rounds(kwargs: dict[str, float]) -> None:
    model, history = run_rounds("fedadam", kwargs, [[0, 1, 2, 3, 4]])
    p = FedAdam(**kwargs).kwargs
    expected = reference_adam(MODEL, history, p["learning_rate"], p["beta1"], p["beta2"], p["tau"])
    for k, want in expected.items():
        assert model[k].dtype == MODEL[k].dtype
        np.testing.assert_allclose(model[k].astype(np.float64), want, rtol=1e-3 if k == "h" else 1e-6, atol=1e-6)
    # The moments matter: without the state of the earlier rounds the last step differs.
    fresh = make_strategy("fedadam", kwargs)
    last_updates, last_weights = history[-1]
    prev, _ = run_rounds("fedadam", kwargs, [[0, 1, 2, 3, 4]], n_rounds=2)
    stateless, _ = fresh.step(prev, two_stage(last_updates, last_weights, [[0, 1, 2, 3, 4]]).mean(), {})
    assert not np.allclose(stateless["w"], model["w"])


def test_fedadam_int_and_bool_tensors_take_the_mean() -> None:
    updates, weights = clients(3, seed=7)
    agg = two_stage(updates, weights, [[0, 1, 2]])
    model, state = make_strategy("fedadam").step(MODEL, agg.mean(), {})
    result = agg.result()
    np.testing.assert_array_equal(model["n"], result["n"])
    np.testing.assert_array_equal(model["on"], result["on"])
    assert set(state) == {"m/w", "v/w", "m/b", "v/b", "m/h", "v/h"}
    assert state["m/h"].dtype == np.float32 and state["m/b"].dtype == np.float64


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_same_model_with_one_or_three_combiners_and_unequal_splits(name: str) -> None:
    kwargs = {"learning_rate": 0.1} if name == "fedadam" else {}
    one, _ = run_rounds(name, kwargs, [list(range(7))])
    three, _ = run_rounds(name, kwargs, [[0], [1, 2, 3, 4], [5, 6]])
    for k in MODEL:
        if MODEL[k].dtype.kind == "f":
            tol = 1e-3 if MODEL[k].dtype == np.float16 else 1e-6
            np.testing.assert_allclose(one[k].astype(np.float64), three[k].astype(np.float64), rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(one[k], three[k])


def test_a_non_finite_step_is_refused() -> None:
    mean = {k: np.asarray(v, np.float64) for k, v in MODEL.items()}
    mean["h"] = mean["h"] + 1.0  # float16 tops out at 65504: a step of 1e6 overflows it
    with pytest.raises(UpdateRejected, match="'h' non-finite"):
        make_strategy("fedadam", {"learning_rate": 1e6}).step(MODEL, mean, {})


def test_state_of_the_wrong_shape_is_refused() -> None:
    mean = {k: np.asarray(v, np.float64) for k, v in MODEL.items()}
    with pytest.raises(UpdateRejected, match="server state 'm/w'"):
        make_strategy("fedadam").step(MODEL, mean, {"m/w": np.zeros(3)})


def test_every_strategy_has_a_reducer_and_unknown_names_fail() -> None:
    assert AGGREGATORS["fedavg"] is FedAvg and AGGREGATORS["fedadam"] is FedAvg
    with pytest.raises(ConfigError, match="unknown aggregator 'median'; choose one of: fedadagrad, fedadam, fedavg, fedavgm, "):
        make_strategy("median")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        make_strategy("fedadam", ["learning_rate"])  # type: ignore[arg-type]
