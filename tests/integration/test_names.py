"""One name, one node: the newest connection under a name wins and the older one stops."""

from __future__ import annotations

from conftest import QUICKSTART, Federation


def test_second_client_with_the_same_name_takes_over(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    first = fed.client("twin", package=QUICKSTART)
    fed.wait_clients(1)
    second = fed.client("twin", package=QUICKSTART)
    # The older one is told why and stops with a failure code instead of fighting back.
    assert first.popen.wait(30) == 1
    assert "another client connected as twin" in first.text()
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, min_clients=1)
    assert session["status"] == "finished" and session["rounds"][0]["participants"] == ["twin"]
    assert second.popen.poll() is None


def test_second_combiner_with_the_same_name_takes_over(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    first = fed.combiner("c1")
    second = fed.combiner("c1")
    assert first.popen.wait(30) == 1
    assert "another combiner registered as 'c1'" in first.text()
    fed.client("a", package=QUICKSTART)
    fed.wait_clients(1)
    combiners = fed.admin("combiner.ls")[0]["combiners"]
    assert [(c["name"], c["status"]) for c in combiners] == [("c1", "online")]
    assert fed.run_session(rounds=1, min_clients=1)["status"] == "finished"
    assert second.popen.poll() is None
