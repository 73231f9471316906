"""A combiner sends a round's model to all its clients at once (issue 17 #1, #3): every
frame is a view of the one model it holds, and what is being written to all clients
together is bounded in bytes, so clients that stop reading hold one frame each of that
bound and never the others' turn. Real roles, real TLS, on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from conftest import FIXTURES, START_TIMEOUT, Federation, raw_websocket
from test_link_limits import combiner, config, ws_frame

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.core import payload

PACKAGE = FIXTURES / "shift_client"
DEAF = 6  # more than a combiner used to send to at once (4): they must not take every turn
TIMEOUT = 30.0


async def deaf_client(url: str, ca: str, ticket: str, name: str) -> asyncio.StreamWriter:
    """A client that connects to its combiner, says hello and never reads again, so what the
    combiner sends piles up."""
    _, writer = await raw_websocket(url, ca, ticket, deaf=True, timeout=TIMEOUT)
    writer.write(ws_frame(json.dumps({"v": m.PROTOCOL_VERSION, "type": "hello", "id": "h", "name": name}).encode()))
    await writer.drain()
    return writer


def test_clients_that_stop_reading_do_not_hold_up_the_model_for_the_others(fed: Federation) -> None:
    fed.controller()
    # shift_client's model: a float32 matrix (16 MiB here, more than socket buffers take), a float64 and an int32 vector.
    seed = [np.linspace(-1, 1, 1 << 22, dtype=np.float32).reshape(1 << 11, 1 << 11), np.arange(5, dtype=np.float64) / 3, np.array([1, 2, 3], np.int32)]
    fed.admin("model.set_seed", {}, payload.encode(seed))
    # A send to a client that does not read is dropped only after a minute: far past the round's end.
    c1 = combiner(fed, "c1", "--config", config(fed, "combiner", "send_timeout = 120\n"))
    assert c1.url is not None
    good = ["s1", "s2"]
    for name in good:
        fed.client(name, package=PACKAGE)
    deaf = [f"d{i}" for i in range(DEAF)]  # named so they come first in the round's client list
    tickets = {name: fed.assigned_ticket(name, prefer="c1") for name in deaf}

    async def go() -> dict:
        writers = [await deaf_client(c1.url, fed.ca, tickets[name], name) for name in deaf]  # type: ignore[arg-type]
        try:
            assert fed.conn is not None
            await asyncio.wait_for(call_async(fed.conn, "client.wait", {"count": len(good) + DEAF, "timeout": START_TIMEOUT}), START_TIMEOUT)
            config = {"rounds": 1, "min_clients": len(good), "round_timeout": 8, "validate": False}  # all 8 are selected
            session = (await call_async(fed.conn, "session.start", config))[0]["session"]
            done = (await asyncio.wait_for(call_async(fed.conn, "session.wait", {"id": session["id"]}), 60))[0]["session"]
            return done  # type: ignore[no-any-return]
        finally:
            for w in writers:
                w.transport.abort()

    session = asyncio.run(go())
    (rnd,) = session["rounds"]
    # Both clients that read got the whole model (their link checked its sha256) and trained on it.
    assert rnd["status"] == "succeeded" and sorted(rnd["participants"]) == good, {k: rnd.get(k) for k in ("status", "reason", "participants", "timing")}
