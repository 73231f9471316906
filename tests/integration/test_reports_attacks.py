"""A combiner's Reports message (its clients' outcomes of a round, roles/membership.py) from a
rogue or buggy combiner: one that names one of its own clients more than once (each entry was
stored and counted in the round's progress; one outcome per client is kept, the first),
malformed ones, and ones for sessions the controller never ran (stored before; dropped now)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from conftest import QUICKSTART, Federation, sqlite_only
from test_membership import Rogue

from scaleout.commands.admin import call_async
from scaleout.core import messages as m


def as_rogue(fed: Federation, tmp_path: Path, send: Callable[[Rogue, str], Awaitable[None]]) -> None:
    """As a rogue combiner, evilcomb, with one real client of its own, k2, and a session the
    controller runs (its round waits on the rogue): ``send(rogue, session id)``, then a
    barrier (the controller has handled what was sent)."""
    evil = fed.identity("combiner", "evilcomb")
    fed.token("client")

    async def go() -> None:
        rogue = Rogue(fed, tmp_path, evil)
        await rogue.start()
        try:
            fed.client("k2", package=QUICKSTART)  # sent to the only combiner, the rogue
            bearer = await asyncio.wait_for(rogue.bearers.get(), 60)
            await rogue.link.send(m.ClientsChanged(joined=["k2"], proofs=[bearer]))
            await call_async(fed.conn, "client.wait", {"count": 1, "timeout": 60})
            start = {"rounds": 1, "min_clients": 1, "validate": False, "round_timeout": 30}
            session = (await call_async(fed.conn, "session.start", start))[0]["session"]
            await send(rogue, session["id"])
            await rogue.barrier()
        finally:
            await rogue.stop()

    asyncio.run(asyncio.wait_for(go(), 120))


def stored(fed: Federation, sql: str, tries: int = 500) -> list[Any]:
    """The rows ``sql`` reads from state.db once the registry writer's batch is in (a
    condition, not a delay: a status call between tries), or none after ``tries``."""
    rows: list[Any] = []
    with sqlite3.connect(f"file:{fed.data / 'state.db'}?mode=ro", uri=True) as db:
        for _ in range(tries):
            rows = db.execute(sql).fetchall()
            if rows:
                break
            fed.admin("status")
    return rows


def test_a_client_named_twice_in_one_reports_message_is_stored_once(fed: Federation, tmp_path: Path) -> None:
    sqlite_only("it reads the reports in state.db")
    ctl = fed.controller()
    fed.seed_from(QUICKSTART)

    async def send(rogue: Rogue, sid: str) -> None:
        entries = [
            {"client": "k2", "data": {"accuracy": 0.5}, "error": None},
            {"client": "k2", "data": {}, "error": "validate failed again"},
            {"client": "k2", "data": {"accuracy": 0.9}, "error": None},
        ]
        await rogue.link.send(m.Reports(kind="validate", session_id=sid, round_index=1, entries=entries, done=2, failed=1))

    as_rogue(fed, tmp_path, send)
    rows = stored(fed, "SELECT client, data, error FROM reports WHERE kind='validate'")
    assert rows == [("k2", '{"accuracy":0.5}', None)], rows
    assert "named client k2 more than once" in ctl.text()


def test_malformed_reports_are_refused_and_nothing_of_them_is_stored(fed: Federation, tmp_path: Path) -> None:
    sqlite_only("it reads the reports in state.db")
    ctl = fed.controller()
    fed.seed_from(QUICKSTART)
    ok = {"client": "k2", "data": {}, "error": None}

    async def send(rogue: Rogue, sid: str) -> None:
        bad: list[list[object]] = [
            [ok, "k2"],  # an entry that is not an object
            [ok, {"client": "k2", "data": [1, 2], "error": None}],
            [ok, {"client": "k2", "data": {}, "error": 5}],
            [ok, {"client": "../k2", "data": {}, "error": None}],
            [ok, {"data": {}, "error": None}],
            [ok, {"client": "ghost", "data": {}, "error": None}],  # not its client
            [ok] * (m.MAX_NAMES + 1),
        ]
        for entries in bad:
            await rogue.link.send(m.Reports(kind="train", session_id="s-bad", round_index=1, entries=entries))
        await rogue.link.send(m.Reports(kind="bogus", session_id="s-bad", round_index=1, entries=[ok]))
        await rogue.link.send(m.Reports(kind="train", session_id="../s", round_index=1, entries=[ok]))
        await rogue.link.ws.send('{"v": %d, "type": "reports", "id": "n1", "kind": "train", "session_id": "s-bad", "round_index": 1, '
                                 '"entries": [{"client": "k2", "data": {"loss": NaN}, "error": null}]}' % m.PROTOCOL_VERSION)
        await rogue.link.ws.send('{"v": %d, "type": "reports", "id": "n2", "kind": "train", "session_id": "s-bad", "round_index": "1", '
                                 '"entries": []}' % m.PROTOCOL_VERSION)
        # then a good one: the link still works, and it is stored
        await rogue.link.send(m.Reports(kind="validate", session_id=sid, round_index=1, entries=[ok]))

    as_rogue(fed, tmp_path, send)
    rows = stored(fed, "SELECT kind, client FROM reports")
    assert rows == [("validate", "k2")], rows
    log = ctl.text()
    assert "may not report for client 'ghost'" in log, log
    assert "at most 2000 entries" in log, log


def test_reports_for_a_session_that_never_existed_are_not_stored(fed: Federation, tmp_path: Path) -> None:
    sqlite_only("it reads the reports in state.db")
    ctl = fed.controller()
    fed.seed_from(QUICKSTART)

    async def send(rogue: Rogue, sid: str) -> None:  # the running session's id is not used
        for i in range(20):
            await rogue.link.send(m.Reports(kind="train", session_id=f"made-up-{i}", round_index=i, entries=[{"client": "k2", "data": {}, "error": "x"}]))
        await rogue.link.send(m.Report(kind="train", session_id="made-up-one", round_index=1, client="k2", data={}, error="x"))

    as_rogue(fed, tmp_path, send)
    rows = stored(fed, "SELECT session_id FROM reports WHERE session_id LIKE 'made-up-%'", tries=100)  # ~100 status calls
    assert not {f"made-up-{i}" for i in range(20)} & sessions_known(fed) and rows == [], rows
    assert "reported for session 'made-up-0', which this controller did not run: dropped" in ctl.text()


def sessions_known(fed: Federation) -> set[str]:
    return {s["id"] for s in fed.admin("session.ls")[0]["sessions"]}


def test_a_client_named_again_in_a_later_page_of_the_round_is_stored_once(fed: Federation, tmp_path: Path) -> None:
    """A round's outcomes come in pages (Reports messages); a client named in two of them
    (a rogue or buggy combiner) is stored once, the first, and said once for the round."""
    sqlite_only("it reads the reports in state.db")
    ctl = fed.controller()
    fed.seed_from(QUICKSTART)

    async def send(rogue: Rogue, sid: str) -> None:
        for accuracy in (0.5, 0.9, 0.7):  # three pages of the same round, each naming k2 once
            entry = {"client": "k2", "data": {"accuracy": accuracy}, "error": None}
            await rogue.link.send(m.Reports(kind="validate", session_id=sid, round_index=1, entries=[entry], done=3))
        await rogue.link.send(m.Reports(kind="validate", session_id=sid, round_index=2, entries=[entry], done=1))  # another round: its own

    as_rogue(fed, tmp_path, send)
    assert stored(fed, "SELECT 1 FROM reports WHERE round_index=2")  # the last sent: the rest are in before it
    rows = stored(fed, "SELECT round_index, client, data FROM reports WHERE kind='validate' ORDER BY id")
    assert rows == [(1, "k2", '{"accuracy":0.5}'), (2, "k2", '{"accuracy":0.7}')], rows
    assert ctl.text().count("named client k2 more than once") == 1, ctl.text()


def test_reports_for_a_session_that_ended_before_a_restart_are_stored_after_it(fed: Federation, tmp_path: Path) -> None:
    """The store knows every session started on it: a combiner's late report of one that
    ended before the controller restarted (and was not resumed) is stored, not dropped as
    made up (which it was while only the sessions this process ran were known)."""
    sqlite_only("it reads the reports in state.db")
    first = fed.controller()
    fed.seed_from(QUICKSTART)
    old = fed.admin("session.start", {"rounds": 1, "min_clients": 1, "validate": False, "round_timeout": 30})[0]["session"]["id"]
    assert fed.admin("session.stop", {"id": old})[0]["session"]["status"] == "stopped"
    port = int(fed.url.rsplit(":", 1)[1])
    assert first.stop() == 0
    ctl = fed.controller(name="controller-2", port=port)

    async def send(rogue: Rogue, sid: str) -> None:
        assert sid != old
        entry = {"client": "k2", "data": {"accuracy": 0.5}, "error": None}
        await rogue.link.send(m.Reports(kind="validate", session_id=old, round_index=1, entries=[entry], done=1))
        await rogue.link.send(m.Report(kind="validate", session_id=old, round_index=2, client="k2", data={}, error=None))

    as_rogue(fed, tmp_path, send)
    stored(fed, f"SELECT 1 FROM reports WHERE session_id='{old}' AND round_index=2", tries=100)  # the last sent, if kept
    rows = stored(fed, f"SELECT round_index, client FROM reports WHERE session_id='{old}' ORDER BY id", tries=1)
    assert rows == [(1, "k2"), (2, "k2")], rows
    assert "which this controller did not run" not in ctl.text()
