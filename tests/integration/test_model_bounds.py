"""One client cannot decide the global model (issue 20 #5).

A client claiming 2**53 - 1 examples with every weight at 1000.0, or sending 3e38 (finite
in float32, one step from inf), is refused by name; the honest clients' rounds succeed and
the model stays sane. With the norm bound off, the headroom check still refuses 3e38, and
the weight cap (``max_examples_per_client``) keeps a liar's say to the cap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from conftest import FIXTURES, Federation

from scaleout.core import payload

GREEDY = FIXTURES / "greedy_client"


def refusals(fed: Federation, session_id: str, index: int) -> dict[str, str | None]:
    shown = fed.admin("session.show", {"id": session_id, "clients": True})[0]["session"]
    return {r["client"]: r["error"] for r in shown["rounds"][index]["clients"]}


def model(fed: Federation, model_id: str) -> np.ndarray:
    _, data = fed.admin("model.get", {"id": model_id})
    assert data is not None
    (array,) = payload.read(data)[0].values()
    return array


def test_a_greedy_client_is_refused_and_the_honest_rounds_succeed(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(GREEDY)  # zeros(4), float32
    fed.combiner("c1")
    for name in ("h0", "h1", "liar", "overflow"):
        fed.client(name, package=GREEDY)
    fed.wait_clients(4)
    attackers: dict[str, Any] = {"liar": {"fill": 1000.0, "num_examples": 2**53 - 1}, "overflow": {"fill": 3e38}}
    session = fed.run_session(rounds=2, min_clients=2, validate=False, settings={"attackers": attackers})
    assert session["status"] == "finished", session
    for index, rnd in enumerate(session["rounds"]):
        assert rnd["status"] == "succeeded", rnd
        errors = refusals(fed, session["id"], index)
        assert errors["h0"] is None and errors["h1"] is None, errors
        assert errors["liar"] and "its change to the model has norm 2000, more than the bound 20 (max_update_norm)" in errors["liar"], errors
        assert errors["overflow"] and "holds 3e+38, beyond 2.127e+37: too close to the largest float32" in errors["overflow"], errors
    np.testing.assert_allclose(model(fed, session["end_model"]), np.full(4, 0.2), rtol=1e-6)

    # The norm bound off: 3e38 is still refused, and the weight cap keeps a liar shifting by 1.0 with 2**53 - 1 examples to 10 examples' say.
    attackers = {"liar": {"shift": 1.0, "num_examples": 2**53 - 1}, "overflow": {"fill": 3e38}}
    again = fed.run_session(
        rounds=1, min_clients=3, validate=False, settings={"attackers": attackers}, max_update_norm="off", max_examples_per_client=10
    )
    assert again["status"] == "finished", again
    errors = refusals(fed, again["id"], 0)
    assert errors["h0"] is None and errors["h1"] is None and errors["liar"] is None, errors
    assert errors["overflow"] and "too close to the largest float32" in errors["overflow"], errors
    # (0.1 + 0.1 + 1.0) / 3 on top of 0.2; uncapped, the liar alone would have made it 1.2.
    np.testing.assert_allclose(model(fed, again["end_model"]), np.full(4, 0.6), rtol=1e-5)
    for model_id in (row["id"] for row in fed.admin("model.ls")[0]["models"]):
        assert np.abs(model(fed, model_id)).max() < 1.0


def test_an_update_of_an_impossible_shape_is_refused_by_name(fed: Federation) -> None:
    # Issue 19 #18: a tensor of shape [0, 2**62, 2**62] made numpy fail ("array is too big")
    # and killed the pull; now it is refused like any malformed update, and the round goes on.
    fed.controller()
    fed.seed_from(GREEDY)
    fed.combiner("c1")
    for name in ("h0", "odd"):
        fed.client(name, package=GREEDY)
    fed.wait_clients(2)
    session = fed.run_session(rounds=1, min_clients=1, validate=False, settings={"attackers": {"odd": {"shape": [0, 2**62, 2**62]}}})
    assert session["status"] == "finished", session
    assert session["rounds"][0]["participants"] == ["h0"], session
    errors = refusals(fed, session["id"], 0)
    assert errors["odd"] and "tensor '0'" in errors["odd"] and "is not plausible" in errors["odd"], errors
