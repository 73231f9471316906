"""Small inconsistencies a new user met (issue 19 #15) and LAST SEEN as the last activity
(#11), against one shared federation where they can be."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, START_TIMEOUT, Federation, Proc, federation, scaleout

PACKAGE = FIXTURES / "gate_client"


@pytest.fixture(autouse=True)
def _no_ambient_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SCALEOUT_CONTROLLER", "SCALEOUT_TOKEN", "SCALEOUT_CA"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A controller, one combiner and one client that logs no attributes, one round run."""
    tmp = tmp_path_factory.mktemp("small")
    with pytest.MonkeyPatch.context() as mp, federation(tmp) as f:
        mp.setenv("XDG_STATE_HOME", str(tmp / "xdg-state"))
        f.controller()
        f.seed_from(PACKAGE)
        f.activate(PACKAGE)
        f.combiner("c1")
        f.client("g1", package=PACKAGE)
        f.wait_clients(1)
        yield f


def cli(fed: Federation, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return scaleout(*args, "--data-dir", str(fed.data), timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == code and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_last_seen_is_the_last_activity(fed: Federation) -> None:
    (before,) = json.loads(cli(fed, "client", "ls", "--json").stdout)
    assert before["attributes"] == {}  # none logged: {} as client show gives, not null
    session = fed.run_session(rounds=1, min_clients=1, validate=False)
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded", rnd
    (after,) = json.loads(cli(fed, "client", "ls", "--json").stdout)
    # LAST SEEN moved from the connect time to the client's result in the round.
    seen, connected = (dt.datetime.fromisoformat(x["last_seen"]).timestamp() for x in (after, before))
    assert connected < rnd["started"] <= seen <= time.time() + 1, (rnd, before, after)


def test_limits_and_empty_listings(fed: Federation) -> None:
    r = cli(fed, "audit", "ls", "--limit", "0", "--json")  # 0 means all, as for metric ls
    assert r.returncode == 0 and len(json.loads(r.stdout)) >= 3, r.stderr
    one_line_error(cli(fed, "audit", "ls", "--limit", "-1"), 2, "0 (all)")
    r = cli(fed, "metric", "ls", "--telemetry")
    assert r.returncode == 0 and "no telemetry logged yet" in r.stdout and "metric" not in r.stdout, r.stdout
    r = cli(fed, "telemetry", "ls", "--client", "nobody")
    assert r.returncode == 0 and r.stdout.strip() == "no telemetry matches", r.stdout


def test_audit_details_read_well(fed: Federation) -> None:
    fed.admin("token.create", {"role": "client", "ttl_s": 600})  # no name, no uses
    r = cli(fed, "audit", "ls")
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if "token.create" in x][-1:]
    assert "None" not in line and "name=" not in line and "uses=" not in line, line
    assert not re.search(r"exp=\d{9,}", line) and re.search(r"exp=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line), line


def test_token_prefixes(fed: Federation) -> None:
    fed.admin("token.create", {"role": "client", "ttl_s": 600})
    fed.admin("token.create", {"role": "client", "ttl_s": 600})
    one_line_error(cli(fed, "token", "revoke", "t-"), 1, "ambiguous")
    one_line_error(cli(fed, "token", "revoke", "nosuchtoken"), 1, "no token")


def test_session_wording_and_rounds_done(fed: Federation) -> None:
    r = cli(fed, "session", "start", "--rounds", "1", "--round-timeout", "30", "--no-validate", "--wait")
    assert r.returncode == 0 and "(1 round)" in r.stdout, r.stdout + r.stderr
    sid = fed.admin("session.start", {"rounds": 10, "round_timeout": 30, "min_clients": 5, "validate": False})[0]["session"]["id"]
    fed.admin("session.stop", {"id": sid})
    r = cli(fed, "session", "ls")
    (row,) = [x for x in r.stdout.splitlines() if x.startswith(sid)]
    assert " 1/10 " in row and "stopped" in row, row


def test_connection_mistakes(fed: Federation, tmp_path: Path) -> None:
    assert fed.conn is not None
    admin = fed.conn.token
    # A token without --ca: say --ca is missing (not "is --ca the right CA file?").
    line = one_line_error(scaleout("model", "ls", "--controller", fed.url, "--token", admin), 3, "--ca is missing")
    assert "right CA file" not in line
    # Neither kind of malformed token ever leaves: both are the user's typo, exit 2.
    one_line_error(scaleout("model", "ls", "--controller", fed.url, "--token", "sco1.garbage", "--ca", fed.ca), 2, "malformed")
    one_line_error(scaleout("model", "ls", "--token", "sco1.garbage"), 2, "malformed")
    one_line_error(scaleout("join", "SCALEOUT-1.abc", "--work-dir", str(tmp_path / "w")), 2, "malformed")
    one_line_error(scaleout("join", "--controller", fed.url, "--token", admin, "--ca", fed.ca, "-p", str(tmp_path / "nonexistent")), 2, "no such folder")


def test_a_missing_package_is_said_once(fed: Federation, tmp_path: Path) -> None:
    """A fresh controller with no active package: the joining client says so once, however often it retries."""
    with federation(tmp_path) as f:
        f.controller()
        f.combiner("c1")
        client = f.client("waiting")
        deadline = time.monotonic() + START_TIMEOUT
        while client.text().count("retrying in") < 3:  # polls the log for the third retry (a condition, with a deadline)
            assert time.monotonic() < deadline, client.text()
            time.sleep(0.1)
        log = client.text()
        said = [x for x in log.splitlines() if "WARNING" in x and "no compute package is active yet" in x]
        assert len(said) == 1, log
        assert "'active'" not in log and "no combiner 'online'" not in log, log


def test_removed_nodes(fed: Federation) -> None:
    r = cli(fed, "client", "rm", "g1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["closed"] == 1, r.stdout + r.stderr  # its combiner closed its link
    r = cli(fed, "combiner", "rm", "c1")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + START_TIMEOUT
    while json.loads(cli(fed, "combiner", "ls", "--json").stdout):  # leaves the listing within seconds
        assert time.monotonic() < deadline
    r = cli(fed, "combiner", "ls")
    assert "have connected yet" not in r.stdout and r.stdout.startswith("no combiners"), r.stdout


def test_a_wildcard_bind_prints_addresses_to_dial(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    p = Proc("wild", ["serve", "--data-dir", str(tmp_path / "ctl"), "--host", "0.0.0.0", "--port", "0"], logs, True)
    try:
        assert p.url is not None and p.url.startswith("wss://0.0.0.0:")  # the ready line stays as it was
        assert p.popen.stdout is not None
        line = p.popen.stdout.readline().decode()
        port = p.url.rsplit(":", 1)[1]
        assert line.startswith("dial it at ") and f"wss://127.0.0.1:{port}" in line and "0.0.0.0" not in line, line
    finally:
        p.stop()


def test_help_and_readme_synopsis() -> None:
    r = scaleout("--help", timeout=20)
    (line,) = [x for x in r.stdout.splitlines() if x.strip().startswith("token ")]
    assert "list" in line and "revoke" in line, line
    sys.path.insert(0, str(ROOT / "src"))
    from scaleout.cli import build_parser

    dev = build_parser()._subparsers._group_actions[0].choices["dev"]  # type: ignore[union-attr]
    flags = {s for a in dev._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    readme = (ROOT / "README.md").read_text()
    synopsis = readme[readme.index("scaleout dev -p DIR"): readme.index("scaleout simulate --clients")]
    missing = sorted(f for f in flags if f not in synopsis and f.removeprefix("--") not in ("log-level", "config", "path", "no-validate"))
    assert not missing, missing
    # The --keep example waits for a line only --headless prints.
    example = next(x for x in readme.splitlines() if x.startswith("scaleout dev ") and "--keep" in x)
    assert "--headless" in example, example


def test_telemetry_listing_counts_what_matches(tmp_path: Path) -> None:
    from scaleout.store.commands import CommandStore
    from scaleout.store.state import State

    path = tmp_path / "state.db"
    store = CommandStore(path)
    State(path).upsert_client("a", "online", combiner="c1")
    rows = [("a", None, json.dumps({"key": k, "payload": {"value": i}}), float(i)) for i, k in enumerate(["t", "u", "t", "t"])]
    assert store.client_info({}, {}, rows) == set()
    latest, total = store.telemetry_page("a", "t", 2)  # what `telemetry ls` turns into "(the latest 2 of 3 records ...)"
    assert [r["payload"]["value"] for r in latest] == [2, 3] and total == 3
    store.close()
