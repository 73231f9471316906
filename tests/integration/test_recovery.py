"""Recovery: a controller killed mid-session resumes that session by itself (issue 14)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
from numpy.testing import assert_allclose

from conftest import FIXTURES, Federation, scaleout, sqlite_only, wait_stdout

from scaleout.core import payload
from scaleout.core.aggregators import make_strategy

RECOVER = FIXTURES / "recover_client"
FEDADAM = {"learning_rate": 0.05}


def shift(name: str) -> tuple[float, int]:
    """The update rule of tests/fixtures/recover_client (its `shift`)."""
    i = int(name.lstrip("r"))
    return 0.03 * i - 0.05, 10 * (i + 1)


def uninterrupted(seed: bytes, clients: list[str], rounds: int) -> dict[str, np.ndarray]:
    """What an uninterrupted FedAdam session over these clients commits, computed here."""
    strategy = make_strategy("fedadam", FEDADAM)
    model = {k: np.array(v) for k, v in payload.read(seed)[0].items()}
    state: dict[str, Any] = {}
    for _ in range(rounds):
        total = sum(shift(c)[1] for c in clients)
        mean = {k: sum(shift(c)[1] * (v + shift(c)[0]).astype(np.float64) for c in clients) / total for k, v in model.items()}
        model, state = strategy.step(model, mean, state)
        model = {k: np.asarray(v) for k, v in model.items()}
    return model


def test_a_session_resumes_by_itself_after_the_controller_is_killed_in_round_4(fed: Federation, tmp_path: Path) -> None:
    first = fed.controller()
    seed = fed.seed_from(RECOVER)
    fed.combiner("c1")
    fed.combiner("c2")
    names = [f"r{i}" for i in range(4)]
    clients = [fed.client(name, package=RECOVER) for name in names]
    fed.wait_clients(4)
    gate = tmp_path / "gate"
    config = {
        "rounds": 6, "round_timeout": 30, "min_clients": 4, "aggregator": "fedadam", "aggregator_kwargs": FEDADAM,
        "validate": False, "settings": {"gate": str(gate), "gate_from": 4},
    }
    session = fed.admin("session.start", config)[0]["session"]
    wait_stdout(clients[0], "recover_client: held")  # round 4's tasks are out: its 4th train call
    (inflight,) = [r["idx"] for r in fed.admin("session.show", {"id": session["id"]})[0]["session"]["rounds"] if r["status"] == "running"]
    assert inflight == 4 or inflight == 3, inflight  # 3 only if a link blip had a task sent twice earlier

    port = int(fed.url.rsplit(":", 1)[1])
    first.popen.send_signal(signal.SIGKILL)
    assert first.popen.wait(10) == -signal.SIGKILL
    gate.touch()  # the retried round 4 and later ones train at once
    fed.controller(name="controller-2", port=port)  # same data dir, same address, no admin command

    done = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
    assert done["status"] == "finished", done
    rounds = done["rounds"]
    assert [r["idx"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r["status"] == "succeeded" for r in rounds), rounds
    retried = rounds[inflight - 1]
    assert retried["attempt"] == 2 and retried["retried"] == ["controller restarted"], retried
    assert all(r["attempt"] == 1 for r in rounds if r["idx"] != inflight)
    # The trail is linked: each round's model is the parent of the next, from the seed on.
    parents = [r["parent"] for r in rounds]
    assert parents == [seed] + [r["model_id"] for r in rounds[:-1]]
    models = {m["id"]: m for m in fed.admin("model.ls", {"session_id": session["id"]})[0]["models"]}
    assert len(models) == 6 and all(models[r["model_id"]]["parent"] == r["parent"] for r in rounds)

    # Exactly what an uninterrupted session would have committed (FedAdam's moments were reloaded).
    seed_bytes = fed.admin("model.get", {"id": seed})[1]
    final = fed.admin("model.get", {"id": done["end_model"]})[1]
    assert seed_bytes is not None and final is not None
    expected = uninterrupted(seed_bytes, names, 6)
    got = payload.read(final)[0]
    for key, value in expected.items():
        assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
    verify = scaleout("audit", "verify", "--data-dir", str(fed.data), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"resumes after a restart: round {inflight} again (try 2)" in fed.procs[-1].text()


def test_serve_no_resume_leaves_the_session_interrupted(fed: Federation, tmp_path: Path) -> None:
    first = fed.controller()
    fed.seed_from(RECOVER)
    fed.combiner("c1")
    client = fed.client("r1", package=RECOVER)
    fed.wait_clients(1)
    config = {"rounds": 3, "round_timeout": 30, "validate": False, "settings": {"gate": str(tmp_path / "gate"), "gate_from": 2}}
    session = fed.admin("session.start", config)[0]["session"]
    wait_stdout(client, "recover_client: held")  # round 2 in flight
    port = int(fed.url.rsplit(":", 1)[1])
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(10)
    fed.controller("--no-resume", name="controller-2", port=port)
    row = fed.admin("session.show", {"id": session["id"]})[0]["session"]
    assert row["status"] == "interrupted", row
    assert [r["status"] for r in row["rounds"]] == ["succeeded", "failed"]
    assert row["rounds"][1]["reason"] == "controller restarted"
    assert fed.admin("status")[0]["session"] is None


def test_continue_a_finished_session_start_from_any_model_and_roll_back(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(RECOVER)
    fed.combiner("c1")
    fed.client("r1", package=RECOVER)
    fed.wait_clients(1)
    first = fed.run_session(rounds=2, validate=False, aggregator="fedadam", aggregator_kwargs=FEDADAM)
    assert first["status"] == "finished", first
    data = ["--data-dir", str(fed.data)]

    r = scaleout("session", "continue", first["id"], "--rounds", "2", "--wait", *data)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"session {first['id']} continues from model {first['end_model'][:12]}, up to round 4" in r.stdout, r.stdout
    again = fed.admin("session.show", {"id": first["id"]})[0]["session"]
    assert again["status"] == "finished" and [x["idx"] for x in again["rounds"]] == [1, 2, 3, 4]
    assert again["rounds"][2]["parent"] == first["rounds"][1]["model_id"]  # it carried on from its last model
    assert again["config"]["rounds"] == 4
    # The same result as four rounds at once: the moments went on too (FedAdam's state reloaded).
    final = fed.admin("model.get", {"id": again["end_model"]})[1]
    seed_bytes = fed.admin("model.get", {"id": seed})[1]
    assert final is not None and seed_bytes is not None
    expected = uninterrupted(seed_bytes, ["r1"], 4)
    for key, value in expected.items():
        assert_allclose(payload.read(final)[0][key], value, rtol=1e-5, atol=1e-6)

    r = scaleout("session", "continue", "s-nonexistent", *data)
    assert r.returncode != 0 and "s-nonexistent" in r.stderr and "Traceback" not in r.stderr

    # Roll the global model back to round 1's, audited; then start a new session from the seed.
    round1 = first["rounds"][0]["model_id"]
    r = scaleout("model", "set-active", round1[:10], *data)
    assert r.returncode == 0 and f"model {round1} is now the global model" in r.stdout, r.stdout + r.stderr
    assert fed.admin("status")[0]["active_model"] == round1
    r = scaleout("session", "start", "--rounds", "1", "--no-validate", "--model", seed, "--wait", *data)
    assert r.returncode == 0, r.stdout + r.stderr
    latest = fed.admin("session.show", {})[0]["session"]
    assert latest["start_model"] == seed and latest["rounds"][0]["parent"] == seed
    actions = [e["action"] for e in fed.admin("audit.ls", {"limit": 100})[0]["entries"]]
    assert "model.set_active" in actions and "session.continue" in actions


def test_files_an_interrupted_commit_left_are_swept_at_the_next_start(fed: Federation) -> None:
    sqlite_only("it plants files in the data dir's models/; on PostgreSQL unnamed large objects are swept (tests/store/test_pg_store.py)")
    first = fed.controller()
    seed = fed.seed_from(RECOVER)
    assert first.stop() == 0
    models = fed.data / "models"
    orphan = models / ("ab" * 32 + ".safetensors")  # written, never committed (a kill in between)
    orphan.write_bytes(b"not committed")
    half = models / f".{'cd' * 32}.safetensors.123.beef.tmp"  # a write cut short
    half.write_bytes(b"half")
    fed.controller(name="controller-2")
    assert not orphan.exists() and not half.exists()
    assert (models / f"{seed}.safetensors").exists()  # the committed one stays
    assert fed.admin("status")[0]["active_model"] == seed
    assert "removed 2 file(s) from" in fed.procs[-1].text()


def test_a_combiner_whose_link_drops_mid_round_comes_back_and_its_partial_counts(fed: Federation, tmp_path: Path) -> None:
    import subprocess

    fed.controller()
    fed.seed_from(RECOVER)
    combiner = fed.combiner("c1")
    clients = [fed.client(f"r{i}", package=RECOVER) for i in range(2)]
    fed.wait_clients(2)
    gate = tmp_path / "gate"
    config = {"rounds": 2, "round_timeout": 30, "min_clients": 2, "validate": False, "settings": {"gate": str(gate), "gate_from": 2}}
    session = fed.admin("session.start", config)[0]["session"]
    wait_stdout(clients[0], "recover_client: held")  # round 2's tasks are out
    port = fed.url.rsplit(":", 1)[1]
    # The network drops the combiner's link to the controller (its socket is destroyed); both stay up.
    cut = subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", port], capture_output=True, text=True)
    assert cut.returncode == 0 and f":{port}" in cut.stdout, cut.stdout + cut.stderr
    gate.touch()

    done = fed.admin("session.wait", {"id": session["id"]})[0]["session"]
    assert done["status"] == "finished", done
    second = done["rounds"][1]
    assert second["status"] == "succeeded" and second["participants"] == ["r0", "r1"] and second["attempt"] == 1, second
    assert "reconnected to the controller" in combiner.text()
    assert "combiner c1 is back" in fed.procs[0].text()
