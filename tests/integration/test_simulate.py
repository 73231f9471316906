"""`scaleout simulate`: real controller and combiners, lightweight clients, a full report."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import scaleout

from scaleout.commands.simulate import hosts_for


def test_hosts_split_clients_evenly() -> None:
    assert hosts_for(1) == [(1, 1)]
    assert hosts_for(1000) == [(1, 500), (501, 500)]
    assert hosts_for(1001) == [(1, 334), (335, 334), (669, 333)]
    big = hosts_for(10_000)
    assert len(big) == 8 and sum(c for _, c in big) == 10_000 and big[-1][0] + big[-1][1] == 10_001


def test_simulate_reports_rounds_time_split_and_memory(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    r = scaleout("simulate", "--clients", "60", "--combiners", "3", "--rounds", "2", "--model-size", "5000", "--report", str(report), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(report.read_text())
    assert data["session"]["status"] == "finished"
    assert [x["index"] for x in data["rounds"]] == [1, 2]
    names = {f"sim-{i:05d}" for i in range(1, 61)}
    models = set()
    for rnd in data["rounds"]:
        assert rnd["status"] == "succeeded" and rnd["participants"] == 60 and set(rnd["clients"]) == names
        assert set(rnd["timing"]) == {"distribute_s", "train_s", "collect_s", "reduce_s", "commit_s"}
        assert all(v >= 0 for v in rnd["timing"].values())
        models.add(rnd["model_id"])
    assert len(models) == 2  # each round moved the model
    rss = data["peak_rss_mb"]
    assert rss["controller"] > 0 and sorted(rss["combiners"]) == ["combiner-1", "combiner-2", "combiner-3"]
    assert list(rss["client_processes"]) == ["clients-1"] and rss["client_processes"]["clients-1"] > 0
    assert data["simulation"]["clients"] == 60 and data["simulation"]["client_processes"] == 1
    # Connect time, how the clients spread and what the idle fleet costs each role.
    connect = data["connect"]
    assert connect["connect_s"] > 0 and sum(connect["clients_per_combiner"].values()) == 60
    assert sorted(connect["clients_per_combiner"]) == ["combiner-1", "combiner-2", "combiner-3"]
    assert all(v > 0 for v in connect["rss_mb"]["combiners"].values()) and connect["rss_mb"]["controller"] > 0
    # Each round: every role's peak RSS as it ended, never above the run's peak.
    for rnd in data["rounds"]:
        per_round = rnd["peak_rss_mb"]
        assert 0 < per_round["controller"] <= rss["controller"]
        assert sorted(per_round["combiners"]) == ["combiner-1", "combiner-2", "combiner-3"]
        assert all(0 < v <= rss["combiners"][k] for k, v in per_round["combiners"].items())
        # And the CPU each role spent on it.
        cpu = rnd["cpu_s"]
        assert cpu["controller"] >= 0 and sorted(cpu["combiners"]) == ["combiner-1", "combiner-2", "combiner-3"]
        assert list(cpu["client_processes"]) == ["clients-1"]
    assert connect["cpu_s"]["controller"] > 0


def test_simulate_mistakes(tmp_path: Path) -> None:
    r = scaleout("simulate", "--clients", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--clients must be at least 1" in r.stderr, r.stderr
