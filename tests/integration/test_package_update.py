"""Package updates (issue 9 item 6): after `package set-active`, connected clients switch to
the new package before their next task; one that cannot load it says why and takes no work
until a loadable package is activated."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from conftest import FIXTURES, Federation, scaleout

PACKAGE = FIXTURES / "command_client"
CLIENTS = ["client-1", "client-2"]


def variant(tmp: Path, name: str, version: str, broken: bool = False) -> Path:
    dest = tmp / name
    shutil.copytree(PACKAGE, dest)
    (dest / "version.txt").write_text(version + "\n")
    if broken:
        (dest / "startup.py").write_text((dest / "startup.py").read_text() + "\nraise RuntimeError('broken on purpose')  # BROKEN HERE\n")
    return dest


def clients_until(fed: Federation, ok: Any, timeout: float = 30) -> list[dict[str, Any]]:
    """`client ls` rows once ``ok(rows)`` holds (a state the clients reach by themselves)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = fed.admin("client.ls")[0]["clients"]
        if ok(rows) or time.monotonic() > deadline:
            return rows


def echo(fed: Federation) -> tuple[int, dict[str, Any]]:
    r = scaleout("command", "run", "echo", "--wait", "--json", "--data-dir", str(fed.data))
    return r.returncode, json.loads(r.stdout)


def test_clients_switch_to_a_new_package_and_refuse_work_while_it_cannot_load(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(PACKAGE)
    first = fed.activate(variant(tmp_path, "pkg-a", "a"))
    fed.combiner("c1")
    for name in CLIENTS:
        fed.client(name)
    fed.wait_clients(2)
    rows = clients_until(fed, lambda rows: all(r.get("package") == first for r in rows))
    assert {r["name"]: r["package"] for r in rows} == {c: first for c in CLIENTS}
    code, job = echo(fed)
    assert code == 0 and {r["data"]["version"] for r in job["results"]} == {"a"}
    r = scaleout("client", "ls", "--data-dir", str(fed.data))
    assert r.returncode == 0 and first[:12] in r.stdout and "PACKAGE" in r.stdout

    second = fed.activate(variant(tmp_path, "pkg-b", "b"))
    rows = clients_until(fed, lambda rows: all(r.get("package") == second for r in rows))
    assert all(r["package"] == second and r["package_error"] is None for r in rows), rows
    code, job = echo(fed)
    assert code == 0 and {r["data"]["version"] for r in job["results"]} == {"b"}, job

    broken = fed.activate(variant(tmp_path, "pkg-c", "c", broken=True))
    rows = clients_until(fed, lambda rows: all(r.get("package") == broken and r.get("package_error") for r in rows))
    for row in rows:
        assert row["package"] == broken and "RuntimeError: broken on purpose (startup.py:" in row["package_error"], row
    assert "cannot load compute package" in fed.procs[0].text()
    code, job = echo(fed)
    assert code == 1 and {r["code"] for r in job["results"]} == {"no_package"}, job
    session = fed.run_session(rounds=1, min_clients=1, round_timeout=10, validate=False)
    assert session["status"] == "failed", session
    reports = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]["rounds"][0]["clients"]
    assert {x["client"] for x in reports} == set(CLIENTS)
    assert all("failed to load" in x["error"] and "takes no work" in x["error"] for x in reports), reports
    r = scaleout("client", "show", "client-1", "--data-dir", str(fed.data))
    assert r.returncode == 0 and "cannot load it: " in r.stdout

    again = fed.activate(variant(tmp_path, "pkg-d", "d"))
    rows = clients_until(fed, lambda rows: all(r.get("package") == again and not r.get("package_error") for r in rows))
    assert all(r["package"] == again and r["package_error"] is None for r in rows), rows
    code, job = echo(fed)
    assert code == 0 and {r["data"]["version"] for r in job["results"]} == {"d"}, job
    session = fed.run_session(rounds=1, min_clients=2, validate=False)
    assert session["status"] == "finished", session
