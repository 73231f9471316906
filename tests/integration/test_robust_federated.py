"""Strategies that need each update on its own, over real processes: the combiners forward
every update, the controller spills them to disk and aggregates them memory-mapped
(fedmedian, krum, dpfedavg on 5 clients over 2 combiners), the spill files are gone once
the round is over, and a controller killed with updates spilled runs the round again (issue 15)."""

from __future__ import annotations

import importlib.util
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, Federation, federation, wait_stdout

from scaleout.core import payload

PACKAGE = FIXTURES / "shift_client"
CLIENTS = [f"s{i}" for i in range(5)]


def _shift() -> object:
    spec = importlib.util.spec_from_file_location("shift_startup", PACKAGE / "startup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.shift


def client_updates(seed: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Each client's update as its train callback makes it."""
    shift = _shift()
    out = {}
    for c in CLIENTS:
        d, _ = shift(c)  # type: ignore[operator]
        out[c] = [seed[0] + d, seed[1] - 2 * d, seed[2] + round(100 * d)]
    return out


def test_fedmedian_krum_dpfedavg_over_two_combiners_and_no_spill_left(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        controller = fed.controller()
        seed_id = fed.seed_from(PACKAGE)
        fed.combiner("c0")
        fed.combiner("c1")
        for name in CLIENTS:
            fed.client(name, package=PACKAGE)
        fed.wait_clients(len(CLIENTS))
        assert sorted(c["clients"] for c in fed.admin("combiner.ls")[0]["combiners"]) == [2, 3]

        def model(model_id: str) -> list[np.ndarray]:
            data = fed.admin("model.get", {"id": model_id})[1]
            assert data is not None
            decoded = payload.decode(data)
            assert isinstance(decoded, list)
            return decoded

        seed = model(seed_id)
        updates = client_updates(seed)
        runs = {}
        for aggregator, kwargs in (
            ("fedmedian", {}),
            ("krum", {"f": 1}),
            ("dpfedavg", {"clip_norm": 10.0, "noise_multiplier": 0.01}),
        ):
            session = fed.run_session(rounds=1, min_clients=len(CLIENTS), validate=False, aggregator=aggregator, aggregator_kwargs=kwargs, model=seed_id)
            assert session["status"] == "finished", session
            (row,) = session["rounds"]
            assert sorted(row["participants"]) == CLIENTS, row
            runs[aggregator] = (row, model(row["model_id"]))

        # fedmedian: the coordinate-wise median of the five shifted models is s2's, exactly.
        _, median = runs["fedmedian"]
        for got, want in zip(median, updates["s2"], strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        # krum: one client's update unchanged, one of the middle three (they tie: each has two neighbours 0.03 away).
        _, krum = runs["krum"]
        assert any(all(np.array_equal(g, w) for g, w in zip(krum, updates[c], strict=True)) for c in ("s1", "s2", "s3")), krum
        # dpfedavg: the unweighted mean of the changes (none clipped at 10) plus noise of std 0.01 * 10 / 5 per element.
        row, dp = runs["dpfedavg"]
        assert row["aggregation"] == {
            "clip_norm": 10.0, "noise_multiplier": 0.01, "clients": 5, "noise_std": 0.1, "noise_std_of_mean": 0.02, "clipped": 0,
            "mean": "unweighted over clients",
        }
        for k in (0, 1):
            mean = np.mean([updates[c][k].astype(np.float64) for c in CLIENTS], axis=0)
            assert np.abs(dp[k] - mean).max() < 6 * 0.02
            assert not np.allclose(dp[k], mean, atol=1e-5)  # noise was added
        np.testing.assert_array_equal(dp[2], np.rint(np.mean([updates[c][2] for c in CLIENTS], axis=0)).astype(np.int32))
        assert row["server_state"]  # the noise seed is kept with the session

        # Settings that cannot work: refused at start, or (too few updates for f) the round fails saying why.
        with pytest.raises(Exception, match=r"aggregator_kwargs.f: must be a whole number, got 1.5"):
            fed.admin("session.start", {"rounds": 1, "aggregator": "krum", "aggregator_kwargs": {"f": 1.5}})
        session = fed.run_session(rounds=1, min_clients=len(CLIENTS), validate=False, aggregator="bulyan", aggregator_kwargs={"f": 1}, model=seed_id)
        (row,) = session["rounds"]
        assert row["status"] == "failed" and row["model_id"] is None, row
        assert row["reason"] == "5 updates are too few: bulyan with f=1 needs n >= 4f + 3, i.e. at least 7 updates", row

        # Every update went through a spill file, and none is left.
        assert controller.text().count("spilled to disk") == 4 * len(CLIENTS)
        assert [p for p in (fed.data / "spill").rglob("*") if p.is_file()] == []


def test_a_controller_killed_with_updates_spilled_runs_the_round_again(fed: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALEOUT_FAILPOINT", "collect")  # the first controller holds once an update is spilled
    first = fed.controller()
    monkeypatch.delenv("SCALEOUT_FAILPOINT")
    seed_id = fed.seed_from(PACKAGE)
    fed.combiner("c0")
    fed.combiner("c1")
    for name in CLIENTS:
        fed.client(name, package=PACKAGE)
    fed.wait_clients(len(CLIENTS))
    config = {"rounds": 1, "round_timeout": 30, "min_clients": len(CLIENTS), "validate": False, "aggregator": "fedmedian"}
    session = fed.admin("session.start", config)[0]["session"]
    wait_stdout(first, "failpoint collect")
    spilled = [p for p in (fed.data / "spill").rglob("*.safetensors")]
    assert len(spilled) == 1, spilled  # on disk, not in memory
    port = int(fed.url.rsplit(":", 1)[1])
    first.popen.send_signal(signal.SIGKILL)
    assert first.popen.wait(10) == -signal.SIGKILL
    assert spilled[0].is_file()  # what the kill left
    stray = fed.data / "spill" / "s-older" / "1-1" / "000000.safetensors"  # as an older kill would leave it
    stray.parent.mkdir(parents=True)
    stray.write_bytes(spilled[0].read_bytes())
    fed.controller(name="controller-2", port=port)  # sweeps it, resumes the session

    done = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
    assert done["status"] == "finished", done
    (row,) = done["rounds"]
    assert row["attempt"] == 2 and row["retried"] == ["controller restarted"], row
    data = fed.admin("model.get", {"id": row["model_id"]})[1]
    assert data is not None
    seed = payload.decode(fed.admin("model.get", {"id": seed_id})[1])  # type: ignore[arg-type]
    for got, want in zip(payload.decode(data), client_updates(seed)["s2"], strict=True):  # type: ignore[arg-type]
        np.testing.assert_array_equal(got, want)
    assert [p for p in (fed.data / "spill").rglob("*") if p.is_file()] == []
