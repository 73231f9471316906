"""Bounds on one client's say in a round: weight cap, change norm, headroom (issue 20 #5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scaleout.core.aggregators import FedAdam, FedAvg, Partial, make_strategy
from scaleout.core.aggregators.bounds import (
    check_change,
    clip_examples,
    norm_limit,
    parse_examples_cap,
    parse_norm_bound,
    sum_squares,
)
from scaleout.core.aggregators.fold import BLOCK
from scaleout.core.config import SessionConfig
from scaleout.core.errors import ConfigError, UpdateRejected
from scaleout.core.payload import TensorSpec


def test_clip_examples() -> None:
    assert clip_examples(2**53 - 1, 1000) == 1000
    assert clip_examples(10, 1000) == 10
    assert clip_examples(2**53 - 1, 0) == 2**53 - 1  # 0: no cap


def test_sum_squares_is_blocked_float64_and_does_not_overflow() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3 * BLOCK + 7).astype(np.float32)
    y = rng.standard_normal(3 * BLOCK + 7).astype(np.float32)
    np.testing.assert_allclose(sum_squares(x, y), np.sum((x.astype(np.float64) - y) ** 2), rtol=1e-12)
    assert sum_squares(np.full(4, 3e38, np.float32)) == pytest.approx(4 * 9e76, rel=1e-6)


def test_norm_limit_is_a_multiple_of_the_model_norm_with_a_floor() -> None:
    big = {"w": np.full(100, 5.0, np.float32), "n": np.array([7], np.int64)}  # ints stay out of the norm
    assert norm_limit(big, 10.0) == pytest.approx(10 * 50.0)
    zero = {"w": np.zeros(100, np.float32)}
    assert norm_limit(zero, 10.0) == pytest.approx(10 * 10.0)  # floor: sqrt(100), an RMS of 1
    assert norm_limit(big, 0.0) is None


def test_check_change_refuses_a_far_update_and_accepts_a_near_one() -> None:
    model = {"w": np.full(100, 0.1, np.float32), "n": np.array([3], np.int64)}
    limit = norm_limit(model, 10.0)
    assert limit is not None
    near = {"w": model["w"] + 0.5, "n": np.array([10**6], np.int64)}
    assert check_change(model, near, limit) == pytest.approx(5.0, rel=1e-5)
    for far in (np.full(100, 1000.0, np.float32), np.full(100, 3e38, np.float32)):
        with pytest.raises(UpdateRejected, match="its change to the model has norm .* more than the bound 100"):
            check_change(model, {"w": far, "n": model["n"]}, limit)
    assert check_change(model, {"w": np.full(100, 1000.0, np.float32), "n": model["n"]}, None) == 0.0  # off


def test_a_capped_weight_cannot_decide_the_mean() -> None:
    # Nine honest clients at 1.0 with 100 examples, one liar at 1000.0 claiming 2**53 - 1.
    agg = FedAvg({"w": TensorSpec("float32", (4,))})
    for i in range(9):
        agg.add({"w": np.ones(4, np.float32)}, clip_examples(100, 100), f"h{i}")
    agg.add({"w": np.full(4, 1000.0, np.float32)}, clip_examples(2**53 - 1, 100), "liar")
    np.testing.assert_allclose(agg.result()["w"], np.full(4, (9 + 1000) / 10))  # one tenth, not all


def test_a_committed_model_keeps_headroom() -> None:
    reducer = FedAvg({"w": TensorSpec("float32", (2,))})
    reducer.add_partial(Partial({"w": np.array([3e38, 1.0])}, 1.0, 1, ["old"]))  # a combiner that checked nothing
    with pytest.raises(UpdateRejected, match="the aggregate of tensor 'w' reaches 3e\\+38, beyond 2.127e\\+37"):
        reducer.result()
    strategy = make_strategy("fedavg")
    with pytest.raises(UpdateRejected, match="beyond"):
        strategy.step({"w": np.zeros(2, np.float32)}, {"w": np.array([3e38, 0.0])}, {})
    adam = FedAdam(learning_rate=1e38)
    with pytest.raises(UpdateRejected, match="beyond"):
        adam.step({"w": np.zeros(2, np.float32)}, {"w": np.array([1.0, 1.0])}, {})


@pytest.mark.parametrize(("value", "want"), [(10, 10.0), (2.5, 2.5), (0, 0.0), ("off", 0.0), ("OFF", 0.0), ("3", 3.0)])
def test_parse_norm_bound(value: object, want: float) -> None:
    assert parse_norm_bound(value) == want


@pytest.mark.parametrize("value", [-1, math.inf, math.nan, "big", True, None, 1e300])
def test_parse_norm_bound_refuses(value: object) -> None:
    with pytest.raises(ConfigError, match="max_update_norm"):
        parse_norm_bound(value)


def test_session_config_bounds_defaults_and_checks() -> None:
    cfg = SessionConfig()
    assert cfg.max_examples_per_client == 1_000_000 and cfg.max_update_norm == 10.0
    assert SessionConfig.from_mapping({"max_update_norm": "off"}).max_update_norm == 0.0
    assert SessionConfig.from_mapping({"max_examples_per_client": 0}).max_examples_per_client == 0
    assert parse_examples_cap(5) == 5
    for bad in (-1, 2**60, 1.5, "x", True):
        with pytest.raises(ConfigError, match="max_examples_per_client"):
            SessionConfig.from_mapping({"max_examples_per_client": bad})
    with pytest.raises(ConfigError, match="max_update_norm"):
        SessionConfig.from_mapping({"max_update_norm": -3})


def test_check_change_tells_each_stretch_of_the_model_and_update_it_read_and_measures_the_same() -> None:
    from scaleout.core.aggregators.bounds import STRETCH

    rng = np.random.default_rng(3)
    model = {"w": rng.standard_normal(2 * STRETCH + 5).astype(np.float32), "i": np.arange(4), "b": rng.standard_normal((3, 7)).astype(np.float32)}
    update = {k: (v + 0.5).astype(v.dtype) for k, v in model.items()}
    seen: list[np.ndarray] = []
    norm = check_change(model, update, 1e9, seen.append)
    assert norm == pytest.approx(check_change(model, update, 1e9))
    # Every float element of the model and of the update was told, each once, as views of them (no copies).
    floats = [model["w"], model["b"], update["w"], update["b"]]
    assert sum(s.size for s in seen) == sum(a.size for a in floats)
    assert all(sum(np.shares_memory(s, a) for a in floats) == 1 for s in seen)
    assert [sum(s.size for s in seen if np.shares_memory(s, a)) for a in floats] == [a.size for a in floats]
    with pytest.raises(UpdateRejected):
        check_change(model, update, norm / 2, seen.append)
