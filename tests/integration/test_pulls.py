"""Pulled updates: a client that stalls when asked cannot hold a combiner's upload budget,
clients that leave are named in the round's reports, and a client's metric limits survive
its reconnects."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from conftest import FIXTURES, QUICKSTART, Federation, wait_stdout
from test_client_limits import TIMEOUT, admin, frame, next_text, rows
from websockets.asyncio.client import connect

from scaleout.security.tls import client_context

SLOW = FIXTURES / "slow_client"


def one_client_behind_c1(fed: Federation, package: Path = QUICKSTART) -> str:
    """A controller with ``package``'s seed, combiner c1 and one client of it (good-0): c1's url,
    for the raw clients a test adds beside good-0."""
    fed.controller()
    fed.seed_from(package)
    c1 = fed.combiner("c1")
    fed.client("good-0", package=package)
    assert c1.url is not None
    return c1.url


def test_a_client_that_stalls_when_asked_is_left_out_and_the_round_goes_on(fed: Federation) -> None:
    url = one_client_behind_c1(fed)
    headers = {"Authorization": f"Bearer {fed.assigned_ticket('staller')}"}

    async def go() -> dict[str, Any]:
        async with connect(url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None, max_size=None) as ws:
            await ws.send(frame("hello", "h1", name="staller"))
            await admin(fed, "client.wait", {"count": 2, "timeout": TIMEOUT})
            config = {"rounds": 1, "min_clients": 1, "round_timeout": 60, "validate": False}
            session = (await admin(fed, "session.start", config))["session"]
            task = await next_text(ws, "task")
            meta = {"metadata": {"training_metadata": {"num_examples": 5}}}
            await ws.send(frame("task.result", "r1", task_id=task["task_id"], ok=True, size=50_000, data=meta))
            pull = await next_text(ws, "request")  # asked for the update: never answer
            assert pull["op"] == "update.get", pull
            return (await admin(fed, "session.wait", {"id": session["id"]}))["session"]

    session = asyncio.run(go())
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["good-0"], rnd
    assert rnd["duration_s"] < 40, rnd  # given up after 10 s of silence, not at the 60 s timeout
    (staller,) = rows(fed, "SELECT * FROM reports WHERE session_id=? AND client='staller'", session["id"])
    assert "sent nothing for 10 s when asked for its update" in staller["error"], staller


def test_clients_that_leave_mid_round_are_named(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(SLOW)
    fed.combiner("c1")
    fed.client("stays", package=SLOW)
    leaver = fed.client("leaves", package=SLOW)
    fed.wait_clients(2)
    session = fed.admin("session.start", {"rounds": 1, "min_clients": 1, "round_timeout": 30, "validate": False, "settings": {"slow_s": 3}})[0]["session"]
    wait_stdout(leaver, "slow_client: training")
    leaver.popen.send_signal(signal.SIGTERM)  # says goodbye: no reconnect grace to wait out
    done = fed.admin("session.wait", {"id": session["id"]})[0]["session"]
    (rnd,) = done["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["stays"], rnd
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    reasons = {c["client"]: c["error"] for c in shown["rounds"][0]["clients"]}
    assert reasons["stays"] is None and reasons["leaves"] == "client disconnected", reasons


def test_metric_limits_hold_across_reconnects(fed: Federation) -> None:
    url = one_client_behind_c1(fed, SLOW)
    headers = {"Authorization": f"Bearer {fed.assigned_ticket('flooder')}"}

    async def go() -> str:
        async def dial() -> Any:
            return await connect(url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None, max_size=None)

        ws = await dial()
        await ws.send(frame("hello", "h0", name="flooder"))
        await admin(fed, "client.wait", {"count": 2, "timeout": TIMEOUT})
        config = {"rounds": 1, "min_clients": 1, "round_timeout": 30, "validate": False, "settings": {"slow_s": 4}}
        session = (await admin(fed, "session.start", config))["session"]
        task = await next_text(ws, "task")
        for i in range(30):  # 4 x 60 KB per connection, then a new connection with a fresh link
            for j in range(4):
                await ws.send(frame("metric", f"m{i}-{j}", task_id=task["task_id"], metrics={"x" * 60_000: j}))
            await ws.close()
            ws = await dial()
            await ws.send(frame("hello", f"h{i + 1}", name="flooder", task_id=task["task_id"]))
        await ws.close()
        await admin(fed, "session.wait", {"id": session["id"]})
        return str(session["id"])

    sid = asyncio.run(go())
    stored = rows(fed, "SELECT data FROM reports WHERE session_id=? AND client='flooder' AND kind='metric'", sid)
    stored = [r for r in stored if "dropped" not in json.loads(r["data"])]  # the counts of what was dropped are not values
    assert 1 <= len(stored) <= 8, len(stored)  # 120 sent; the per-client budget of about 256 KB holds
    assert sum(len(json.loads(r["data"])) for r in stored) <= 8


def test_a_combiner_lost_and_back_before_the_round_does_not_fail_it(fed: Federation) -> None:
    """A 'lost' from a combiner's earlier registration says nothing about a later round."""
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.activate(QUICKSTART)
    first = fed.combiner("cA")
    session = fed.admin("session.start", {"rounds": 1, "min_clients": 2, "round_timeout": 60, "validate": False})[0]["session"]
    first.popen.kill()  # while the round waits for clients
    first.popen.wait()
    fed.procs.remove(first)
    first.stop()
    fed.combiner("cA")
    fed.client("k1")
    fed.client("k2")
    done = fed.admin("session.wait", {"id": session["id"]})[0]["session"]
    (rnd,) = done["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["k1", "k2"], rnd


def test_a_combiner_asks_at_most_pulls_at_once_clients_and_the_others_wait_their_turn(fed: Federation) -> None:
    # Thousands of small updates fit the upload budget together: asked all at once, clients
    # on a busy host could not all answer within the stall limit (10,000 clients: 1,213 refused).
    from scaleout.roles.combiner import PULLS_AT_ONCE

    url = one_client_behind_c1(fed)
    names = [f"staller-{i}" for i in range(PULLS_AT_ONCE + 1)]
    tickets = {name: fed.assigned_ticket(name) for name in names}

    async def go() -> tuple[str, dict[str, Any]]:
        socks = {}
        for name in names:
            headers = {"Authorization": f"Bearer {tickets[name]}"}
            socks[name] = await connect(url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None, max_size=None)
            await socks[name].send(frame("hello", "h1", name=name))
        try:
            await admin(fed, "client.wait", {"count": len(names) + 1, "timeout": TIMEOUT})
            config = {"rounds": 1, "min_clients": 1, "round_timeout": 60, "validate": False}
            session = (await admin(fed, "session.start", config))["session"]
            tasks = await asyncio.gather(*(next_text(ws, "task") for ws in socks.values()))
            meta = {"metadata": {"training_metadata": {"num_examples": 5}}}
            for ws, task in zip(socks.values(), tasks):  # all within the budget: 33 x 50 kB
                await ws.send(frame("task.result", "r1", task_id=task["task_id"], ok=True, size=50_000, data=meta))
            asked = {asyncio.ensure_future(next_text(ws, "request")): name for name, ws in socks.items()}
            pending = set(asked)
            while len(asked) - len(pending) < PULLS_AT_ONCE:  # none of those asked answers
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            assert len(pending) == 1, f"{len(asked) - len(pending)} clients asked for their update at once"
            (last,) = pending
            waiting = asked[last]
            # A frame the combiner wrote before this pong has been read once the pong is back:
            # the last one has not been asked, it waits for a slot.
            await asyncio.wait_for(await socks[waiting].ping(), TIMEOUT)
            await asyncio.wait({last}, timeout=1)
            assert not last.done(), f"{waiting} was asked for its update beside {PULLS_AT_ONCE} others"
            gone = next(name for name in names if name != waiting)
            await socks.pop(gone).close()  # its pull ends: the slot goes to the one waiting
            pull = await last
            assert pull["op"] == "update.get", pull
            return waiting, (await admin(fed, "session.wait", {"id": session["id"]}))["session"]
        finally:
            for ws in socks.values():
                await ws.close()

    waiting, session = asyncio.run(go())
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["good-0"], rnd
    (late,) = rows(fed, "SELECT * FROM reports WHERE session_id=? AND client=?", session["id"], waiting)
    assert "sent nothing for 10 s when asked for its update" in late["error"], late  # its clock started when asked
