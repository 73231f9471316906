"""What one client (or combiner) may send is bounded where it enters; nobody else pays for it.

A misbehaving client speaks to its combiner over a websocket opened in this test process:
huge metrics, a flood of them, non-ASCII text that grows when escaped, a result with a huge
error text and metadata. The round still succeeds for the other clients on that combiner,
the combiner stays connected, and state.db grows by a bounded amount. A real client whose
package is as loud is bounded at the source; a rogue combiner is bounded by the controller.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from conftest import FIXTURES, QUICKSTART, START_TIMEOUT, Federation, wait_line
from websockets.asyncio.client import ClientConnection, connect

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.security.tls import client_context

TIMEOUT = 60.0
MAX_METRIC_BYTES = 64 << 10  # the documented limits (README, "When things go wrong")
MAX_ERROR_BYTES = 4 << 10
WIDE = "\u00e9"  # 2 bytes in UTF-8, 6 as a JSON \u escape: escaping triples it


def frame(msg_type: str, rid: str, **fields: Any) -> str:
    """A protocol message written by hand, as UTF-8 JSON (what a custom client may send)."""
    return json.dumps({"v": m.PROTOCOL_VERSION, "type": msg_type, "id": rid, **fields}, ensure_ascii=False)


def rows(fed: Federation, sql: str, *args: Any) -> list[dict[str, Any]]:
    with closing(sqlite3.connect(f"file:{fed.data / 'state.db'}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute(sql, args).fetchall()]


def db_bytes(fed: Federation) -> int:
    return sum(p.stat().st_size for p in fed.data.glob("state.db*"))


async def admin(fed: Federation, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    assert fed.conn is not None
    return (await asyncio.wait_for(call_async(fed.conn, op, args), TIMEOUT))[0]


async def next_text(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next text frame of type ``kind`` (payload chunks and other messages are skipped)."""
    while True:
        data = await asyncio.wait_for(ws.recv(), TIMEOUT)
        if isinstance(data, str) and (msg := json.loads(data))["type"] == kind:
            return msg  # type: ignore[no-any-return]


async def next_frame(ws: ClientConnection) -> str:
    """The next text frame."""
    while not isinstance(data := await asyncio.wait_for(ws.recv(), TIMEOUT), str):
        pass
    return data


def test_a_flooding_client_cannot_drop_its_combiner(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    c1 = fed.combiner("c1")
    for name in ("good-0", "good-1"):
        fed.client(name, package=QUICKSTART)
    assert c1.url is not None
    headers = {"Authorization": f"Bearer {fed.assigned_ticket('evil')}"}
    errors: list[dict[str, Any]] = []

    async def go() -> dict[str, Any]:
        async with connect(c1.url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None, max_size=None) as ws:
            await ws.send(frame("hello", "h1", name="evil"))
            await admin(fed, "client.wait", {"count": 3, "timeout": TIMEOUT})
            config = {"rounds": 1, "min_clients": 2, "round_timeout": 30, "validate": False}
            session = (await admin(fed, "session.start", config))["session"]
            task = await next_text(ws, "task")
            before = db_bytes(fed)
            n = 0
            # 50 metrics of 900 KB each, then 50 of 60 KB each (each under the size limit:
            # the rate limit drops most of them), then one of 400 KB of non-ASCII text.
            for name_bytes in [900_000] * 50 + [60_000] * 50:
                n += 1
                await ws.send(frame("metric", f"m{n}", task_id=task["task_id"], metrics={"x" * name_bytes: n}))
            await ws.send(frame("metric", "wide", task_id=task["task_id"], metrics={WIDE * 200_000: 1.0}))
            # The result: a failure with 400 KB of error text and 200 KB of metadata.
            error = "evil start " + WIDE * 200_000
            data = {"metadata": {"notes": WIDE * 100_000, "training_metadata": {"num_examples": 1}}}
            await ws.send(frame("task.result", "r1", task_id=task["task_id"], ok=False, error=error, data=data))
            done = (await admin(fed, "session.wait", {"id": session["id"]}))["session"]
            # A message the combiner refuses: its error comes after every error about the above.
            await ws.send(frame("hello", "h2", name="evil"))
            while "hello" not in (msg := await next_text(ws, "error"))["message"]:
                errors.append(msg)
            grown = db_bytes(fed) - before
            return {"session": done, "grown": grown}

    out = asyncio.run(go())
    session = out["session"]
    assert session["status"] == "finished", session
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["good-0", "good-1"], rnd
    # The combiner never lost the controller, and the misbehaving client was told, once per kind
    # of trouble rather than once per message (101 metrics were dropped).
    assert "lost the connection to the controller" not in c1.text(), c1.text()
    assert [c["name"] for c in fed.admin("combiner.ls")[0]["combiners"] if c["status"] == "online"] == ["c1"]
    text = [e["message"] for e in errors]
    assert all(e["code"] == "limit_exceeded" for e in errors), errors
    assert 3 <= len(errors) <= 6, text
    assert any("64.0 KiB" in t and "metric" in t for t in text), text
    assert any("per second" in t for t in text), text
    assert any("metadata" in t for t in text), text
    # What the controller stored is bounded: a few metrics, a truncated error, no metadata.
    sid = session["id"]
    evil = rows(fed, "SELECT * FROM reports WHERE session_id=? AND client='evil'", sid)
    metrics = [r for r in evil if r["kind"] == "metric"]
    assert 1 <= len(metrics) <= 8, len(metrics)
    assert all(len(r["data"].encode()) <= MAX_METRIC_BYTES for r in metrics)
    (train,) = [r for r in evil if r["kind"] == "train"]
    assert train["error"].startswith("evil start " + WIDE), train["error"][:100]
    assert "truncated" in train["error"] and len(train["error"].encode()) <= MAX_ERROR_BYTES, train["error"][-100:]
    assert json.loads(train["data"]) == {}, train["data"][:100]
    assert out["grown"] < 4 << 20, out["grown"]
    # The good clients' own metrics still got through.
    assert rows(fed, "SELECT id FROM reports WHERE session_id=? AND client='good-0' AND kind='metric'", sid)


def test_a_loud_package_is_bounded_at_the_source(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("good-0", package=QUICKSTART)
    loud = fed.client("loud", package=FIXTURES / "loud_client")
    fed.wait_clients(2)
    session = fed.run_session(rounds=1, min_clients=1, validate=False, settings={"loud_metric_kb": 400, "loud_error_kb": 400})
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["good-0"], rnd
    # The package's own code was told its metric was too large, and went on.
    assert loud.popen.stdout is not None
    line = wait_line(loud.popen.stdout, "loud_client: log_metric refused: ", START_TIMEOUT, "loud")
    assert "the limit is 64.0 KiB" in line, line
    train = {r["client"]: r for r in rows(fed, "SELECT * FROM reports WHERE session_id=? AND kind='train'", session["id"])}
    error = train["loud"]["error"]
    # One short line naming the package's line, cut well below the error limit.
    assert error.startswith("train failed: RuntimeError: loud start " + WIDE), error[:100]
    assert "(startup.py:" in error and len(error.encode()) <= MAX_ERROR_BYTES, error[-100:]
    assert not rows(fed, "SELECT id FROM reports WHERE client='loud' AND kind='metric'")
    assert fed.admin("status")[0]["clients"] == 2  # both still connected
    log = loud.text()
    assert "1009" not in log and "lost the combiner" not in log, log[-2000:]
    assert max(map(len, log.splitlines())) < 2 * MAX_ERROR_BYTES  # the client cut its own error text


def test_the_controller_bounds_what_a_combiner_reports(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    # Outcomes are stored only for a session the controller runs: one waiting for clients that never come.
    start = {"rounds": 1, "min_clients": 50, "round_timeout": 600}
    sid = fed.admin("session.start", start)[0]["session"]["id"]
    headers = {"Authorization": f"Bearer {fed.identity('combiner', 'rogue')}"}

    def report(rid: str, **fields: Any) -> str:
        body = {"kind": "metric", "session_id": sid, "round_index": 1, "client": "someone", "data": {}, **fields}
        return frame("report", rid, **body)

    async def go() -> list[dict[str, Any]]:
        async with connect(fed.url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None, max_size=None) as ws:
            await ws.send(frame("request", "reg", op="combiner.register", args={"name": "rogue"}))
            assert (await next_text(ws, "reply"))["ok"] is True
            await ws.send(frame("clients.changed", "cc", joined=["someone"], proofs=[fed.ticket("someone", "rogue")]))  # a combiner reports for its own clients
            await ws.send(report("big", data={"metrics": {"x" * 900_000: 1.0}}))
            await ws.send(report("err", kind="train", data={"metadata": {}}, error="rogue " + WIDE * 300_000))
            await ws.send(report("bogus", kind="bogus"))
            await ws.send(report("badname", client="no/such name"))
            await ws.send(report("fine", data={"metrics": {"loss": 0.5}, "step": 1}))
            # The link still works, and answers in order: every report above was handled first.
            await ws.send(frame("request", "ready", op="combiner.ready", args={"url": "wss://127.0.0.1:1"}))
            complaints = []
            while (msg := json.loads(await next_frame(ws)))["type"] != "reply":
                complaints.append(msg)
            assert msg["re"] == "ready" and msg["ok"] is True, msg
            return complaints

    complaints = asyncio.run(go())
    fed.admin("client.ls")  # reports are written in batches: a listing flushes what is queued
    assert [c["code"] for c in complaints] == ["bad_message"] * 2, complaints
    assert "kind must be one of" in complaints[0]["message"] and "client name" in complaints[1]["message"], complaints
    stored = rows(fed, f"SELECT * FROM reports WHERE session_id='{sid}' ORDER BY id")
    assert [(r["kind"], r["client"]) for r in stored] == [("metric", "someone"), ("train", "someone"), ("metric", "someone")]
    big, err, fine = stored
    assert json.loads(big["data"]) == {}, big["data"][:100]
    assert err["error"].startswith("rogue " + WIDE) and len(err["error"].encode()) <= MAX_ERROR_BYTES and "truncated" in err["error"]
    assert json.loads(fine["data"]) == {"metrics": {"loss": 0.5}, "step": 1}
