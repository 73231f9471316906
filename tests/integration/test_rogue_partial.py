"""A combiner cannot hold a round open with its partial (issue 20 #7): an announce the model
does not allow is refused at once, and a pull that brings nothing ends by the round's deadline."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from conftest import Federation

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.core.payload import encode_named
from test_link_limits import ws_to

TIMEOUT = 10.0


def text(msg: m.Message, id: str) -> str:
    msg.id = id
    return m.serialize(msg)


async def rogue_round(fed: Federation, rogue: str, size_of: str, round_timeout: float, wait_s: float) -> tuple[dict, float, int]:
    """A combiner (credential ``rogue``) that claims a client, then announces its partial
    (4 GiB, or the right size) and never sends it; returns the session, how long it ran,
    and the partial.get requests it saw."""
    ws = await ws_to(fed.url, fed, rogue, max_size=None)
    for i, (op, args) in enumerate((("combiner.register", {"name": "rogue"}), ("combiner.ready", {"url": "wss://127.0.0.1:1"}))):
        await ws.send(text(m.Request(op=op, args=args), f"q{i}"))
        reply = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert reply["ok"], reply
    await ws.send(text(m.ClientsChanged(joined=["k1"], reset=True), "c0"))
    asked = 0

    async def play() -> None:
        nonlocal asked
        async for frame in ws:
            if isinstance(frame, bytes):
                continue
            msg = json.loads(frame)
            if msg["type"] == "round.start":
                size = 4 << 30 if size_of == "inflated" else 8 + 4 * (1 << 16) + 512
                await ws.send(text(m.RoundPartial(session_id=msg["session_id"], round_index=msg["round_index"], count=1, weight=1.0, size=size), "p0"))
            elif msg["type"] == "request" and msg["op"] == "partial.get":
                asked += 1  # and never answered

    player = asyncio.create_task(play())
    await asyncio.wait_for(call_async(fed.conn, "client.wait", {"count": 1, "timeout": TIMEOUT}), TIMEOUT)  # type: ignore[arg-type]
    started = time.monotonic()
    session = (await call_async(fed.conn, "session.start", {"rounds": 1, "min_clients": 1, "round_timeout": round_timeout}))[0]["session"]  # type: ignore[arg-type]
    try:
        done = (await asyncio.wait_for(call_async(fed.conn, "session.wait", {"id": session["id"]}), wait_s))[0]["session"]  # type: ignore[arg-type]
    finally:
        player.cancel()
        ws.transport.abort()
    return done, time.monotonic() - started, asked


@pytest.fixture
def small_model(fed: Federation) -> None:
    fed.controller()
    fed.admin("model.set_seed", {}, encode_named({"w": np.zeros(1 << 16, dtype=np.float32)}, "dict"))


def test_an_inflated_partial_announce_is_refused_at_once(fed: Federation, small_model: None) -> None:
    done, took, asked = asyncio.run(rogue_round(fed, fed.identity("combiner", "rogue"), "inflated", 15, 12))
    assert done["status"] == "failed", done
    reason = done["rounds"][0]["reason"] or ""
    assert asked == 0, "nothing is pulled for an announce the model does not allow"
    assert took < 15, took  # the round did not even wait for its timeout (was 889 s)
    log = fed.procs[0].text()
    assert "partial aggregate of 4294967296 bytes announced" in log, (reason, log[-2000:])


def test_a_partial_that_never_comes_ends_by_the_round_deadline(fed: Federation, small_model: None) -> None:
    done, took, asked = asyncio.run(rogue_round(fed, fed.identity("combiner", "rogue"), "right", 2, 25))
    assert done["status"] == "failed", done
    assert asked == 1
    log = fed.procs[0].text()
    assert "still arriving at the round's deadline" in log or "sent nothing of its partial" in log, log[-2000:]
