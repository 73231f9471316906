"""No round commits a model its dtype cannot hold (issue 5, item 1).

An update finite in its own dtype but not in the model's (float64 1e300 for a float32
model) is refused like any bad update; an aggregate that is not finite in the model's
dtype fails its round with the reason, and the global model stays.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from conftest import FIXTURES, Federation

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.core.aggregators import Partial, encode_partial
from scaleout.security.tls import client_context
from scaleout.transport.link import Incoming
from scaleout.transport.net import connect

EXTREME = FIXTURES / "extreme_client"
WAIT = 30.0


def models_are_finite(fed: Federation) -> list[str]:
    """Every model in `scaleout model ls`, each checked to hold finite values only."""
    ids = [row["id"] for row in fed.admin("model.ls")[0]["models"]]
    for model_id in ids:
        _, data = fed.admin("model.get", {"id": model_id})
        assert data is not None
        for name, array in payload.read(data)[0].items():
            assert np.isfinite(array).all(), f"model {model_id[:12]} tensor {name!r} is not finite"
    return ids


def test_float64_updates_beyond_float32_commit_no_model(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(EXTREME)  # one float32 vector
    fed.combiner("c1")
    for name in ("big-0", "big-1"):
        fed.client(name, package=EXTREME)
    fed.wait_clients(2)
    session = fed.run_session(rounds=2, min_clients=1, validate=False, settings={"extreme_fill": 1e300})
    assert session["status"] == "failed", session
    assert session["rounds"] and all(r["status"] == "failed" and r["model_id"] is None for r in session["rounds"]), session
    assert "0 of 2 selected clients contributed" in session["rounds"][0]["reason"], session
    # Each client learns why, as for any refused update.
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    errors = {r["client"]: r["error"] for r in shown["rounds"][0]["clients"]}
    assert sorted(errors) == ["big-0", "big-1"], errors
    for error in errors.values():
        assert error and "holds 1e+300, outside the model's float32 finite range" in error, errors
    assert models_are_finite(fed) == [seed]
    assert fed.admin("status")[0]["active_model"] == seed


async def stand_in_combiner(fed: Federation, token: str, sums: np.ndarray) -> dict[str, Any]:
    """A combiner that checks nothing (an old or broken one): it reports one client and,
    asked for a round, sends a partial aggregate of ``sums``; returns the finished session."""
    link = await connect(fed.url, token, client_context(fed.ca), max_payload=1 << 20)
    starts: asyncio.Queue[m.Message] = asyncio.Queue()

    async def on_message(inc: Incoming) -> None:
        await starts.put(inc.msg)

    partials: dict[tuple[str, int], bytes] = {}

    async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        assert req.op == "partial.get", req
        return {}, partials[(req.args["session_id"], req.args["round_index"])]

    reader = asyncio.create_task(link.run(on_message=on_message, on_request=on_request))
    try:
        await link.request("combiner.register", {"name": "unchecked"}, timeout=WAIT)
        await link.request("combiner.ready", {"url": "wss://127.0.0.1:9"}, timeout=WAIT)
        await link.send(m.ClientsChanged(joined=["ghost"], proofs=[fed.ticket("ghost", "unchecked")], reset=True))
        assert fed.conn is not None
        await asyncio.wait_for(call_async(fed.conn, "client.wait", {"count": 1, "timeout": WAIT}), WAIT)
        (started, _) = await asyncio.wait_for(
            call_async(fed.conn, "session.start", {"rounds": 1, "min_clients": 1, "round_timeout": WAIT, "validate": False}), WAIT
        )
        msg = await asyncio.wait_for(starts.get(), WAIT)
        while not isinstance(msg, m.RoundStart):
            msg = await asyncio.wait_for(starts.get(), WAIT)
        partial = encode_partial(Partial({"0": sums}, 1.0, 1, ["ghost"]))
        partials[(msg.session_id, msg.round_index)] = partial  # pulled by the controller
        report = m.RoundPartial(session_id=msg.session_id, round_index=msg.round_index, count=1, weight=1.0, size=len(partial))
        await link.send(report)
        (done, _) = await asyncio.wait_for(call_async(fed.conn, "session.wait", {"id": started["session"]["id"]}), WAIT)
        return done["session"]  # type: ignore[no-any-return]
    finally:
        await link.ws.close()
        reader.cancel()


def test_aggregate_not_finite_in_the_model_dtype_fails_the_round(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(EXTREME)  # float32
    token = fed.identity("combiner", "unchecked")
    session = asyncio.run(stand_in_combiner(fed, token, np.full(4, 1e300)))
    assert session["status"] == "failed", session
    (rnd,) = session["rounds"]
    assert rnd["status"] == "failed" and rnd["model_id"] is None, rnd
    assert "the aggregate of tensor '0' is not finite in float32" in rnd["reason"], rnd
    assert models_are_finite(fed) == [seed]
    assert fed.admin("status")[0]["active_model"] == seed
    # The controller is fine: a sane partial from the same kind of combiner is committed.
    again = asyncio.run(stand_in_combiner(fed, token, np.full(4, 2.5)))
    assert again["status"] == "finished", again
    assert models_are_finite(fed) == [seed, again["end_model"]]
