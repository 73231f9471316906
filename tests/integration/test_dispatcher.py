"""Dispatcher and FEDn-style packages in real federations (controller, combiner, 3 clients)."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import FIXTURES, Federation, scaleout

DISPATCH = FIXTURES / "dispatch_client"
FEDN = FIXTURES / "fedn_client"


def test_dispatcher_package_runs_a_session_with_one_broken_client(fed: Federation, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(DISPATCH, tmp_path / "broken"))
    (broken / "train.py").write_text("import sys\nprint('reading /data/shard-3', file=sys.stderr)\nsys.exit(5)\n")
    fed.controller()
    fed.seed_from(DISPATCH)
    fed.combiner("c1")
    for i in range(3):
        fed.client(f"disp-{i}", package=DISPATCH)
    fed.client("disp-broken", package=broken)
    fed.wait_clients(4)
    session = fed.run_session(rounds=3, min_clients=3, settings={"epochs": 1, "learning_rate": 0.05})
    assert session["status"] == "finished", session
    rounds = session["rounds"]
    assert [r["status"] for r in rounds] == ["succeeded"] * 3
    assert all(r["participants"] == ["disp-0", "disp-1", "disp-2"] for r in rounds)
    loss = [r["validation"]["test_loss"] for r in rounds]
    assert loss[0] > loss[1] > loss[2], loss
    assert rounds[2]["validation"]["test_accuracy"] > 0.6, rounds  # the seed guesses among 3 classes
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    (error,) = {c["error"] for c in shown["rounds"][0]["clients"] if c["client"] == "disp-broken" and c["kind"] == "train"}
    assert error.startswith("train command `python train.py` exited with 5; its stderr ended: reading /data/shard-3"), error
    train = [c for c in shown["rounds"][0]["clients"] if c["kind"] == "train" and not c["error"]]
    assert all(c["data"]["metadata"]["training_metadata"]["num_examples"] == 300 for c in train)
    log = next(p for p in fed.procs if p.name == "disp-0").text()
    assert "train stdout | trained on 300 examples" in log and "train stderr | a line on stderr" in log


def test_fedn_project_downloaded_runs_a_session(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(FEDN)
    package = fed.activate(FEDN)
    fed.combiner("c1")
    for i in range(3):
        fed.client(f"fedn-{i}")
    fed.wait_clients(3)
    session = fed.run_session(rounds=2, min_clients=3)
    assert session["status"] == "finished", session
    assert all(r["status"] == "succeeded" and len(r["participants"]) == 3 for r in session["rounds"])
    acc = [r["validation"]["test_accuracy"] for r in session["rounds"]]
    assert acc[-1] > 0.6, acc
    log = next(p for p in fed.procs if p.name == "fedn-0").text()
    assert "startup stdout | data ready" in log and package[:12] in log


def test_dispatcher_package_in_a_managed_env(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(DISPATCH)
    fed.combiner("c1")
    cache = tmp_path / "envs"
    for i in range(2):  # both make the venv at once: one makes it, the other waits and reuses it
        fed.client(f"venv-{i}", package=DISPATCH, extra=("--managed-env", "--env-cache", str(cache)))
    fed.wait_clients(2)
    session = fed.run_session(rounds=1, min_clients=2)
    assert session["status"] == "finished", session
    (venv,) = [p for p in cache.iterdir() if p.is_dir()]
    assert venv.name.startswith("dispatch-client-")
    logs = [p.text() for p in fed.procs if p.name.startswith("venv-")]
    assert sum("managed env: creating" in log for log in logs) == 1
    assert sum("managed env: using" in log for log in logs) == 1


def test_join_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not used: refused before connecting\n")
    conn = ("--controller", "wss://127.0.0.1:1", "--token", "x", "--ca", str(ca))
    r = scaleout("join", *conn, "-p", str(tmp_path), "--dispatcher")
    assert r.returncode == 2 and "is not a compute package" in r.stderr
    r = scaleout("join", *conn, "-p", str(DISPATCH), "--command-timeout", "0")
    assert r.returncode == 2 and "--command-timeout must be a number of seconds above 0" in r.stderr


def test_a_client_whose_managed_env_cannot_be_made_stops_with_one_line(fed: Federation, tmp_path: Path) -> None:
    package = Path(shutil.copytree(DISPATCH, tmp_path / "badenv"))
    (package / "python_env.yaml").write_text("dependencies:\n  - ./no-such-local-dir\n")
    fed.controller()
    client = fed.client("badenv", package=package, extra=("--managed-env", "--env-cache", str(tmp_path / "envs")))
    assert client.popen.wait(timeout=60) == 2
    last = client.text().strip().splitlines()[-1]
    assert "installing the dependencies of python_env.yaml into the managed env" in last and "pip exited with 1" in last, last
    assert not [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]


def test_dev_runs_a_dispatcher_package_in_a_managed_env(tmp_path: Path) -> None:
    r = scaleout("dev", "-p", str(DISPATCH), "--rounds", "1", "--clients", "2", "--managed-env", "--dispatcher", env={"XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "round 1  succeeded  2 participants" in r.stdout, r.stdout
    (venv,) = [p for p in (tmp_path / "cache" / "scaleout" / "envs").iterdir() if p.is_dir()]
    assert venv.name.startswith("dispatch-client-")
