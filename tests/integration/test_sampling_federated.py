"""Client sampling and FedProx's mu over real processes: `--clients-per-round 2` gives 2
participants in each round of 4 clients, drawn from the seed recorded on the session and
the round index (what a restarted controller draws again), `--clients` a fixed set with
unknown names refused, `session show` says who was left out and why, and fedprox's mu
reaches every selected client's train settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, Federation, federation, scaleout

from scaleout.core.selection import sample_clients

PACKAGE = FIXTURES / "shift_client"
CLIENTS = [f"s{i}" for i in range(4)]


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A controller, 2 combiners and 4 clients, shared by the tests of this module."""
    with federation(tmp_path_factory.mktemp("sampling")) as fed:
        fed.controller()
        fed.seed_from(PACKAGE)
        fed.combiner("c0")
        fed.combiner("c1")
        for name in CLIENTS:
            fed.client(name, package=PACKAGE)
        fed.wait_clients(len(CLIENTS))
        yield fed


def cli(fed: Federation, *args: str) -> Any:
    r = scaleout(*args, "--data-dir", str(fed.data), timeout=90)
    assert r.returncode == 0, r.stderr
    return r


def members(fed: Federation) -> dict[str, list[str]]:
    rows = fed.admin("client.ls")[0]["clients"]
    out: dict[str, list[str]] = {}
    for row in rows:
        if row["status"] == "online":
            out.setdefault(row["combiner"], []).append(row["name"])
    return out


def test_two_per_round_of_four_reproducibly_from_the_recorded_seed(four: Federation) -> None:
    r = cli(four, "session", "start", "--rounds", "3", "--round-timeout", "30", "--no-validate", "--clients-per-round", "2", "--seed", "11", "--wait")
    assert "2 of the connected clients a round, seed 11" in r.stdout, r.stdout
    session = json.loads(cli(four, "session", "show", "--json").stdout)
    assert session["status"] == "finished" and session["config"]["seed"] == 11 and session["config"]["clients_per_round"] == 2
    connected = members(four)
    for rnd in session["rounds"]:
        sel = rnd["selection"]
        assert len(rnd["participants"]) == 2 and sorted(rnd["participants"]) == sel["selected"], rnd
        assert sel["not_selected"] == {c: "not sampled" for c in CLIENTS if c not in sel["selected"]}
        # The draw follows from the seed and the round index alone: a restarted controller draws it again.
        want, _ = sample_clients(connected, rnd["index"], 11, 2, None)
        assert sel["selected"] == sorted(c for cs in want.values() for c in cs)
    shown = cli(four, "session", "show").stdout
    assert "selected (2): " in shown and "not sampled (2): " in shown, shown


def test_a_fraction_and_a_fresh_seed_recorded(four: Federation) -> None:
    session = four.run_session(rounds=1, validate=False, clients_per_round=0.5)
    assert session["status"] == "finished", session
    seed = session["config"]["seed"]
    assert isinstance(seed, int)  # drawn by the controller and recorded: the session can be replayed
    (rnd,) = session["rounds"]
    assert len(rnd["participants"]) == 2
    want, _ = sample_clients(members(four), 1, seed, 0.5, None)
    assert rnd["selection"]["selected"] == sorted(c for cs in want.values() for c in cs)


def test_a_fixed_set_and_unknown_names_refused(four: Federation) -> None:
    r = scaleout("session", "start", "--clients", "s1,zed,s3", "--data-dir", str(four.data))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "unknown client zed" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    session = four.run_session(rounds=2, validate=False, clients=["s1", "s3"])
    assert session["status"] == "finished", session
    for rnd in session["rounds"]:
        assert sorted(rnd["participants"]) == ["s1", "s3"]
        assert rnd["selection"]["not_selected"] == {"s0": "not in --clients", "s2": "not in --clients"}


def test_fedprox_mu_reaches_every_train_settings(four: Federation) -> None:
    session = four.run_session(rounds=1, validate=False, aggregator="fedprox", aggregator_kwargs={"mu": 0.25}, settings={"mu": 9, "epochs": 3})
    assert session["status"] == "finished", session
    shown = four.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    trains = [c for c in shown["rounds"][0]["clients"] if c["kind"] == "train"]
    assert sorted(c["client"] for c in trains) == CLIENTS
    for c in trains:  # the aggregator's mu over --settings; the other settings stay
        assert c["data"]["metadata"]["seen_settings"] == {"mu": 0.25, "epochs": 3}, c
    plain = four.run_session(rounds=1, validate=False, settings={"epochs": 3})
    shown = four.admin("session.show", {"id": plain["id"], "clients": True})[0]["session"]
    assert all(c["data"]["metadata"]["seen_settings"] == {"epochs": 3} for c in shown["rounds"][0]["clients"] if c["kind"] == "train")


def test_a_restarted_controller_draws_the_same_clients_for_the_round_it_retries(tmp_path: Path) -> None:
    import signal

    from conftest import wait_stdout

    recover = FIXTURES / "recover_client"
    names = [f"r{i}" for i in range(4)]
    with federation(tmp_path) as fed:
        first = fed.controller()
        fed.seed_from(recover)
        fed.combiner("c1")
        clients = dict(zip(names, (fed.client(n, package=recover) for n in names), strict=True))
        fed.wait_clients(4)
        gate = tmp_path / "gate"
        drawn, _ = sample_clients({"c1": names}, 1, 5, 2, None)
        (chosen,) = drawn.values()
        config = {"rounds": 2, "round_timeout": 30, "validate": False, "clients_per_round": 2, "seed": 5, "settings": {"gate": str(gate)}}
        session = fed.admin("session.start", config)[0]["session"]
        wait_stdout(clients[chosen[0]], "recover_client: held")  # round 1 is in flight, its draw recorded
        before = fed.admin("session.show", {"id": session["id"]})[0]["session"]["rounds"][0]["selection"]
        assert before["selected"] == chosen
        port = int(fed.url.rsplit(":", 1)[1])
        first.popen.send_signal(signal.SIGKILL)
        assert first.popen.wait(10) == -signal.SIGKILL
        gate.touch()
        fed.controller(name="controller-2", port=port)
        done = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
        assert done["status"] == "finished", done
        retried = done["rounds"][0]
        assert retried["attempt"] == 2 and retried["selection"] == before, retried
        assert sorted(retried["participants"]) == chosen
