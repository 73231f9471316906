"""A round that times out for a client frees that client for the next round."""

from __future__ import annotations

from conftest import FIXTURES, QUICKSTART, Federation


def test_client_late_at_the_timeout_is_aborted_and_free_for_the_next_round(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("good", package=QUICKSTART)
    slow = fed.client("slow", package=FIXTURES / "slow_client")
    fed.wait_clients(2)
    # slow trains for 20 s; the round gives up on it after 3 s and goes on with "good".
    first = fed.run_session(rounds=1, min_clients=1, round_timeout=3, validate=False, settings={"slow_s": 20})
    (r1,) = first["rounds"]
    assert r1["status"] == "succeeded" and r1["participants"] == ["good"], r1
    # Without the abort, slow would still be busy for ~17 s and miss this 10 s round.
    second = fed.run_session(rounds=1, min_clients=2, round_timeout=10, validate=False)
    (r2,) = second["rounds"]
    assert r2["status"] == "succeeded" and r2["participants"] == ["good", "slow"], r2
    assert "no longer waits for task" in slow.text()
