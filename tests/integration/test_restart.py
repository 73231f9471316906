"""A controller restart loses nothing committed, and its combiners find it again."""

from __future__ import annotations

from conftest import QUICKSTART, Federation, scaleout


def test_controller_restart_keeps_trail_and_combiner_reconnects(fed: Federation) -> None:
    first = fed.controller()
    seed = fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("client-0", package=QUICKSTART)
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, min_clients=1)
    assert session["status"] == "finished", session
    trail = [m["id"] for m in fed.admin("model.ls")[0]["models"]]
    assert trail[0] == seed and len(trail) == 2

    port = int(fed.url.rsplit(":", 1)[1])
    assert first.stop() == 0
    fed.controller(name="controller-2", port=port)  # same data dir, same address
    assert [m["id"] for m in fed.admin("model.ls")[0]["models"]] == trail
    assert fed.admin("status")[0]["active_model"] == trail[-1]

    fed.wait_clients(1)  # the combiner re-registered and reported its client
    session = fed.run_session(rounds=1, min_clients=1)
    assert session["status"] == "finished", session
    assert session["rounds"][0]["participants"] == ["client-0"]
    models = fed.admin("model.ls")[0]["models"]
    assert models[-1]["parent"] == trail[-1]
    assert "reconnected to the controller" in fed.procs[1].text()


def test_second_controller_on_the_same_data_dir_is_refused(fed: Federation) -> None:
    fed.controller()
    r = scaleout("serve", "--data-dir", str(fed.data), "--port", "0", timeout=30)
    assert r.returncode == 2, r
    assert "in use by another running controller" in r.stderr and "Traceback" not in r.stderr
    assert fed.admin("status")[0]["url"] == fed.url  # the first one is undisturbed
