"""Peers that ask and never read what they are sent: they are dropped within a bound, pin no
memory, and never hold up the rounds or another node's admin requests (issue 20 #3)."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import numpy as np
from conftest import Federation, raw_websocket

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.core.payload import encode_named
from test_link_limits import config, rss_mb, ws_frame

TIMEOUT = 10.0
CLOSED = (ConnectionResetError, BrokenPipeError, ssl.SSLError, asyncio.IncompleteReadError)


async def deaf_link(fed: Federation, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A websocket to the controller whose owner writes and never reads, so what the
    controller sends piles up on its side."""
    return await raw_websocket(fed.url, fed.ca, token, deaf=True, timeout=TIMEOUT)


def request(i: int, op: str, args: dict) -> bytes:
    return ws_frame(json.dumps({"v": m.PROTOCOL_VERSION, "type": "request", "id": f"r{i:x}", "op": op, "args": args}).encode())


async def dropped_within(writer: asyncio.StreamWriter, seconds: float) -> bool:
    """True once the controller has dropped the connection (a write fails), False after ``seconds``."""
    deadline = time.monotonic() + seconds
    ping = ws_frame(b"", opcode=9)
    while time.monotonic() < deadline:
        try:
            writer.write(ping)
            await asyncio.wait_for(writer.drain(), 0.5)
        except CLOSED:
            return True
        except asyncio.TimeoutError:
            pass  # the controller is not reading us either: keep asking
        if writer.transport.is_closing():
            return True
        await asyncio.sleep(0.2)  # the next probe; nothing announces a dropped TCP connection
    return False


def test_a_client_that_floods_requests_and_never_reads_is_dropped(fed: Federation) -> None:
    ctl = fed.controller("--config", config(fed, "controller", "send_timeout = 2\n"))
    own = fed.identity("client", "flood")
    baseline = rss_mb(ctl.popen.pid)

    async def go() -> tuple[bool, int, float]:
        _, writer = await deaf_link(fed, own)
        frames = [request(i, "client.assign", {"name": "flood"}) for i in range(100_000)]
        sent = 0
        try:
            for i in range(0, len(frames), 1000):
                writer.write(b"".join(frames[i : i + 1000]))
                await asyncio.wait_for(writer.drain(), TIMEOUT)
                sent = i + 1000
        except CLOSED:
            pass
        except asyncio.TimeoutError:
            pass  # the controller stopped reading us: the check below says whether it dropped us
        dropped = await dropped_within(writer, 20)
        peak = rss_mb(ctl.popen.pid)
        # Meanwhile an admin gets its answers at once.
        status = (await asyncio.wait_for(call_async(fed.conn, "status", {}), TIMEOUT))[0]  # type: ignore[arg-type]
        assert "session" in status
        writer.transport.abort()
        return dropped, sent, max(peak, rss_mb(ctl.popen.pid)) - baseline

    dropped, sent, grown = asyncio.run(go())
    assert dropped, f"the link that never reads is still open 20 s after {sent} requests"
    assert grown < 100, (baseline, grown)  # was +344 MB for 100,000 requests
    log = ctl.text()
    assert "requests unanswered" in log or "the peer took nothing for 2 s" in log, log[-2000:]
    assert fed.admin("status")[0]["session"] is None


def test_a_combiner_that_asks_for_the_model_and_never_reads_holds_up_nothing(fed: Federation) -> None:
    ctl = fed.controller("--config", config(fed, "controller", "send_timeout = 2\n"))
    model = encode_named({"w": np.zeros(1 << 18, dtype=np.float32)}, "dict")  # 1 MiB
    fed.admin("model.set_seed", {}, model)
    rogue = fed.identity("combiner", "rogue")
    assert fed.conn is not None

    async def go() -> dict:
        reader, writer = await deaf_link(fed, rogue)
        writer.write(request(0, "combiner.register", {"name": "rogue"}))
        await writer.drain()
        await asyncio.wait_for(reader.read(1 << 16), TIMEOUT)  # its registration is answered; from now on nothing is read
        writer.write(b"".join(request(i, "model.get", {}) for i in range(1, 21)))  # 20 MiB of replies it will not take
        await writer.drain()
        started = time.monotonic()
        session = (await call_async(fed.conn, "session.start", {"rounds": 1, "min_clients": 1, "round_timeout": 30}))[0]["session"]  # type: ignore[arg-type]
        # An operator stops it: the answer does not wait for the combiner that does not read.
        await asyncio.wait_for(call_async(fed.conn, "session.stop", {"id": session["id"]}), TIMEOUT)  # type: ignore[arg-type]
        done = (await asyncio.wait_for(call_async(fed.conn, "session.wait", {"id": session["id"]}), TIMEOUT))[0]["session"]  # type: ignore[arg-type]
        dropped = await dropped_within(writer, 20)
        writer.transport.abort()
        return {"done": done, "dropped": dropped, "took": time.monotonic() - started}

    out = asyncio.run(go())
    assert out["done"]["status"] == "stopped", out
    assert out["dropped"], out
    log = ctl.text()
    assert "dropping the link to" in log and ("the peer took nothing for 2 s" in log or "a peer that does not read" in log), log[-3000:]


def test_a_peer_that_floods_pings_and_never_reads_the_pongs_is_dropped(fed: Federation) -> None:
    # websockets writes each PONG itself, outside the link's send path: the link watches its buffer.
    ctl = fed.controller("--config", config(fed, "controller", "send_timeout = 2\n"))
    own = fed.identity("client", "pinger")
    baseline = rss_mb(ctl.popen.pid)

    async def go() -> tuple[bool, float, float]:
        _, writer = await deaf_link(fed, own)
        pings = ws_frame(b"p" * 125, opcode=9) * 1000
        started = time.monotonic()
        dropped = False
        while not dropped and time.monotonic() - started < 30:  # was never dropped: RSS +415 MB in 60 s
            try:
                writer.write(pings)
                await asyncio.wait_for(writer.drain(), TIMEOUT)
            except CLOSED:
                dropped = True
            except asyncio.TimeoutError:
                break  # the controller stopped reading us: the check below says whether it dropped us
            dropped = dropped or writer.transport.is_closing()
        dropped = dropped or await dropped_within(writer, 10)
        writer.transport.abort()
        return dropped, time.monotonic() - started, rss_mb(ctl.popen.pid) - baseline

    dropped, spent, grown = asyncio.run(go())
    assert dropped, f"the link that pings and never reads the pongs is still open after {spent:.0f} s"
    assert grown < 150, (baseline, grown)  # loose: bounded by the queued-bytes cap, not by the flood
    log = ctl.text()
    assert "dropping the link to" in log and "the peer took nothing for 2 s" in log, log[-2000:]
    assert fed.admin("status")[0]["session"] is None
