"""Issue 15's Done-when: `scaleout session start --aggregator X` runs a round for every
aggregator there is on 6 clients over 2 combiners (bulyan with an f that 6 clients allow,
the others with their default settings), and `--clients-per-round 2` gives 2 participants
in each round. One federation for all, one round each, through the CLI as a user types it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import FIXTURES, Federation, federation, scaleout

from scaleout.core.aggregators import STRATEGIES

PACKAGE = FIXTURES / "shift_client"
CLIENTS = [f"s{i}" for i in range(6)]  # shift_client shifts by the number in its name
SETTINGS = {"bulyan": {"f": 0}, "krum": {"f": 1}, "multikrum": {"f": 1, "m": 3}}  # 6 >= 4f + 3 for Bulyan; 6 > 2f + 2 for Krum


@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with federation(tmp_path_factory.mktemp("every")) as fed:
        fed.controller()
        fed.seed_from(PACKAGE)
        fed.combiner("c0")
        fed.combiner("c1")
        for name in CLIENTS:
            fed.client(name, package=PACKAGE)
        fed.wait_clients(len(CLIENTS))
        yield fed


def start(fed: Federation, *args: str) -> dict[str, Any]:
    """The session ``session start ARGS --wait`` ran, as ``session show --json`` prints it."""
    r = scaleout("session", "start", "--round-timeout", "30", "--no-validate", "--min-clients", "1", *args, "--wait",
                 "--data-dir", str(fed.data), timeout=120)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    shown = scaleout("session", "show", "--json", "--data-dir", str(fed.data))
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_round_of_each_aggregator_on_six_clients_over_two_combiners(six: Federation, name: str) -> None:
    kwargs = ["--aggregator-kwargs", json.dumps(SETTINGS[name])] if name in SETTINGS else []
    session = start(six, "--rounds", "1", "--aggregator", name, *kwargs)
    assert session["config"]["aggregator"] == name and session["status"] == "finished", session
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and sorted(rnd["participants"]) == CLIENTS, rnd


def test_two_clients_per_round(six: Federation) -> None:
    session = start(six, "--rounds", "2", "--clients-per-round", "2")
    assert session["status"] == "finished" and [len(r["participants"]) for r in session["rounds"]] == [2, 2], session


def test_edges_fedopt_name_runs_the_optimiser_its_serveropt_names(six: Federation) -> None:
    session = start(six, "--rounds", "1", "--aggregator", "fedopt", "--aggregator-kwargs", '{"serveropt": "yogi", "learning_rate": 0.01}')
    assert session["status"] == "finished" and session["config"]["aggregator"] == "fedyogi", session
    assert session["config"]["aggregator_kwargs"] == {"learning_rate": 0.01}
