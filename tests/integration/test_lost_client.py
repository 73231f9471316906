"""Rounds and their records: a client killed mid-round, and a round in which nobody trained."""

from __future__ import annotations

import json
import signal
import time

from conftest import FIXTURES, QUICKSTART, Federation, scaleout, wait_stdout
from test_observe import scrape, value


def wait_metric(fed: Federation, session_id: str, client: str, timeout: float = 10) -> None:
    """Until the controller holds a metric ``client`` logged in this session."""
    deadline = time.monotonic() + timeout
    while True:  # polls a state the controller reaches by itself, no sleep-as-synchronisation
        if fed.admin("metric.ls", {"session_id": session_id, "client": client})[0]["total"]:
            return
        assert time.monotonic() < deadline, f"no metric from {client} within {timeout}s"
        time.sleep(0.05)


def test_client_killed_mid_round_is_named_in_the_round_and_counted(fed: Federation) -> None:
    fed.controller("--metrics-port", "0")
    url = json.loads((fed.data / "controller.json").read_text())["metrics_url"]
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("good", package=QUICKSTART)
    slow = fed.client("slow", package=FIXTURES / "slow_client")
    fed.wait_clients(2)
    # slow logs a metric (as a client reporting progress does), then trains for 20 s.
    config = {"rounds": 1, "min_clients": 1, "round_timeout": 5, "validate": False, "settings": {"slow_s": 20, "metric_first": True}}
    session = fed.admin("session.start", config)[0]["session"]
    wait_stdout(slow, "slow_client: training")
    wait_metric(fed, session["id"], "slow")
    slow.popen.send_signal(signal.SIGKILL)  # kill -9: no goodbye; the combiner waits for it to come back
    slow.popen.wait(10)
    done = fed.admin("session.wait", {"id": session["id"]})[0]["session"]
    (r1,) = done["rounds"]
    assert r1["status"] == "succeeded" and r1["participants"] == ["good"], r1
    r = scaleout("session", "show", session["id"], "--clients", "--json", "--data-dir", str(fed.data))
    assert r.returncode == 0, r.stderr
    (shown,) = json.loads(r.stdout)["rounds"]
    train = {c["client"]: c for c in shown["clients"] if c["kind"] == "train"}
    assert sorted(train) == ["good", "slow"], shown["clients"]
    assert train["good"]["error"] is None
    assert "disconnected" in train["slow"]["error"], train["slow"]
    r = scaleout("session", "show", session["id"], "--clients", "--data-dir", str(fed.data))
    assert r.returncode == 0 and "slow" in r.stdout and "disconnected" in r.stdout, r.stdout
    samples = scrape(url)
    assert value(samples, "scaleout_updates_refused_total", reason="disconnected") == 1


def test_round_short_of_clients_records_its_start_and_no_participants(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("only", package=QUICKSTART)
    fed.wait_clients(1)
    # The round waits its timeout (2 s) for 3 clients, then fails: nobody trained.
    session = fed.run_session(rounds=1, min_clients=3, round_timeout=2, validate=False)
    (r1,) = session["rounds"]
    assert r1["status"] == "failed" and "at least 3 needed" in r1["reason"], r1
    assert r1["participants"] == [], r1
    assert r1["duration_s"] >= 2 and r1["finished"] - r1["started"] >= 2, r1
    assert abs((r1["finished"] - r1["started"]) - r1["duration_s"]) < 0.5, r1
    # The CLI says the same, in its JSON and text forms.
    data = ("--data-dir", str(fed.data))
    r = scaleout("session", "show", session["id"], "--json", *data)
    assert r.returncode == 0, r.stderr
    (shown,) = json.loads(r.stdout)["rounds"]
    assert shown["started"] < shown["finished"] and shown["participants"] == [], shown
    r = scaleout("session", "show", session["id"], *data)
    assert r.returncode == 0 and "round 1  failed  0 participants  " in r.stdout, r.stdout
