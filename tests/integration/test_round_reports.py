"""A round brings the controller a few messages per combiner, not one per client (issue 17 #4):
each combiner tells its clients' outcomes in one Reports message as its share ends, and the
controller still records and shows every client's outcome."""

from __future__ import annotations

import json
import re
from urllib.request import urlopen

from conftest import Federation, Proc

from scaleout.commands.simulate import seed_model

CLIENTS = 8


def _messages(metrics_url: str) -> dict[str, float]:
    with urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in re.findall(r'^scaleout_combiner_messages_total\{type="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def test_one_reports_message_per_combiner_per_round(fed: Federation) -> None:
    fed.controller("--metrics-port", "0", "--max-enrol-rate", "0")
    metrics = json.loads((fed.data / "controller.json").read_text())["metrics_url"]
    fed.admin("model.set_seed", {}, seed_model(1000))
    fed.combiner("c1")
    fed.combiner("c2")
    args = ["simulate-clients", "--controller", fed.url, "--ca", fed.ca, "--token", fed.token("client"), "--count", str(CLIENTS)]
    fed.procs.append(Proc("sims", args, fed.logs, False))
    fed.wait_clients(CLIENTS)
    spread = {c["name"]: c["clients"] for c in fed.admin("combiner.ls")[0]["combiners"]}
    assert sum(spread.values()) == CLIENTS and all(spread.values()), spread  # both combiners have clients

    session = fed.run_session(rounds=2, min_clients=CLIENTS, validate=True)
    assert session["status"] == "finished", session
    counted = _messages(metrics)
    # Per combiner and round: one Reports message for training, one for validation; no per-client Report.
    assert counted.get("reports") == 2 * 2 * 2, counted
    assert counted.get("report", 0) == 0, counted
    assert counted.get("round.partial") == 2 * 2 and counted.get("round.validated") == 2 * 2, counted

    # Every client's outcome is still recorded, and shown per client.
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    names = {f"sim-{i:05d}" for i in range(1, CLIENTS + 1)}
    for r in shown["rounds"]:
        train = [x for x in r["clients"] if x["kind"] == "train"]
        validate = [x for x in r["clients"] if x["kind"] == "validate"]
        assert {x["client"] for x in train} == names and not any(x["error"] for x in train), r
        assert {x["client"] for x in validate} == names, r
        assert r["validation"], r  # the mean of the clients' validations
