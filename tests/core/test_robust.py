"""Robust aggregators and DP-FedAvg against plain numpy references (issue 15)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from scaleout.core.aggregators import robust
from scaleout.core.aggregators.strategy import STRATEGIES, ClientUpdate, make_strategy
from scaleout.core.errors import ConfigError, UpdateRejected

MODEL: dict[str, np.ndarray] = {
    "w": np.linspace(-1, 1, 2000, dtype=np.float32).reshape(40, 50),
    "b": np.arange(7, dtype=np.float64) / 7,
    "n": np.array([3, -4, 10, 0], np.int32),
}
ROBUST = ["fedmedian", "trimmedmean", "krum", "multikrum", "bulyan", "dpfedavg"]
SEED = {robust.SEED_KEY: np.array([12345, 678], np.uint32)}


@pytest.fixture(params=[None, 16 * 8, 8000], ids=["one-block", "many-blocks", "blocks-by-n"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param is not None:  # 16 elements a block, or 8000 / n: every tensor is read in several
        monkeypatch.setattr(robust, "STACK_BYTES", request.param)
        monkeypatch.setattr(robust, "MIN_BLOCK", 16 if request.param == 16 * 8 else 1)


def random_updates(n: int, seed: int = 0) -> list[ClientUpdate]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        tensors = {}
        for k, v in MODEL.items():
            if v.dtype.kind == "f":
                t = (v + rng.standard_normal(v.shape) * 0.1).astype(v.dtype)
            else:
                t = v + rng.integers(-3, 4, v.shape).astype(v.dtype)
            t.flags.writeable = False  # as the memory-mapped ones are
            tensors[k] = t
        out.append(ClientUpdate(f"c{i}", tensors, int(rng.integers(1, 100))))
    return out


def stack(updates: list[ClientUpdate], name: str) -> np.ndarray:
    return np.stack([np.asarray(u.tensors[name], dtype=np.float64) for u in updates])


def cast(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(like.dtype) if like.dtype.kind in "iu" else x.astype(like.dtype)


def ref_distances(updates: list[ClientUpdate]) -> np.ndarray:
    flat = np.stack([np.concatenate([np.asarray(u.tensors[k], dtype=np.float64).ravel() for k in MODEL]) for u in updates])
    return np.array([[np.sum((a - b) ** 2) for b in flat] for a in flat])


def ref_krum_scores(d: np.ndarray, rows: list[int], f: int) -> list[float]:
    k = len(rows)
    nb = min(k - 1, max(1, k - f - 2))
    return [sum(sorted(d[i, j] for j in rows if j != i)[:nb]) for i in rows]


def ref_median(updates: list[ClientUpdate], kw: dict) -> dict[str, np.ndarray]:
    return {k: cast(np.median(stack(updates, k), axis=0), v) for k, v in MODEL.items()}


def ref_trimmed(updates: list[ClientUpdate], kw: dict) -> dict[str, np.ndarray]:
    cut = int(kw.get("beta", 0.2) * len(updates))
    return {k: cast(np.sort(stack(updates, k), axis=0)[cut : len(updates) - cut].mean(axis=0), v) for k, v in MODEL.items()}


def ref_krum(updates: list[ClientUpdate], kw: dict) -> dict[str, np.ndarray]:
    scores = ref_krum_scores(ref_distances(updates), list(range(len(updates))), int(kw.get("f", 0)))
    best = updates[int(np.argmin(scores))]
    return {k: np.asarray(best.tensors[k]) for k in MODEL}


def ref_multikrum(updates: list[ClientUpdate], kw: dict) -> dict[str, np.ndarray]:
    f = int(kw.get("f", 0))
    m = int(kw.get("m", 0)) or len(updates) - f
    scores = ref_krum_scores(ref_distances(updates), list(range(len(updates))), f)
    rows = sorted(np.argsort(scores, kind="stable")[:m])
    w = np.array([updates[i].num_examples for i in rows], dtype=np.float64)
    return {k: cast(np.average(stack([updates[i] for i in rows], k), axis=0, weights=w), v) for k, v in MODEL.items()}


def ref_bulyan(updates: list[ClientUpdate], kw: dict) -> dict[str, np.ndarray]:
    f = int(kw.get("f", 0))
    d = ref_distances(updates)
    remaining, chosen = list(range(len(updates))), []
    while len(chosen) < len(updates) - 2 * f:
        scores = ref_krum_scores(d, remaining, f)
        chosen.append(remaining.pop(int(np.argmin(scores))))
    beta = len(chosen) - 2 * f
    out = {}
    for k, v in MODEL.items():
        s = stack([updates[i] for i in sorted(chosen)], k)
        med = np.median(s, axis=0)
        values = np.empty(s.shape[1:])
        for j in np.ndindex(*s.shape[1:]):
            col = s[(slice(None), *j)]
            order = np.argsort(np.abs(col - med[j]), kind="stable")[:beta]
            values[j] = col[order].mean()
        out[k] = cast(values, v)
    return out


def ref_dpfedavg(updates: list[ClientUpdate], kw: dict) -> dict[str, np.ndarray]:
    clip, z = kw.get("clip_norm", 1.0), kw.get("noise_multiplier", 1.0)
    floats = [k for k, v in MODEL.items() if v.dtype.kind == "f"]
    rng = np.random.Generator(np.random.PCG64([12345, 678, 0]))
    total = {k: np.zeros(MODEL[k].shape) for k in floats}
    for u in updates:
        change = {k: np.asarray(u.tensors[k], np.float64) - MODEL[k] for k in floats}
        norm = np.sqrt(sum(np.sum(c**2) for c in change.values()))
        for k in floats:
            total[k] += change[k] * min(1.0, clip / norm)
    out = {}
    for k, v in MODEL.items():
        if k in total:
            noise = rng.normal(0.0, z * clip, size=v.size).reshape(v.shape) if z > 0 else 0.0
            out[k] = cast(v + (total[k] + noise) / len(updates), v)
        else:
            out[k] = cast(stack(updates, k).mean(axis=0), v)
    return out


REFERENCES: dict[str, tuple[Callable[..., dict[str, np.ndarray]], dict]] = {
    "fedmedian": (ref_median, {}),
    "trimmedmean": (ref_trimmed, {"beta": 0.25}),
    "krum": (ref_krum, {"f": 2}),
    "multikrum": (ref_multikrum, {"f": 1, "m": 3}),
    "bulyan": (ref_bulyan, {"f": 1}),
    "dpfedavg": (ref_dpfedavg, {"clip_norm": 0.5, "noise_multiplier": 0.3}),
}


def test_all_are_registered_and_need_updates() -> None:
    for name in ROBUST:
        assert STRATEGIES[name].needs_updates, name


@pytest.mark.parametrize("n", [7, 8])
@pytest.mark.parametrize("name", ROBUST)
def test_matches_numpy_reference(name: str, n: int, blocks: None) -> None:
    ref, kw = REFERENCES[name]
    updates = random_updates(n, seed=n)
    got, _ = make_strategy(name, kw).aggregate(MODEL, updates, SEED)
    want = ref(updates, kw)
    assert list(got) == list(MODEL)
    for k, v in MODEL.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        if v.dtype.kind in "iu":
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=f"{name} {k}")


@pytest.mark.parametrize("name", ROBUST)
def test_identical_updates_give_that_update(name: str, blocks: None) -> None:
    one = random_updates(1, seed=3)[0]
    updates = [ClientUpdate(f"c{i}", one.tensors, 10 + i) for i in range(7)]
    kw = {"noise_multiplier": 0.0, "clip_norm": 1e6} if name == "dpfedavg" else {"f": 1} if name in ("krum", "multikrum", "bulyan") else {}
    got, _ = make_strategy(name, kw).aggregate(MODEL, updates, SEED)
    for k in MODEL:
        np.testing.assert_allclose(got[k], one.tensors[k], rtol=1e-6, err_msg=f"{name} {k}")


@pytest.mark.parametrize("name", ["fedmedian", "trimmedmean", "krum", "multikrum", "bulyan"])
def test_a_planted_outlier_moves_fedavg_not_these(name: str) -> None:
    updates = random_updates(7, seed=11)
    bad = {k: (np.full(v.shape, 1e4, np.float64).astype(v.dtype) if v.dtype.kind == "f" else v) for k, v in MODEL.items()}
    planted = [*updates[:6], ClientUpdate("evil", bad, 1000)]
    fedavg_honest, _ = make_strategy("fedavg").step(MODEL, {k: stack(updates[:6], k).mean(axis=0) for k in MODEL}, {})
    fedavg_planted, _ = make_strategy("fedavg").step(MODEL, {k: stack(planted, k).mean(axis=0) for k in MODEL}, {})
    assert np.abs(fedavg_planted["w"] - fedavg_honest["w"]).max() > 1000  # the outlier moves FedAvg
    kw = {"f": 1} if name in ("krum", "multikrum", "bulyan") else {}
    got, _ = make_strategy(name, kw).aggregate(MODEL, planted, SEED)
    honest = stack(updates[:6], "w")
    # Each coordinate stays within the honest clients' range: the outlier had no say.
    assert (got["w"] >= honest.min(axis=0) - 1e-6).all() and (got["w"] <= honest.max(axis=0) + 1e-6).all()


@pytest.mark.parametrize(("name", "f", "least"), [("krum", 1, 5), ("krum", 2, 7), ("multikrum", 2, 7), ("bulyan", 1, 7), ("bulyan", 2, 11)])
def test_too_few_updates_for_f_are_refused(name: str, f: int, least: int) -> None:
    strategy = make_strategy(name, {"f": f})
    with pytest.raises(UpdateRejected, match=rf"{name} with f={f} needs n .* at least {least} updates"):
        strategy.aggregate(MODEL, random_updates(least - 1), {})
    strategy.aggregate(MODEL, random_updates(least), {})  # exactly enough


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("krum", {"f": -1}, "aggregator_kwargs.f: must lie in"),
        ("krum", {"f": 1.5}, "aggregator_kwargs.f: must be a whole number"),
        ("multikrum", {"m": 2.5}, "aggregator_kwargs.m: must be a whole number"),
        ("bulyan", {"f": "one"}, "aggregator_kwargs.f: must be a finite number"),
        ("trimmedmean", {"beta": 0.5}, r"aggregator_kwargs.beta: must lie in \[0, 0.5\)"),
        ("dpfedavg", {"clip_norm": 0}, "aggregator_kwargs.clip_norm: must lie in"),
        ("dpfedavg", {"noise_multiplier": -1}, "aggregator_kwargs.noise_multiplier: must lie in"),
        ("fedmedian", {"beta": 0.1}, "fedmedian takes no such setting"),
    ],
)
def test_bad_settings_are_refused(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_strategy(name, kwargs)


def test_multikrum_m_beyond_n_is_refused() -> None:
    with pytest.raises(UpdateRejected, match="m=9 needs at least 9 updates"):
        make_strategy("multikrum", {"m": 9}).aggregate(MODEL, random_updates(5), {})


def test_dpfedavg_noise_is_reproducible_from_state_and_recorded() -> None:
    updates = random_updates(5, seed=2)
    s = make_strategy("dpfedavg", {"clip_norm": 0.5, "noise_multiplier": 1.0})
    first, state = s.aggregate(MODEL, updates, SEED)
    assert s.last_record == {
        "clip_norm": 0.5, "noise_multiplier": 1.0, "clients": 5, "noise_std": 0.5, "noise_std_of_mean": 0.1, "clipped": 5,
        "mean": "unweighted over clients",
    }
    again, _ = make_strategy("dpfedavg", {"clip_norm": 0.5, "noise_multiplier": 1.0}).aggregate(MODEL, updates, SEED)
    np.testing.assert_array_equal(first["w"], again["w"])  # the same state: the same noise (a round run again)
    second, _ = s.aggregate(MODEL, updates, state)  # the next round: fresh noise
    assert not np.array_equal(first["w"], second["w"])
    assert int(state[robust.ROUNDS_KEY][0]) == 1
    with pytest.raises(UpdateRejected, match="lacks its noise seed"):
        s.aggregate(MODEL, updates, {})


def test_dpfedavg_clips_each_change() -> None:
    big = {k: (v + 100).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in MODEL.items()}
    got, _ = make_strategy("dpfedavg", {"clip_norm": 2.0, "noise_multiplier": 0}).aggregate(MODEL, [ClientUpdate("a", big, 1)], SEED)
    change = np.sqrt(sum(np.sum((got[k].astype(np.float64) - MODEL[k]) ** 2) for k in ("w", "b")))
    assert change == pytest.approx(2.0, rel=1e-4)
