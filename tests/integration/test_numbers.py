"""One number must not kill a session or an admin command (issue 19 #17).

A combiner and an admin send, by hand, integers beyond 64 bits (2**63, 10**400, 5000
digits) and floats beyond the float range (1e309) where the schema wants numbers and nested
in free-form data: each frame is refused with one line, the link stays up, a session runs
to its end, and `metric ls` and `session show` answer, also with a row stored before
numbers were bounded.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from typing import Any

from conftest import QUICKSTART, Federation
from websockets.asyncio.client import ClientConnection, connect

from scaleout.core import messages as m
from scaleout.security.tls import client_context

WAIT = 30.0
V = m.PROTOCOL_VERSION


async def next_json(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = await asyncio.wait_for(ws.recv(), WAIT)
        if isinstance(frame, str):
            return json.loads(frame)  # type: ignore[no-any-return]


async def refused(ws: ClientConnection, frame: str, why: str) -> None:
    await ws.send(frame)
    msg = await next_json(ws)
    assert msg["type"] == "error" and msg["code"] == "bad_message", (frame[:80], msg)
    assert why in msg["message"] and "\n" not in msg["message"] and len(msg["message"]) < 300, msg


async def request(ws: ClientConnection, rid: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps({"v": V, "type": "request", "id": rid, "op": op, "args": args}))
    while (msg := await next_json(ws))["type"] != "reply":
        pass
    assert msg["re"] == rid, msg
    return msg


BIG = ["9223372036854775808", "1" + "0" * 400, "9" * 5000]
INT64 = "outside the signed 64-bit range"
FLOAT = "beyond the float range"


def test_numbers_beyond_int64_or_float_are_refused_and_everything_goes_on(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("good-0", package=QUICKSTART)
    token = fed.identity("combiner", "evil")
    admin = (fed.data / "admin.token").read_text().strip()
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, round_timeout=WAIT, validate=False)
    assert session["status"] == "finished", session
    sid = session["id"]

    async def go() -> None:
        ctx = client_context(fed.ca)
        async with connect(fed.url, ssl=ctx, additional_headers={"Authorization": f"Bearer {token}"}, proxy=None) as ws:
            assert (await request(ws, "r1", "combiner.register", {"name": "evil"}))["ok"]
            for big in BIG:
                report = '{"v": %d, "type": "report", "kind": "%%s", "session_id": "%s", "round_index": %%s, "client": "ghost", "data": %%s}' % (V, sid)
                await refused(ws, report % ("train", big, "{}"), INT64)  # round_index
                await refused(ws, report % ("metric", "1", '{"metrics": {"loss": 1}, "step": %s}' % big), INT64)
                await refused(ws, report % ("metric", "1", '{"metrics": {"loss": %s}}' % big), INT64)
                await refused(ws, '{"v": %d, "type": "blob", "id": "b", "transfer": "0123456789abcdef", "size": %s, "sha256": "x"}' % (V, big), INT64)
            for huge in ("1e309", "-1e400"):
                await refused(ws, report % ("metric", "1", '{"metrics": {"loss": %s}, "step": 1}' % huge), FLOAT)
            # The link is still up and speaks sense.
            assert (await request(ws, "r2", "combiner.ready", {"url": "wss://127.0.0.1:9"}))["ok"]
        async with connect(fed.url, ssl=ctx, additional_headers={"Authorization": f"Bearer {admin}"}, proxy=None) as ws:
            for big in BIG:
                await refused(ws, '{"v": %d, "type": "request", "id": "x", "op": "metric.ls", "args": {"limit": %s}}' % (V, big), INT64)
                await refused(ws, '{"v": %d, "type": "request", "id": "y", "op": "session.show", "args": {"id": "%s", "deep": [{"n": %s}]}}' % (V, sid, big), INT64)
            reply = await request(ws, "ok", "metric.ls", {"limit": 2**63 - 1})  # the largest limit there is: fine
            assert reply["ok"], reply

    asyncio.run(go())
    # A row stored before numbers were bounded (SQLite and Python read it as inf): still listed as JSON.
    with closing(sqlite3.connect(fed.data / "state.db")) as db:
        db.execute(
            "INSERT INTO reports(kind, session_id, round_index, client, data, error, created) VALUES('metric', ?, 1, 'old', ?, NULL, 0)",
            (sid, '{"metrics": {"loss": 1e309, "acc": 0.5}, "step": 1%s}' % ("0" * 400)),
        )
        db.commit()
    rows = fed.admin("metric.ls", {"session_id": sid}, timeout=WAIT)[0]["metrics"]
    assert [(r["client"], r["key"], r["value"], r["step"]) for r in rows if r["client"] == "old"] == [("old", "acc", 0.5, None)], rows
    shown = fed.admin("session.show", {"id": sid, "clients": True}, timeout=WAIT)[0]["session"]
    assert shown["status"] == "finished"
    # The controller goes on: another session runs to its end.
    again = fed.run_session(rounds=1, round_timeout=WAIT, validate=False)
    assert again["status"] == "finished", again
    assert fed.admin("status", timeout=WAIT)[0]["session"] is None
