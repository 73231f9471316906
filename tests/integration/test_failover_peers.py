"""Nodes learn of controllers started after they enrolled (issue 18): the active controller
tells combiners (and, through them, clients) every controller on its store, so a combiner and
a client given only the first one's address follow a standby started later when it takes over,
and a client restarted during the outage still knows it."""

from __future__ import annotations

import json
import signal

from conftest import Federation, Proc
from test_failover import RECOVER, fast_lease, keygen, serve, url_of, wait_active, wait_stdout_log  # noqa: F401 (fast_lease: autouse)

from scaleout.commands.connection import Connection


def test_nodes_given_only_the_first_controller_follow_a_standby_started_later(fed: Federation, pg_url: str) -> None:
    key = keygen(fed.tmp / "store.key")
    a = serve(fed, "ctl-a", pg_url, key)
    a_url = url_of(fed, "ctl-a")
    fed.data = fed.tmp / "ctl-a"  # its CA (the same as ctl-b's) and admin token
    token = (fed.data / "admin.token").read_text().strip()
    fed.conn = Connection(a_url, token, fed.data / "ca.pem", False)
    seed = fed.seed_from(RECOVER)
    combiner = fed.combiner("c1")  # given A's address alone (fed.url)
    client = fed.client("r1", package=RECOVER)
    fed.wait_clients(1)

    serve(fed, "ctl-b", pg_url, key)  # a standby, started after both nodes
    b_url = url_of(fed, "ctl-b")
    wait_stdout_log(combiner, f"learned controller {b_url}")  # pushed by A once it sees B on the store
    wait_stdout_log(client, f"learned controller {b_url}")  # passed on by the combiner
    kept = json.loads(next((fed.tmp / "r1" / "identities").glob("*-client-r1.controllers")).read_text())
    assert kept == [b_url], kept  # beside the client's identity: the ones given are not repeated there

    a.popen.send_signal(signal.SIGKILL)
    assert a.popen.wait(10) == -signal.SIGKILL
    wait_active(fed, "ctl-b")
    wait_stdout_log(combiner, f"reconnected to the controller at {b_url}")

    # A client restarted during the outage, still given A's address alone, finds B by what it kept.
    assert client.stop() == 0
    restarted = Proc("r1-again", ["join", "--controller", a_url, "--token", fed.token("client"), "--ca", fed.ca, "--name", "r1", "--work-dir", str(fed.tmp / "r1"), "-p", str(RECOVER)], fed.logs, False)
    fed.procs.append(restarted)
    fed.conn = Connection(b_url, token, fed.data / "ca.pem", False)
    fed.wait_clients(1)
    assert "also dialling the controller(s) learned before" in restarted.text()

    done = fed.run_session(rounds=1, min_clients=1, validate=False, round_timeout=20)
    assert done["status"] == "finished", done
    assert [(r["idx"], r["status"], r["parent"]) for r in done["rounds"]] == [(1, "succeeded", seed)], done["rounds"]
    assert [(c["name"], c["status"]) for c in fed.admin("combiner.ls")[0]["combiners"]] == [("c1", "online")]
