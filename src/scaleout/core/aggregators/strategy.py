"""Strategies: a combiner-side reducer plus a controller-side server step.

A round's aggregation has two halves (Reddi et al., 2021, "Adaptive Federated Optimization"):

- the **reducer** folds client updates as they arrive into an example-weighted sum. It is
  streaming and decomposable: each combiner reduces its clients, the controller adds the
  combiners' partials, and the weighted mean is the same however the clients were split;
- the **server step** turns that mean into the next global model. It runs once per round
  on the controller and may keep state across the rounds of a session (FedAdam's first
  and second moments); the state is returned, never kept on the object, so the controller
  can store it with the session and resume it after a restart.

A strategy that needs every update on its own (median, Krum) says so with
``needs_updates``; the roles then hand it the updates instead of a weighted sum.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from scaleout.core.aggregators.base import cast_mean, check_headroom
from scaleout.core.errors import ConfigError, UpdateRejected

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class Param:
    """One hyperparameter: default, and the open/closed interval it must lie in."""

    default: float
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    help: str = ""

    def check(self, name: str, value: object) -> float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(float(value)):
            raise ConfigError(f"aggregator_kwargs.{name}", f"must be a finite number, got {value!r}")
        x = float(value)
        low_ok = x > self.low if self.low_open else x >= self.low
        high_ok = x < self.high if self.high_open else x <= self.high
        if not (low_ok and high_ok):
            lo, hi = "(" if self.low_open else "[", ")" if self.high_open or self.high == math.inf else "]"
            raise ConfigError(f"aggregator_kwargs.{name}", f"must lie in {lo}{self.low:g}, {self.high:g}{hi}, got {x:g}")
        return x


@dataclass(frozen=True)
class ClientUpdate:
    """One client's update, for a strategy that needs each on its own (``needs_updates``):
    the controller spills them to disk as they arrive and hands them over memory-mapped."""

    client: str
    tensors: Mapping[str, np.ndarray]  # read-only, in the model's tensor order and dtypes
    num_examples: int
    metadata: Mapping[str, Any] = field(default_factory=dict)  # what the client's train callback returned


class Strategy:
    """Base of all strategies: validated hyperparameters and a server step.

    Subclasses set ``name``, ``params`` and override ``step``. The default step is plain
    FedAvg: the next global model is the weighted mean.
    """

    name: ClassVar[str] = ""
    needs_updates: ClassVar[bool] = False
    reducer: ClassVar[str] = "weighted_sum"
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise ConfigError(f"aggregator_kwargs.{unknown[0]}", f"{self.name} takes no such setting; it takes: {known}")
        self.kwargs = {k: p.check(k, kwargs[k]) if k in kwargs else p.default for k, p in self.params.items()}

    def step(self, model: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        """(next global model in the model's dtypes, server state to keep) from the current
        model, the float64 weighted mean of this round's updates and the state kept so far."""
        return {name: cast_mean(name, np.asarray(mean[name]), model[name].dtype.name) for name in model}, {}

    def train_settings(self) -> dict[str, Any]:
        """Settings this strategy adds to every client's train settings (over --settings),
        e.g. FedProx's ``mu``; most add none."""
        return {}

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        """A ``needs_updates`` strategy's server step: (next global model, server state) from
        the current model, each client's update and the state kept so far. The others fold a
        weighted sum on the combiners, and the controller calls ``step`` with its mean."""
        raise NotImplementedError(f"{self.name} folds a weighted sum: its server step is step()")


class FedAvgStrategy(Strategy):
    """FedAvg (McMahan et al., 2017): the next model is the example-weighted mean."""

    name = "fedavg"


class FedAdam(Strategy):
    """FedAdam (Reddi et al., 2021): Adam on the server, with the round's mean change as
    pseudo-gradient. Moments are kept per float tensor across the rounds of a session;
    integer and bool tensors take the plain mean (Adam has no meaning for them).

        delta = mean - x;  m = b1 m + (1 - b1) delta;  v = b2 v + (1 - b2) delta^2
        x    <- x + learning_rate * m / (sqrt(v) + tau)

    Hyperparameter names and defaults follow Scaleout Edge's ``fedopt``.
    """

    name = "fedadam"
    params = {
        "learning_rate": Param(1e-3, 0.0, low_open=True, help="server learning rate"),
        "beta1": Param(0.9, 0.0, 1.0, high_open=True, help="decay of the first moment"),
        "beta2": Param(0.99, 0.0, 1.0, high_open=True, help="decay of the second moment"),
        "tau": Param(1e-4, 0.0, low_open=True, help="adaptivity: added to sqrt(v)"),
    }

    def step(self, model: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        lr, b1, b2, tau = (self.kwargs[k] for k in ("learning_rate", "beta1", "beta2", "tau"))
        new_model: Tensors = {}
        new_state: Tensors = {}
        for name, x in model.items():
            if x.dtype.kind != "f":
                new_model[name] = cast_mean(name, np.asarray(mean[name]), x.dtype.name)
                continue
            m_key, v_key = f"m/{name}", f"v/{name}"
            m = _moment(state, m_key, x)
            v = _moment(state, v_key, x)
            with np.errstate(over="ignore", invalid="ignore"):
                delta = np.asarray(mean[name], dtype=np.float64) - x
                m = b1 * m + (1.0 - b1) * delta
                v = b2 * v + (1.0 - b2) * np.square(delta)
                step = lr * m / (np.sqrt(v) + tau)
                new_x = (x + step).astype(x.dtype)
            new_model[name] = _checked(name, new_x)
            # Moments are kept in float32 at least (float64 for float64 tensors).
            keep = np.result_type(x.dtype, np.float32)
            new_state[m_key] = _checked(m_key, m.astype(keep))
            new_state[v_key] = _checked(v_key, v.astype(keep))
        return new_model, new_state


class _AdaptiveOpt(Strategy):
    """The adaptive server optimisers of Reddi et al. (2021), Algorithm 2: the round's mean
    change ``delta`` is the pseudo-gradient, and the three differ only in how the second
    moment ``v`` moves. Integer and bool tensors take the plain mean, as in FedAdam.

        m = b1 m + (1 - b1) delta;  v = _second(v, delta);  x <- x + learning_rate * m / (sqrt(v) + tau)

    ``v`` starts at tau^2 (the paper's v_-1 >= tau^2), ``m`` at zero."""

    def _second(self, v: np.ndarray, delta2: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, model: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        lr, b1, tau = (self.kwargs[k] for k in ("learning_rate", "beta1", "tau"))
        new_model: Tensors = {}
        new_state: Tensors = {}
        for name, x in model.items():
            if x.dtype.kind != "f":
                new_model[name] = cast_mean(name, np.asarray(mean[name]), x.dtype.name)
                continue
            m_key, v_key = f"m/{name}", f"v/{name}"
            m = _moment(state, m_key, x)
            v = _moment(state, v_key, x, start=tau * tau)
            with np.errstate(over="ignore", invalid="ignore"):
                delta = np.asarray(mean[name], dtype=np.float64) - x
                m = b1 * m + (1.0 - b1) * delta
                v = self._second(v, np.square(delta))
                new_x = (x + lr * m / (np.sqrt(v) + tau)).astype(x.dtype)
            new_model[name] = _checked(name, new_x)
            keep = np.result_type(x.dtype, np.float32)
            new_state[m_key] = _checked(m_key, m.astype(keep))
            new_state[v_key] = _checked(v_key, v.astype(keep))
        return new_model, new_state


class FedYogi(_AdaptiveOpt):
    """FedYogi (Reddi et al., 2021): like FedAdam, but the second moment moves additively,
    by at most (1 - b2) delta^2 a round, so it grows slower on a sudden large change:

        v <- v - (1 - b2) delta^2 sign(v - delta^2)

    Hyperparameter names and defaults follow Scaleout Edge's ``fedopt``."""

    name = "fedyogi"
    params = {
        "learning_rate": Param(1e-3, 0.0, low_open=True, help="server learning rate"),
        "beta1": Param(0.9, 0.0, 1.0, high_open=True, help="decay of the first moment"),
        "beta2": Param(0.99, 0.0, 1.0, high_open=True, help="decay of the second moment"),
        "tau": Param(1e-4, 0.0, low_open=True, help="adaptivity: added to sqrt(v); v starts at tau^2"),
    }

    def _second(self, v: np.ndarray, delta2: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.kwargs["beta2"]) * delta2 * np.sign(v - delta2)


class FedAdagrad(_AdaptiveOpt):
    """FedAdaGrad (Reddi et al., 2021): the second moment sums every round's squared
    change, so the step shrinks as rounds go by (no ``beta2``):

        v <- v + delta^2

    Hyperparameter names and defaults follow Scaleout Edge's ``fedopt``."""

    name = "fedadagrad"
    params = {
        "learning_rate": Param(1e-3, 0.0, low_open=True, help="server learning rate"),
        "beta1": Param(0.9, 0.0, 1.0, high_open=True, help="decay of the first moment"),
        "tau": Param(1e-4, 0.0, low_open=True, help="adaptivity: added to sqrt(v); v starts at tau^2"),
    }

    def _second(self, v: np.ndarray, delta2: np.ndarray) -> np.ndarray:
        return v + delta2


class FedAvgM(Strategy):
    """FedAvgM (Hsu et al., 2019): FedAvg with server momentum. The round's mean change
    builds a velocity kept across rounds; integer and bool tensors take the plain mean.

        u = momentum * u + (mean - x);  x <- x + server_learning_rate * u

    With momentum 0 and server_learning_rate 1 it is FedAvg."""

    name = "fedavgm"
    params = {
        "server_learning_rate": Param(1.0, 0.0, low_open=True, help="scales the step"),
        "momentum": Param(0.9, 0.0, 1.0, high_open=True, help="share of last round's velocity kept"),
    }

    def step(self, model: Mapping[str, np.ndarray], mean: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        lr, beta = self.kwargs["server_learning_rate"], self.kwargs["momentum"]
        new_model: Tensors = {}
        new_state: Tensors = {}
        for name, x in model.items():
            if x.dtype.kind != "f":
                new_model[name] = cast_mean(name, np.asarray(mean[name]), x.dtype.name)
                continue
            u_key = f"u/{name}"
            with np.errstate(over="ignore", invalid="ignore"):
                u = beta * _moment(state, u_key, x) + (np.asarray(mean[name], dtype=np.float64) - x)
                new_x = (x + lr * u).astype(x.dtype)
            new_model[name] = _checked(name, new_x)
            new_state[u_key] = _checked(u_key, u.astype(np.result_type(x.dtype, np.float32)))
        return new_model, new_state


class FedProx(Strategy):
    """FedProx (Li et al., 2020): FedAvg on the server; each client adds the proximal term
    (mu / 2) ||w - w_global||^2 to its local loss. ``mu`` reaches every client's train
    settings as ``mu`` (over --settings); the train callback applies it (see the quickstart)."""

    name = "fedprox"
    params = {"mu": Param(0.01, 0.0, help="weight of the proximal term; 0 is FedAvg")}

    def train_settings(self) -> dict[str, Any]:
        return {"mu": self.kwargs["mu"]}


def _moment(state: Mapping[str, np.ndarray], key: str, x: np.ndarray, start: float = 0.0) -> np.ndarray:
    """The stored moment, or ``start`` everywhere on the first round; a shape that no longer
    fits the model (a new seed mid-session cannot happen, but a corrupt state can) is refused."""
    value = state.get(key)
    if value is None:
        return np.full(x.shape, start, dtype=np.float64)
    if value.shape != x.shape:
        raise UpdateRejected(f"server state {key!r} has shape {value.shape}, the model {x.shape}")
    return np.asarray(value, dtype=np.float64)


def _checked(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise UpdateRejected(f"the server step made tensor {name!r} non-finite (NaN or inf); the global model stays")
    check_headroom(name, array)
    return array


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvgStrategy, FedAdam, FedYogi, FedAdagrad, FedAvgM, FedProx)}


def make_strategy(name: str, kwargs: Mapping[str, Any] | None = None) -> Strategy:
    """The named strategy with validated hyperparameters; ConfigError says what is wrong."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError("aggregator", f"unknown aggregator {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError("aggregator_kwargs", "must be a JSON object, e.g. '{\"learning_rate\": 0.01}'")
    return cls(**dict(kwargs or {}))
