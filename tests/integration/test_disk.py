"""A full disk on the controller: the session fails with the reason, nothing is left half
written, and work goes on once space is freed. The disk is a real, small tmpfs filled to
the last byte (mounting needs root: CI runs as root; elsewhere these skip)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from conftest import FIXTURES, QUICKSTART, fill_disk, federation, scaleout, sqlite_only, tmpfs, wait_stdout

GATE = FIXTURES / "gate_client"
NO_SPACE = "no space left on device while writing"


def leftovers(directory: Path) -> list[str]:
    """Temporary or hidden files a failed write may have left behind."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def db_session(data: Path, session_id: str) -> tuple[dict[str, object], list[dict[str, object]]]:
    """A session and its rounds as state.db holds them (not as the controller reports them)."""
    db = sqlite3.connect(data / "state.db")
    db.row_factory = sqlite3.Row
    try:
        row = dict(db.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone())
        rounds = [dict(r) for r in db.execute("SELECT * FROM rounds WHERE session_id=? ORDER BY idx", (session_id,))]
    finally:
        db.close()
    return row, rounds


def test_full_models_dir_fails_the_session_with_the_reason_then_works_again(tmp_path: Path) -> None:
    sqlite_only("it fills the disk under the data dir's models/; on PostgreSQL the models are in the server")
    data = tmp_path / "controller"
    models = data / "models"
    models.mkdir(parents=True)
    with tmpfs(models, "1m"), federation(tmp_path) as fed:
        fed.controller()
        seed = fed.seed_from(QUICKSTART)
        fed.activate(QUICKSTART)
        fed.combiner("c1")
        fed.client("client-0", package=QUICKSTART)
        fed.wait_clients(1)
        filler = fill_disk(models)

        r = scaleout(
            "session", "start", "--rounds", "2", "--min-clients", "1", "--round-timeout", "30", "--no-validate", "--wait",
            "--data-dir", str(data),
        )
        assert r.returncode == 1, r.stdout + r.stderr
        lines = r.stdout.strip().splitlines()
        session_id = lines[0].split()[1]
        assert lines[1].startswith("round 1  failed  1 participants") and f"{NO_SPACE} model {models}/" in lines[1], r.stdout
        assert lines[2].startswith(f"session {session_id} failed: round 1: {NO_SPACE} model {models}/"), r.stdout
        assert len(lines) == 3, r.stdout  # the session ended at the failed commit: no round 2
        assert "internal error" not in r.stdout + r.stderr

        assert leftovers(models) == [] and sorted(p.name for p in models.iterdir()) == sorted([f"{seed}.safetensors", "filler"])
        row, rounds = db_session(data, session_id)  # state.db itself holds the outcome, not "running"
        assert row["status"] == "failed" and str(row["reason"]).startswith(f"round 1: {NO_SPACE} model "), row
        assert row["end_model"] == seed
        assert [(x["status"], str(x["reason"]).startswith(f"{NO_SPACE} model ")) for x in rounds] == [("failed", True)]
        for command in (["session", "show"], ["session", "ls"]):
            shown = scaleout(*command, "--data-dir", str(data))
            assert shown.returncode == 0 and "failed" in shown.stdout and f"{NO_SPACE} model" in shown.stdout, shown

        # A new seed cannot be written either: a clear one-line error, no temp file.
        from scaleout.core import payload

        other = tmp_path / "other.safetensors"
        other.write_bytes(payload.encode([np.ones((20, 16), np.float32), np.ones(16, np.float32), np.ones((16, 3), np.float32), np.ones(3, np.float32)]))
        r = scaleout("model", "set-seed", str(other), "--data-dir", str(data))
        assert r.returncode == 1 and r.stderr.startswith(f"scaleout: error: {NO_SPACE} model {models}/"), r
        assert len(r.stderr.strip().splitlines()) == 1 and leftovers(models) == []
        assert fed.admin("status")[0]["active_model"] == seed

        filler.unlink()
        session = fed.run_session(rounds=1, min_clients=1, validate=False)
        assert session["status"] == "finished", session
        trail = fed.admin("model.ls")[0]["models"]
        assert [m["id"] for m in trail][0] == seed and len(trail) == 2 and trail[-1]["active"]


def test_disk_full_mid_round_even_for_state_db(tmp_path: Path) -> None:
    """The whole data dir fills while a client trains: the model write fails, and so do the
    writes to state.db. The controller still reports the real outcome, never "running",
    and records it in state.db once space is back."""
    sqlite_only("it fills the disk holding state.db and the models; on PostgreSQL they are in the server (a cut link to it: test_pg_controller.py)")
    from scaleout.package.archive import create_archive

    data = tmp_path / "controller"
    data.mkdir()
    gate = tmp_path / "gate"
    quickstart_tgz = create_archive(QUICKSTART, tmp_path / "quickstart.tgz")
    with tmpfs(data, "8m"), federation(tmp_path) as fed:
        fed.controller()
        seed = fed.seed_from(GATE)
        fed.activate(GATE)
        fed.combiner("c1")
        client = fed.client("client-0", package=GATE)
        fed.wait_clients(1)
        config = {"rounds": 2, "min_clients": 1, "round_timeout": 30, "validate": False, "settings": {"gate": str(gate)}}
        first = fed.admin("session.start", config)[0]["session"]
        wait_stdout(client, "gate_client: training")  # round 1 runs, inside the train callback
        filler = fill_disk(data)
        gate.touch()

        session = fed.admin("session.wait", {"id": first["id"]})[0]["session"]
        assert session["status"] == "failed", session
        assert session["reason"].startswith(f"round 1: {NO_SPACE} model {data}/models/"), session
        assert [(r["idx"], r["status"]) for r in session["rounds"]] == [(1, "failed")]
        assert session["rounds"][0]["reason"].startswith(f"{NO_SPACE} model "), session
        assert fed.admin("status")[0]["session"] is None
        (listed,) = fed.admin("session.ls")[0]["sessions"]
        assert (listed["status"], listed["reason"]) == ("failed", session["reason"])
        shown = scaleout("session", "show", "--data-dir", str(data))
        assert shown.returncode == 0 and f"failed  (round 1: {NO_SPACE} model" in shown.stdout, shown
        assert leftovers(data / "models") == []

        r = scaleout("package", "set-active", str(quickstart_tgz), "--data-dir", str(data))
        assert r.returncode == 1 and r.stderr.startswith(f"scaleout: error: {NO_SPACE} package {data}/packages/"), r
        assert leftovers(data / "packages") == []

        filler.unlink()
        second = fed.run_session(**config)
        assert second["status"] == "finished", second
        row, rounds = db_session(data, first["id"])  # recorded once space came back
        assert (row["status"], row["reason"]) == ("failed", session["reason"]) and row["end_model"] == seed
        assert [(r["status"], r["reason"]) for r in rounds] == [("failed", session["rounds"][0]["reason"])]
        assert leftovers(data / "models") == []
