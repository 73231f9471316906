"""The chaos suite (issue 14): real processes, a fault at a chosen moment of a round.

Each scenario runs a 4-round session over 2 combiners and 4 clients, hits one role at one
moment (SIGKILL and a restart on the same state, or SIGSTOP for 15 s then SIGCONT; see
MOMENTS), and
asserts that the session still finishes: round indexes 1..4, each succeeded once, the trail
linked, no client counted twice in a round, `audit verify` ok. It records the recovery time:
from the kill (or the SIGCONT) to the first training task a client starts after it.

`make test` runs the short form (a SIGKILL of a combiner and of a client while clients
train, and of the controller between writing a new model and committing it; the controller
killed while clients train is tests/integration/test_recovery.py). `make chaos` runs the whole
matrix (CHAOS_FULL=1) and prints a table (tests/chaos/report.py).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
# tests/conftest.py (the PostgreSQL fixtures) was imported as "conftest" before this folder:
# the name must find the integration suite's, as pytest itself re-imports each conftest.
sys.modules.pop("conftest", None)

from conftest import FIXTURES, Federation, Proc, fed, node_state_home, scaleout, wait_stdout  # noqa: E402

__all__ = ["fed", "node_state_home"]  # the integration fixtures, used here too

RECOVER = FIXTURES / "recover_client"
ROUNDS = 4
STOP_S = 15.0
FULL = os.environ.get("CHAOS_FULL") == "1"

SHORT = [("combiner", "train", "kill"), ("client", "train", "kill"), ("controller", "commit", "kill")]
# Moments: while clients train or validate (their package holds until a file exists), and at the
# roles' fault-injection points (SCALEOUT_FAILPOINT, roles/common.py failpoint): "distribute"
# (the round recorded, its orders or tasks not yet sent), "collect" (an update or partial folded
# in, the round not decided), "commit" (the new model's file written, its rows not yet).
MOMENTS = {"controller": ("train", "validate", "distribute", "collect", "commit"), "combiner": ("train", "validate", "distribute", "collect"), "client": ("train", "validate")}
GATED = ("train", "validate")
MATRIX = [(role, moment, how) for role, moments in MOMENTS.items() for moment in moments for how in (("kill", "stop") if moment in GATED else ("kill",))]


def scenarios() -> list[Any]:
    chosen = MATRIX if FULL else SHORT
    return [pytest.param(*s, id="-".join(s)) for s in chosen]


def train_started_after(clients: list[Proc], since: float, timeout: float) -> float:
    """The first ``recover_client: train T`` (or ``held (train T)``) with T >= since that any client prints: when a
    training task reached a client after the fault. Streams are read without blocking, the
    bytes a buffered reader already holds included (select alone would miss those)."""
    deadline = time.monotonic() + timeout
    streams = [c.popen.stdout for c in clients if c.popen.poll() is None and c.popen.stdout is not None]
    pending = {id(s): b"" for s in streams}
    for s in streams:
        os.set_blocking(s.fileno(), False)
    with selectors.DefaultSelector() as sel:
        for s in streams:
            sel.register(s, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            for s in streams:
                data = s.read1(1 << 16)
                if not data:
                    continue
                *lines, pending[id(s)] = (pending[id(s)] + data).split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace")
                    if "train " in text and text.startswith("recover_client: "):
                        at = float(text.rsplit("train ", 1)[1].rstrip(")"))
                        if at >= since:
                            return at
            sel.select(0.5)
    raise AssertionError(f"no client started training within {timeout}s of the fault")


@pytest.mark.parametrize(("role", "moment", "how"), scenarios())
def test_a_session_survives(role: str, moment: str, how: str, fed: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, vgate = tmp_path / "gate", tmp_path / "vgate"
    if moment == "validate":  # round 2's validation holds until vgate exists
        monkeypatch.setenv("RECOVER_VGATE", str(vgate))
        monkeypatch.setenv("RECOVER_VGATE_FROM", "2")
    failpoint = moment not in GATED  # the target holds at that point of round 1 (only the first process)
    if failpoint and role == "controller":
        monkeypatch.setenv("SCALEOUT_FAILPOINT", moment)
    controller = fed.controller()
    monkeypatch.delenv("SCALEOUT_FAILPOINT", raising=False)
    seed = fed.seed_from(RECOVER)
    combiners = {}
    for name in ("c1", "c2"):
        if failpoint and role == "combiner" and name == "c1":
            monkeypatch.setenv("SCALEOUT_FAILPOINT", moment)
        combiners[name] = fed.combiner(name)
        monkeypatch.delenv("SCALEOUT_FAILPOINT", raising=False)
    names = [f"r{i}" for i in range(4)]
    clients = {name: fed.client(name, package=RECOVER) for name in names}
    fed.wait_clients(4)
    settings = {"gate": str(gate), "gate_from": 2} if moment == "train" else {}
    config = {"rounds": ROUNDS, "round_timeout": 25, "min_clients": 1, "validate": moment == "validate", "settings": settings}
    session = fed.admin("session.start", config)[0]["session"]

    # The fault. Its target: the controller, a combiner (the one r0 is on; c1 for a failpoint), or r0 itself.
    if role == "controller":
        target = controller
    elif role == "combiner" and failpoint:
        target = combiners["c1"]
    elif role == "combiner":
        where = {c["name"]: c["combiner"] for c in fed.admin("client.ls")[0]["clients"]}
        target = combiners[where["r0"]]
    else:
        target = clients["r0"]
    if failpoint:
        wait_stdout(target, f"failpoint {moment}")
    else:
        wait_stdout(clients["r0"], "recover_client: held" if moment == "train" else "recover_client: validating")
    port = int(fed.url.rsplit(":", 1)[1])
    if how == "kill":
        target.popen.send_signal(signal.SIGKILL)
        target.popen.wait(10)
        resumed = time.time()
        (gate if moment == "train" else vgate).touch()
        if role == "controller":
            fed.controller(name="controller-2", port=port)
        elif role == "combiner":
            again = fed.combiner(target.name)  # the same name and --state-dir: the same node again
        else:
            again = clients["r0"] = fed.client("r0", package=RECOVER)
    else:
        target.popen.send_signal(signal.SIGSTOP)
        try:
            time.sleep(STOP_S)  # the fault itself is a pause of this length, not a synchronisation
        finally:
            target.popen.send_signal(signal.SIGCONT)
        resumed = time.time()
        (gate if moment == "train" else vgate).touch()

    recovery = train_started_after([c for c in clients.values()], resumed, 90) - resumed
    done = fed.admin("session.wait", {"id": session["id"]}, timeout=180)[0]["session"]
    outcome = done["status"]
    _record(role, moment, how, outcome, recovery)

    assert outcome == "finished", done
    rounds = done["rounds"]
    assert [r["idx"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["status"] == "succeeded" for r in rounds), rounds
    assert [r["parent"] for r in rounds] == [seed] + [r["model_id"] for r in rounds[:-1]]  # the trail is linked
    for r in rounds:
        assert len(r["participants"]) == len(set(r["participants"])), r  # nobody counted twice
    trail = fed.admin("model.ls", {"session_id": session["id"]})[0]["models"]
    assert sorted(m["id"] for m in trail) == sorted(r["model_id"] for r in rounds)  # one commit per round
    verify = scaleout("audit", "verify", "--data-dir", str(fed.data))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    if how == "kill" and role != "controller":  # restarted on its state dir: its own identity again, no new enrolment
        assert "enrolled as" not in again.text(), again.text()
    if role == "controller" and moment == "commit":  # the file written before the kill, never committed: swept
        assert "that no committed row names (left by an interrupted write)" in fed.procs[-1].text()
        assert rounds[0]["attempt"] == 2 and rounds[0]["retried"] == ["controller restarted"], rounds[0]


def _record(role: str, moment: str, how: str, outcome: str, recovery: float) -> None:
    report = os.environ.get("CHAOS_REPORT")
    if report:
        with open(report, "a") as fh:
            fh.write(json.dumps({"role": role, "moment": moment, "fault": how, "outcome": outcome, "recovery_s": round(recovery, 2)}) + "\n")
