"""A real session: serve, combine and join as processes over TLS on loopback."""

from __future__ import annotations

import json

import numpy as np
from conftest import FIXTURES, QUICKSTART, Federation, scaleout

from scaleout.core import payload


def test_quickstart_session_downloaded_package_improves(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    fed.activate(QUICKSTART)
    fed.combiner("c1")
    for i in range(3):
        fed.client(f"client-{i}")
    fed.wait_clients(3)
    session = fed.run_session(rounds=3, min_clients=3)
    assert session["status"] == "finished", session
    rounds = session["rounds"]
    assert [r["status"] for r in rounds] == ["succeeded"] * 3
    assert all(r["participants"] == ["client-0", "client-1", "client-2"] for r in rounds)
    acc = [r["validation"]["validation_accuracy"] for r in rounds]
    # The seed guesses among 3 classes (about 1/3); every round must do better than the last.
    assert acc[0] > 0.5 and acc[0] < acc[1] < acc[2] and acc[2] > 0.8, acc
    # The trail: each round's model names its parent, session and contributors.
    models = fed.admin("model.ls")[0]["models"]
    assert [m["id"] for m in models] == [seed] + [r["model_id"] for r in rounds]
    assert [m["parent"] for m in models[1:]] == [seed] + [r["model_id"] for r in rounds[:-1]]
    assert all(m["contributors"] == ["client-0", "client-1", "client-2"] for m in models[1:])
    # Per-client results are kept: each round has every client's train report and validation.
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    for r in shown["rounds"]:
        kinds = sorted((c["kind"], c["client"]) for c in r["clients"] if not c["error"])
        assert kinds == sorted((k, f"client-{i}") for k in ("train", "validate") for i in range(3))
        train = [c for c in r["clients"] if c["kind"] == "train"]
        assert all(c["data"]["metadata"]["training_metadata"]["num_examples"] > 0 for c in train)
    out = scaleout("status", "--json", "--data-dir", str(fed.data))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["active_model"] == rounds[-1]["model_id"] and status["clients"] == 3 and status["session"] is None


def test_mixed_dtypes_two_combiners_local_package(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(FIXTURES / "mixed_client")
    fed.combiner("c1")
    fed.combiner("c2")
    for i in range(4):
        fed.client(f"m{i}", package=FIXTURES / "mixed_client")
    fed.wait_clients(4)
    combiners = fed.admin("combiner.ls")[0]["combiners"]
    assert sorted(c["clients"] for c in combiners) == [2, 2]  # least loaded assignment
    session = fed.run_session(rounds=3, min_clients=4)
    assert session["status"] == "finished", session
    mse = [r["validation"]["mse"] for r in session["rounds"]]
    assert mse[2] < mse[0], mse
    _, seed_bytes = fed.admin("model.get", {"id": seed})
    _, final = fed.admin("model.get", {"id": session["end_model"]})
    assert seed_bytes is not None and final is not None
    before, after = payload.decode(seed_bytes), payload.decode(final)
    assert isinstance(after, list) and len(after) == len(before) == 12
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert not all(np.array_equal(a, b) for a, b in zip(before, after))
