"""The controller's typed event stream: a slow subscriber never stalls rounds.

Real controller, combiner and clients on loopback with TLS. One subscriber stops reading
its socket (a paused terminal, a stalled network): its link fills, the controller drops its
buffered events and tells it to resync, and the session runs on at full speed. A reading
subscriber beside it sees every round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

from conftest import FIXTURES, QUICKSTART, Federation

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.tui.feed import Feed, Snapshot

LOUD = FIXTURES / "loud_client"


class StallingProxy:
    """A TCP relay to the controller that stops reading from it when ``stall`` is set, as
    a stalled network or a suspended terminal would: what the controller sends piles up."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("wss://").rsplit(":", 1)
        self.target = (host, int(port))
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: Any = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"wss://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, self.target)
        up_r, up_w = await asyncio.open_connection(sock=sock, limit=4096)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, gated: bool) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while True:
                    if gated:
                        await self.flowing.wait()
                    data = await r.read(4096)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(client_r, up_w, False), pipe(up_r, client_w, True))


def test_a_subscriber_that_never_reads_does_not_stall_a_session_and_is_told_to_resync(fed: Federation) -> None:
    fed.controller()
    fed.activate(LOUD)
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    fed.client("a")
    fed.client("b")
    fed.wait_clients(2)
    assert fed.conn is not None
    conn = fed.conn

    async def go() -> None:
        from scaleout.security.tls import client_context
        from scaleout.transport.net import connect

        proxy = StallingProxy(conn.url)
        via = await proxy.start()
        paused = await connect(via, conn.token, client_context(conn.ca), max_payload=1 << 30)
        got: asyncio.Queue[m.Event] = asyncio.Queue()

        async def collect(inc: Any) -> None:
            if isinstance(inc.msg, m.Event):
                got.put_nowait(inc.msg)

        paused_reader = asyncio.create_task(paused.run(on_message=collect))
        await paused.send(m.Subscribe(buffer=8))
        first = m.decode_event(await asyncio.wait_for(got.get(), 10))
        assert isinstance(first, m.Resync) and first.reason == "subscribed"
        proxy.flowing.clear()  # from now on the controller's frames stay on its side
        feed = Feed(conn)
        await feed.open()
        seen: list[Any] = []

        async def follow() -> None:
            async for item in feed.items():
                seen.append(item)

        follower = asyncio.create_task(follow())
        # Each client logs a 60 KB metric per round: far more than the paused socket takes.
        cfg = {"rounds": 4, "round_timeout": 30, "min_clients": 2, "validate": False, "settings": {"loud_metric_kb": 60}}
        started = time.monotonic()
        session = (await call_async(conn, "session.start", cfg))[0]["session"]
        done = (await asyncio.wait_for(call_async(conn, "session.wait", {"id": session["id"]}), 60))[0]["session"]
        elapsed = time.monotonic() - started
        assert done["status"] == "finished", done
        assert [r["status"] for r in done["rounds"]] == ["succeeded"] * 4
        assert elapsed < 20, f"the session took {elapsed:.1f}s with a paused subscriber"

        # The reading subscriber saw every round end, after one snapshot, without a resync.
        deadline = time.monotonic() + 10
        while not any(isinstance(e, m.SessionEnded) for e in seen) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling a list another task fills, bounded by the deadline
        ended = [e.round_index for e in seen if isinstance(e, m.RoundEnded)]
        assert ended == [1, 2, 3, 4], seen
        assert feed.resyncs == 1 and isinstance(seen[0], Snapshot)
        assert sum(1 for e in seen if isinstance(e, m.MetricLogged)) == 8
        follower.cancel()
        await feed.close()

        # The stalled one, flowing again, finds a resync that says what it lost.
        proxy.flowing.set()
        while True:
            ev = m.decode_event(await asyncio.wait_for(got.get(), 10))
            if isinstance(ev, m.Resync):
                break
        assert "fell behind" in ev.reason and ev.dropped > 0, ev
        # ... and re-reads the snapshot on that same link: the session is there, finished.
        snap, _ = await paused.request("events.snapshot", {}, timeout=10)
        assert snap["session"]["status"] == "finished" and snap["seq"] >= ev.seq
        paused_reader.cancel()
        await paused.ws.close()
        proxy.server.close()

    asyncio.run(go())
    assert "told to resync" in fed.procs[0].text()


def test_bad_subscriptions_get_a_clear_error_and_the_link_stays_up(fed: Federation) -> None:
    fed.controller()
    assert fed.conn is not None
    conn = fed.conn

    async def go() -> None:
        from scaleout.security.tls import client_context
        from scaleout.transport.link import Incoming
        from scaleout.transport.net import connect

        link = await connect(conn.url, conn.token, client_context(conn.ca), max_payload=1 << 20)
        errors: asyncio.Queue[str] = asyncio.Queue()
        orig = link._complain  # noqa: F841 - errors arrive as Error messages, logged by the link

        async def on_message(inc: Incoming) -> None:
            pass

        reader = asyncio.create_task(link.run(on_message=on_message))
        import logging

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                errors.put_nowait(record.getMessage())

        handler = Catch()
        logging.getLogger("scaleout.transport").addHandler(handler)
        try:
            await link.send(m.Subscribe(kinds=["nope"]))
            assert "unknown event kind(s) nope" in await asyncio.wait_for(errors.get(), 10)
            await link.send(m.Subscribe(buffer=0))
            assert "buffer must be 1 to 65536" in await asyncio.wait_for(errors.get(), 10)
            # Still usable: a snapshot comes back.
            result, _ = await link.request("events.snapshot", {"session_id": None}, timeout=10)
            assert result["seq"] >= 0 and result["clients"] == []
            bad = await asyncio.wait_for(_refused(link, {"session_id": 5}), 10)
            assert "session_id must be a session id" in bad
        finally:
            logging.getLogger("scaleout.transport").removeHandler(handler)
            reader.cancel()
            await link.ws.close()

    asyncio.run(go())


async def _refused(link: Any, args: dict[str, Any]) -> str:
    from scaleout.core.errors import RemoteError

    try:
        await link.request("events.snapshot", args, timeout=10)
    except RemoteError as exc:
        return str(exc)
    raise AssertionError("events.snapshot accepted a bad session_id")


def test_a_client_token_may_not_subscribe(fed: Federation) -> None:
    fed.controller()
    assert fed.conn is not None
    token = fed.token("client")
    conn = fed.conn

    async def go() -> str:
        from scaleout.core.errors import RemoteError
        from scaleout.security.tls import client_context
        from scaleout.transport.net import connect

        link = await connect(conn.url, token, client_context(conn.ca), max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        try:
            try:
                await link.request("events.snapshot", {}, timeout=10)
            except RemoteError as exc:
                return str(exc)
            return "accepted"
        finally:
            reader.cancel()
            await link.ws.close()

    assert "a client token may not do events.snapshot" in asyncio.run(go())
    json.dumps({})  # keeps the json import honest for readers adding JSON checks
