"""The quickstart's train callback under FedProx: with ``mu`` in its settings it adds the
proximal term's gradient mu (w - w_global); without it (or with mu 0) it trains as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_edge import QUICKSTART, load_module, seed_and_clients

from scaleout import ScaleoutModel
from scaleoututil.helpers.helpers import get_helper


def distance(update: bytes, seed: bytes) -> float:
    helper = get_helper("numpyhelper")
    a = ScaleoutModel.from_bytes(update).get_model_params(helper)
    b = ScaleoutModel.from_bytes(seed).get_model_params(helper)
    return float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b))))


def test_sgd_step_adds_the_proximal_gradient() -> None:
    startup = load_module(QUICKSTART / "startup.py")
    x, y, _, _ = startup.make_shard("client-1")
    rng = np.random.default_rng(0)
    params = [(rng.standard_normal(s) * 0.3).astype(np.float32) for s in [(20, 16), (16,), (16, 3), (3,)]]
    anchor = [p + (rng.standard_normal(p.shape) * 0.1).astype(np.float32) for p in params]
    lr, mu = 0.05, 0.7
    plain = startup.sgd_step(params, x[:32], y[:32], lr)
    prox = startup.sgd_step(params, x[:32], y[:32], lr, anchor, mu)
    for p, q, w, a in zip(plain, prox, params, anchor):
        np.testing.assert_allclose(q, p - lr * mu * (w - a), rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(p, q) for p, q in zip(plain, startup.sgd_step(params, x[:32], y[:32], lr, anchor, 0.0)))


def test_train_with_mu_stays_nearer_the_global_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def train(settings: dict[str, float]) -> tuple[bytes, bytes, dict]:
        seed, (client,) = seed_and_clients(QUICKSTART, tmp_path, monkeypatch, n=1)
        update, meta = client.run_train(seed, {"epochs": 2, **settings})
        return seed, update, meta

    seed, default, meta = train({})
    assert "mu" not in meta["training_metadata"]
    _, zero, _ = train({"mu": 0.0})
    assert zero == default  # mu 0 is plain training, to the bit
    _, prox, meta = train({"mu": 5.0})
    assert meta["training_metadata"]["mu"] == 5.0
    assert distance(prox, seed) < 0.8 * distance(default, seed)
