"""Strategies that see each update on their own (``needs_updates``): robust aggregation
and DP-FedAvg.

The controller hands them every client's update memory-mapped from its spill file, so
they read the updates tensor by tensor and block by block: a block of every update (an
``n x block`` float64 stack of at most ``STACK_BYTES``) is all they hold besides the
model they return. Everything is computed in float64 and cast back to the model's dtypes
with `cast_mean` (ints rounded, bools by majority, a value beyond the dtype refused).

- ``fedmedian``: the coordinate-wise median (unweighted; Yin et al. 2018).
- ``trimmedmean``: per coordinate, the ``floor(beta * n)`` largest and smallest values are
  dropped and the rest averaged, unweighted (Yin et al. 2018).
- ``krum``: the update with the least sum of squared distances to its ``n - f - 2``
  nearest others (Blanchard et al. 2017); needs ``n > 2f + 2``.
- ``multikrum``: the example-weighted mean of the ``m`` updates with the best Krum scores
  (``m`` 0: ``n - f``).
- ``bulyan``: Krum applied again and again to choose ``n - 2f`` updates, then per
  coordinate the mean of the ``n - 4f`` of them closest to their median (El Mhamdi et al.
  2018); needs ``n >= 4f + 3``.
- ``dpfedavg``: DP-FedAvg with fixed clipping (McMahan et al. 2018): each update's change
  to the model is clipped to L2 norm ``clip_norm`` (over the float tensors), Gaussian noise
  of std ``noise_multiplier * clip_norm`` is added to the sum of the clipped changes, and
  the sum is divided by the number of clients: the unweighted mean, as in the paper's
  fixed-denominator estimator with equal client weights (a client's claimed example count
  would otherwise change its sensitivity). Integer and bool tensors take the plain
  unweighted mean, neither clipped nor noised (they are counters, not learned weights).
  The noise comes from a generator seeded by ``seed`` (the controller puts 128 random bits
  in the session's server state before the first round) and the number of rounds
  aggregated so far, both kept in the server state: a round run again after a restart
  starts from the same state and draws the same noise.

Krum's distances are over every tensor (ints and bools as numbers), like Flower's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from scaleout.core.aggregators.base import cast_mean
from scaleout.core.aggregators.bounds import sum_squares
from scaleout.core.aggregators.strategy import ClientUpdate, Param, Strategy, Tensors
from scaleout.core.errors import ConfigError, UpdateRejected

STACK_BYTES = 4 << 20  # a block of every update, in float64: at most this much at once (temporaries: a few times it)
MIN_BLOCK = 1024  # elements per block at least, however many updates


def block_size(n: int) -> int:
    """Elements of each update read at once so that the float64 stack fits STACK_BYTES."""
    return max(MIN_BLOCK, STACK_BYTES // (8 * max(n, 1)))


def _blocks(model: Mapping[str, np.ndarray], n: int) -> Iterator[tuple[str, int, int]]:
    """(tensor, start, stop) over every tensor's flat elements, in blocks."""
    step = block_size(n)
    for name, x in model.items():
        for start in range(0, x.size, step):
            yield name, start, min(start + step, x.size)


class _Stacker:
    """Reads one block of every update into a reused float64 ``n x block`` buffer."""

    def __init__(self, updates: Sequence[ClientUpdate]) -> None:
        self.updates = updates
        self.buffer = np.empty((len(updates), block_size(len(updates))), dtype=np.float64)

    def stack(self, name: str, start: int, stop: int, rows: Sequence[int] | None = None) -> np.ndarray:
        picked = range(len(self.updates)) if rows is None else rows
        out = self.buffer[: len(picked), : stop - start]
        for row, i in enumerate(picked):
            out[row] = np.asarray(self.updates[i].tensors[name]).reshape(-1)[start:stop]
        return out


def _check_updates(model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], least: int, why: str) -> None:
    if len(updates) < max(1, least):
        raise UpdateRejected(f"{len(updates)} updates are too few: {why}")
    for u in updates:
        for name, x in model.items():
            t = u.tensors.get(name)
            if t is None or t.shape != x.shape:
                raise UpdateRejected(f"the update of {u.client} does not match the model at tensor {name!r}")


def _whole(name: str, value: float) -> int:
    if value != int(value):
        raise ConfigError(f"aggregator_kwargs.{name}", f"must be a whole number, got {value:g}")
    return int(value)


def _coordinatewise(model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], reduce: Any) -> Tensors:
    """The model from ``reduce(stack) -> float64 block`` applied block by block."""
    out = {name: np.empty_like(x) for name, x in model.items()}
    stacker = _Stacker(updates)
    for name, start, stop in _blocks(model, len(updates)):
        out[name].reshape(-1)[start:stop] = cast_mean(name, reduce(stacker.stack(name, start, stop)), model[name].dtype.name)
    return out


def _weighted_mean(model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], rows: Sequence[int], weights: np.ndarray) -> Tensors:
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    out = {name: np.empty_like(x) for name, x in model.items()}
    stacker = _Stacker(updates)
    for name, start, stop in _blocks(model, len(updates)):
        out[name].reshape(-1)[start:stop] = cast_mean(name, w @ stacker.stack(name, start, stop, rows), model[name].dtype.name)
    return out


def pairwise_distances(model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> np.ndarray:
    """Squared L2 distances between every two updates over all tensors, block by block
    (the Gram form, computed with one matrix product per block)."""
    n = len(updates)
    d = np.zeros((n, n), dtype=np.float64)
    stacker = _Stacker(updates)
    for name, start, stop in _blocks(model, n):
        x = stacker.stack(name, start, stop)
        sq = np.einsum("ij,ij->i", x, x)
        d += sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def krum_scores(d: np.ndarray, rows: Sequence[int], f: int) -> np.ndarray:
    """Each of ``rows``' Krum score within ``rows``: the sum of its squared distances to its
    ``k - f - 2`` nearest others (k = len(rows); at least one neighbour when k > 1)."""
    k = len(rows)
    if k == 1:
        return np.zeros(1)
    sub = d[np.ix_(rows, rows)]
    neighbours = min(k - 1, max(1, k - f - 2))
    return np.array([np.sort(np.delete(sub[i], i))[:neighbours].sum() for i in range(k)])


class _Robust(Strategy):
    needs_updates = True

    def _f(self) -> int:
        return _whole("f", self.kwargs["f"])


class FedMedian(Strategy):
    """Coordinate-wise median of the updates (unweighted)."""

    name = "fedmedian"
    needs_updates = True

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        _check_updates(model, updates, 1, "a median needs at least one")
        return _coordinatewise(model, updates, lambda s: np.median(s, axis=0, overwrite_input=True)), {}  # the stack is scratch


class TrimmedMean(Strategy):
    """Per coordinate: drop the ``floor(beta * n)`` largest and smallest values, average the rest."""

    name = "trimmedmean"
    needs_updates = True
    params: ClassVar[dict[str, Param]] = {"beta": Param(0.2, 0.0, 0.5, high_open=True, help="fraction trimmed at each end")}

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        _check_updates(model, updates, 1, "a trimmed mean needs at least one")
        cut = int(self.kwargs["beta"] * len(updates))
        n = len(updates)

        def trimmed(s: np.ndarray) -> np.ndarray:
            s.sort(axis=0)  # in place: the stack is scratch
            return s[cut : n - cut].mean(axis=0)

        return _coordinatewise(model, updates, trimmed), {}


class Krum(_Robust):
    """The update closest to its ``n - f - 2`` nearest others (Blanchard et al. 2017)."""

    name = "krum"
    params: ClassVar[dict[str, Param]] = {"f": Param(0, 0.0, help="Byzantine clients assumed (a whole number); needs n > 2f + 2")}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._f()

    def _select(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> tuple[np.ndarray, np.ndarray]:
        f = self._f()
        _check_updates(model, updates, 2 * f + 3, f"{self.name} with f={f} needs n > 2f + 2, i.e. at least {2 * f + 3} updates")
        scores = krum_scores(pairwise_distances(model, updates), range(len(updates)), f)
        return np.argsort(scores, kind="stable"), scores

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        order, _ = self._select(model, updates)
        chosen = updates[int(order[0])]
        return {name: np.array(chosen.tensors[name], dtype=x.dtype) for name, x in model.items()}, {}


class MultiKrum(Krum):
    """The example-weighted mean of the ``m`` updates with the best Krum scores."""

    name = "multikrum"
    params: ClassVar[dict[str, Param]] = {
        "f": Param(0, 0.0, help="Byzantine clients assumed (a whole number); needs n > 2f + 2"),
        "m": Param(0, 0.0, help="updates averaged (a whole number); 0: n - f"),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _whole("m", self.kwargs["m"])

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        order, _ = self._select(model, updates)
        m = int(self.kwargs["m"]) or len(updates) - self._f()
        if m > len(updates):
            raise UpdateRejected(f"multikrum with m={m} needs at least {m} updates, got {len(updates)}")
        rows = sorted(int(i) for i in order[:m])
        weights = np.array([float(updates[i].num_examples) for i in rows])
        if not weights.sum() > 0:
            weights = np.ones(len(rows))
        return _weighted_mean(model, updates, rows, weights), {}


class Bulyan(_Robust):
    """Krum again and again to choose ``n - 2f`` updates, then per coordinate the mean of
    the ``n - 4f`` of those closest to their median (El Mhamdi et al. 2018)."""

    name = "bulyan"
    params: ClassVar[dict[str, Param]] = {"f": Param(0, 0.0, help="Byzantine clients assumed (a whole number); needs n >= 4f + 3")}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._f()

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        f = self._f()
        n = len(updates)
        _check_updates(model, updates, 4 * f + 3, f"bulyan with f={f} needs n >= 4f + 3, i.e. at least {4 * f + 3} updates")
        d = pairwise_distances(model, updates)
        remaining, chosen = list(range(n)), []
        for _ in range(n - 2 * f):
            best = remaining[int(np.argmin(krum_scores(d, remaining, f)))]
            chosen.append(best)
            remaining.remove(best)
        chosen.sort()
        beta = len(chosen) - 2 * f

        def closest_to_median(s: np.ndarray) -> np.ndarray:
            med = np.median(s, axis=0)
            idx = np.argsort(np.abs(s - med), axis=0, kind="stable")[:beta]
            return np.take_along_axis(s, idx, axis=0).mean(axis=0)

        out = {name: np.empty_like(x) for name, x in model.items()}
        stacker = _Stacker(updates)
        for name, start, stop in _blocks(model, len(updates)):
            block = closest_to_median(stacker.stack(name, start, stop, chosen))
            out[name].reshape(-1)[start:stop] = cast_mean(name, block, model[name].dtype.name)
        return out, {}


SEED_KEY = "dp/seed"
ROUNDS_KEY = "dp/rounds"


class DPFedAvg(Strategy):
    """DP-FedAvg with fixed clipping (McMahan et al. 2018); see the module docstring."""

    name = "dpfedavg"
    needs_updates = True
    needs_seed: ClassVar[bool] = True  # the controller puts SEED_KEY (random) in the first round's state
    params: ClassVar[dict[str, Param]] = {
        "clip_norm": Param(1.0, 0.0, low_open=True, help="L2 bound on each update's change"),
        "noise_multiplier": Param(1.0, 0.0, help="noise std on the sum, in units of clip_norm"),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_record: dict[str, Any] = {}

    def aggregate(self, model: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate], state: Mapping[str, np.ndarray]) -> tuple[Tensors, Tensors]:
        _check_updates(model, updates, 1, "DP-FedAvg needs at least one")
        seed = state.get(SEED_KEY)
        if seed is None or seed.dtype != np.uint32 or seed.size < 2:
            raise UpdateRejected(f"dpfedavg's server state lacks its noise seed {SEED_KEY!r}")
        rounds = int(np.asarray(state.get(ROUNDS_KEY, np.zeros(1, np.int64))).reshape(-1)[0])
        clip, z = self.kwargs["clip_norm"], self.kwargs["noise_multiplier"]
        n = len(updates)
        floats = [name for name, x in model.items() if x.dtype.kind == "f"]
        factors = np.empty(n)
        norms = np.empty(n)
        for i, u in enumerate(updates):
            norms[i] = math.sqrt(sum(sum_squares(np.asarray(u.tensors[name]), model[name]) for name in floats))
            factors[i] = min(1.0, clip / norms[i]) if norms[i] > 0 else 1.0
        rng = np.random.Generator(np.random.PCG64([int(s) for s in seed.reshape(-1)] + [rounds]))
        std = z * clip
        out = {name: np.empty_like(x) for name, x in model.items()}
        stacker = _Stacker(updates)
        for name, start, stop in _blocks(model, n):
            s = stacker.stack(name, start, stop)
            x = model[name]
            if x.dtype.kind == "f":
                base = x.reshape(-1)[start:stop].astype(np.float64)
                total = factors @ (s - base)  # the sum of the clipped changes
                if std > 0:
                    total += rng.normal(0.0, std, size=stop - start)
                mean = base + total / n
            else:
                mean = s.mean(axis=0)
            out[name].reshape(-1)[start:stop] = cast_mean(name, mean, x.dtype.name)
        self.last_record = {
            "clip_norm": clip, "noise_multiplier": z, "clients": n, "noise_std": std, "noise_std_of_mean": std / n,
            "clipped": int(np.sum(norms > clip)), "mean": "unweighted over clients",
        }
        return out, {SEED_KEY: np.asarray(seed), ROUNDS_KEY: np.array([rounds + 1], dtype=np.int64)}


ROBUST: tuple[type[Strategy], ...] = (FedMedian, TrimmedMean, Krum, MultiKrum, Bulyan, DPFedAvg)
