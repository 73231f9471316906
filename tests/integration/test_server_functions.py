"""Server functions over real processes: Scaleout Edge's published example file, unchanged
(tests/fixtures/server_functions/edge_example.py, see tests/roles/test_serverfunctions.py for
where it comes from), against 3 clients one of which logged {"charging": "False"}; a stateful
class across a controller restart; refusals at session start."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import FIXTURES, Federation, scaleout

PACKAGE = FIXTURES / "sfn_client"
EDGE = FIXTURES / "server_functions" / "edge_example.py"
CLIENTS = ["phone-a", "phone-b", "phone-off"]


def _attributes_arrived(fed: Federation, name: str, key: str) -> None:
    """Wait (bounded) until the controller stored the attribute ``key`` of client ``name``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if key in fed.admin("client.show", {"name": name})[0]["client"]["attributes"]:
            return
        time.sleep(0.1)  # polling a condition with a deadline: log_attributes has no ready signal
    raise AssertionError(f"client {name} never logged {key}")


def _federation(fed: Federation, *serve: str) -> None:
    fed.controller(*serve)
    fed.seed_from(PACKAGE)
    fed.combiner("c1")
    for name in CLIENTS:
        fed.client(name, package=PACKAGE)
    fed.wait_clients(len(CLIENTS))
    _attributes_arrived(fed, "phone-off", "charging")


def _start(fed: Federation, file: Path, *extra: str) -> str:
    assert fed.conn is not None
    r = scaleout(
        "session", "start", "--rounds", "2", "--round-timeout", "30", "--settings", '{"epochs": 3, "learning_rate": 0.5}',
        "--server-functions", str(file), "--json", *extra,
        "--controller", fed.url, "--token", fed.conn.token, "--ca", fed.ca,
    )
    assert r.returncode == 0, r.stderr
    import json

    return str(json.loads(r.stdout)["id"])


def test_edge_example_unchanged_leaves_out_the_client_not_charging_and_sets_the_learning_rate(fed: Federation) -> None:
    _federation(fed)
    sid = _start(fed, EDGE)
    session = fed.admin("session.wait", {"id": sid})[0]["session"]
    assert session["status"] == "finished", session
    for r in session["rounds"]:
        assert r["status"] == "succeeded" and r["participants"] == ["phone-a", "phone-b"], r
        assert not r.get("server_functions"), r  # no call failed
        assert r["selection"]["not_selected"] == {"phone-off": "left out by the server functions"}, r  # session show says why
    shown = fed.admin("session.show", {"id": sid, "clients": True})[0]["session"]
    for r in shown["rounds"]:
        trained = {c["client"]: c["data"]["metadata"]["training_metadata"]["settings"] for c in r["clients"] if c["kind"] == "train"}
        assert set(trained) == {"phone-a", "phone-b"}, r["clients"]  # phone-off takes part in no round
        for seen in trained.values():
            assert seen["learning_rate"] == pytest.approx(0.01) and seen["epochs"] == 3  # merged over --settings
        validated = {c["client"] for c in r["clients"] if c["kind"] == "validate"}
        assert validated == {"phone-a", "phone-b"}  # validation rounds ask it too
    log = fed.procs[0].text()
    assert f"server functions [session {sid} round 1]: Client phone-off is charging: False" in log, log
    assert f"server functions [session {sid} round 2]: 2 clients selected based on client attributes, out of 3 clients." in log


def test_edge_example_aggregate_runs_on_the_controller(fed: Federation) -> None:
    _federation(fed)
    sid = _start(fed, EDGE)
    assert fed.admin("session.wait", {"id": sid})[0]["session"]["status"] == "finished"
    assert f"server functions [session {sid} round 1]: Models aggregated" in fed.procs[0].text()


STATEFUL = '''\
from scaleoututil.serverfunctions.allowed_import import List, ServerFunctionsBase, np


class ServerFunctions(ServerFunctionsBase):
    def __init__(self) -> None:
        self.round = 0

    def client_settings(self, global_model: List[np.ndarray]) -> dict:
        self.round += 1
        print(f"settings for call {self.round}")
        return {"learning_rate": float(self.round)}
'''


def test_state_is_kept_across_rounds_and_a_controller_restart(fed: Federation, tmp_path: Path) -> None:
    file = tmp_path / "stateful.py"
    file.write_text(STATEFUL)
    _federation(fed)
    sid = _start(fed, file)
    assert fed.admin("session.wait", {"id": sid})[0]["session"]["status"] == "finished"
    port = int(fed.url.rsplit(":", 1)[1])
    fed.procs[0].stop()
    fed.controller(name="controller-2", port=port)  # the same data dir and address: the class's state comes back with the last round
    fed.wait_clients(len(CLIENTS))
    fed.admin("session.continue", {"id": sid, "rounds": 1})
    session = fed.admin("session.wait", {"id": sid})[0]["session"]
    assert session["status"] == "finished" and len(session["rounds"]) == 3, session
    shown = fed.admin("session.show", {"id": sid, "clients": True})[0]["session"]
    rates = [{c["data"]["metadata"]["training_metadata"]["settings"]["learning_rate"] for c in r["clients"] if c["kind"] == "train"} for r in shown["rounds"]]
    assert rates == [{1.0}, {2.0}, {3.0}], rates  # self.round went on after the restart
    assert f"server functions [session {sid} round 3]: settings for call 3" in fed.procs[-1].text()


def test_session_start_refuses_a_file_that_does_not_load(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(PACKAGE)
    assert fed.conn is not None
    conn = ["--controller", fed.url, "--token", fed.conn.token, "--ca", fed.ca]
    cases = {
        "notes.py": ("just some notes\n", "SyntaxError"),
        "empty.py": ("x = 1\n", "empty.py defines no class named ServerFunctions"),
        "shell.py": ("import os\nclass ServerFunctions: pass\n", r"server functions may not import os; .*\(shell.py:1 in <module>\)"),
    }
    for name, (text, why) in cases.items():
        (tmp_path / name).write_text(text)
        r = scaleout("session", "start", "--server-functions", str(tmp_path / name), *conn)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r
        assert len(r.stderr.strip().splitlines()) == 1 and "server_functions" in r.stderr, r.stderr
        import re

        assert re.search(why, r.stderr), r.stderr
    (tmp_path / "model.bin").write_bytes(b"\xff\xfe\x00binary")
    r = scaleout("session", "start", "--server-functions", str(tmp_path / "model.bin"), *conn)
    assert r.returncode != 0 and "not a Python file" in r.stderr, r.stderr
    assert fed.admin("session.ls")[0]["sessions"] == []  # nothing was started


BROKEN = '''\
from scaleoututil.serverfunctions.allowed_import import List, ServerFunctionsBase, np


class ServerFunctions(ServerFunctionsBase):
    def client_selection(self, client_ids, round_type):
        raise RuntimeError("selection is broken")

    def client_settings(self, global_model: List[np.ndarray]) -> dict:
        while True:
            pass
'''


def test_a_raising_and_a_hanging_method_fall_back_and_the_round_goes_on(fed: Federation, tmp_path: Path) -> None:
    file = tmp_path / "broken.py"
    file.write_text(BROKEN)
    _federation(fed)
    sid = _start(fed, file, "--server-functions-timeout", "1", "--no-validate")
    session = fed.admin("session.wait", {"id": sid})[0]["session"]
    assert session["status"] == "finished", session
    for r in session["rounds"]:
        assert r["status"] == "succeeded" and r["participants"] == CLIENTS, r  # the built-in selection: everyone
        errors = r["server_functions"]["errors"]
        assert [(e["method"], e["where"]) for e in errors] == [("client_selection", "broken.py:6 in client_selection"), ("client_settings", "broken.py")]
        assert errors[0]["error"] == "RuntimeError: selection is broken"
        assert errors[1]["error"].startswith("client_settings did not return within 1 s (--server-functions-timeout)")
    shown = fed.admin("session.show", {"id": sid, "clients": True})[0]["session"]
    seen = [c["data"]["metadata"]["training_metadata"]["settings"] for r in shown["rounds"] for c in r["clients"] if c["kind"] == "train"]
    assert len(seen) == 6 and all(s == {"learning_rate": 0.5, "epochs": 3} for s in seen)  # --settings alone
    assert fed.conn is not None
    r = scaleout("session", "show", sid, "--controller", fed.url, "--token", fed.conn.token, "--ca", fed.ca)
    assert "server functions: client_selection failed at broken.py:6 in client_selection: RuntimeError: selection is broken (built-in used)" in r.stdout, r.stdout
    assert '"server_functions": "broken.py (10 lines)"' in r.stdout
    log = fed.procs[0].text()
    assert f"server functions [session {sid} round 1]: client_selection failed at broken.py:6 in client_selection: RuntimeError: selection is broken" in log


SLOW_LOAD = '''\
from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase


class ServerFunctions(ServerFunctionsBase):
    def __init__(self) -> None:
        print("loading")
        while True:  # until the test lets it go (its file appears)
            try:
                open(GO).close()
                return
            except OSError:
                pass
'''


def test_a_second_start_while_the_first_loads_its_server_functions_is_refused(fed: Federation, tmp_path: Path) -> None:
    import threading

    from scaleout.core.errors import RemoteError

    fed.controller()
    fed.seed_from(PACKAGE)
    with pytest.raises(RemoteError, match="server_functions"):  # a start that fails lets the next one in
        fed.admin("session.start", {"rounds": 1, "server_functions": "x = 1\n"})
    go = tmp_path / "go"
    first: dict[str, object] = {}
    start = threading.Thread(target=lambda: first.update(fed.admin("session.start", {"rounds": 1, "server_functions": SLOW_LOAD.replace("GO", repr(str(go)))})[0]))
    start.start()
    try:
        deadline = time.monotonic() + 30
        while "round 0]: loading" not in fed.procs[0].text():  # the first start is in its load (polling its log, bounded)
            assert time.monotonic() < deadline, fed.procs[0].text()
            time.sleep(0.05)
        with pytest.raises(RemoteError, match="another session is being started") as info:
            fed.admin("session.start", {"rounds": 1})
        assert info.value.code == "conflict", info.value.code
    finally:
        go.touch()
        start.join(60)
    sid = first["session"]["id"]  # type: ignore[index]
    assert [s["id"] for s in fed.admin("session.ls")[0]["sessions"]] == [sid]  # one session, the first
    fed.admin("session.stop", {"id": sid})
