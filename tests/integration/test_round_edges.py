"""A round survives one node that freezes or drops at its edges (issue 19 #19, #20).

A client frozen with SIGSTOP while it trains must not fail its combiner's round: nothing at
a round's end waits on that client's socket. A combiner whose link drops as a round starts
(between the controller's selection and its round.start) is lost to that round, not a
KeyError that ends the session.
"""

from __future__ import annotations

import asyncio
import fcntl
import signal
import struct
import termios
import time
from typing import Any

import numpy as np
from conftest import FIXTURES, Federation, wait_stdout

from scaleout.commands.admin import call_async
from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.security.tls import client_context
from scaleout.transport.link import Incoming, Link
from scaleout.transport.net import connect

SLOW = FIXTURES / "slow_client"
WAIT = 60.0
# A model larger than every buffer between two processes on loopback (socket buffers, the
# receiver's frame queue): a peer that does not read makes a send of it wait.
BIG_FLOATS = 8 << 20  # 32 MiB of float32


def big_seed(fed: Federation) -> str:
    data = payload.encode([np.zeros(BIG_FLOATS, dtype=np.float32)])
    return str(fed.admin("model.set_seed", {}, data)[0]["id"])


def test_a_client_frozen_while_training_does_not_fail_the_round(fed: Federation) -> None:
    fed.controller()
    big_seed(fed)
    fed.combiner("c1")
    fed.client("good", package=SLOW)
    frozen = fed.client("frozen", package=SLOW)
    fed.wait_clients(2)
    cfg = {"rounds": 2, "min_clients": 1, "round_timeout": 8, "validate": False, "settings": {"slow_s": 1}}
    session = fed.admin("session.start", cfg)[0]["session"]
    try:
        wait_stdout(frozen, "slow_client: training")
        frozen.popen.send_signal(signal.SIGSTOP)
        # Round 1 times out on the frozen client; round 2's model to it cannot be sent (it does
        # not read), and its abort notice at round 2's deadline cannot either: neither may keep
        # the combiner from reporting the other client's update in time.
        done = fed.admin("session.wait", {"id": session["id"]}, timeout=WAIT * 2)[0]["session"]
    finally:
        frozen.popen.kill()  # a stopped process takes SIGKILL (SIGTERM would wait for SIGCONT)
        frozen.popen.wait()
    assert done["status"] == "finished", done
    assert [(r["status"], r["participants"]) for r in done["rounds"]] == [("succeeded", ["good"])] * 2, done["rounds"]
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]
    errors = {r["client"]: r["error"] for r in shown["rounds"][1]["clients"]}
    assert errors["good"] is None and errors["frozen"], errors  # the frozen one is named, with why


async def wait_stalled(link: Link) -> None:
    """Wait until ``link``'s peer (the controller) can send it nothing more: its reader has
    stopped taking frames, and the bytes waiting in our socket no longer grow (the kernel's
    buffers are full, so the peer's sends wait). Polled: there is no event for it."""
    transport = link.ws.transport
    fd = transport.get_extra_info("socket").fileno()
    seen, steady = -1, 0
    deadline = time.monotonic() + WAIT
    while steady < 5:
        assert time.monotonic() < deadline, "the controller's sends never stalled"
        waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
        steady = steady + 1 if waiting == seen and waiting > 0 and not transport.is_reading() else 0
        seen = waiting
        await asyncio.sleep(0.1)


async def raw_combiner(fed: Federation, token: str, name: str, client: str) -> tuple[Link, asyncio.Task[None]]:
    """A combiner spoken by hand: registered, ready, announcing one client, reading nothing but replies."""
    link = await connect(fed.url, token, client_context(fed.ca), max_payload=1 << 30)

    async def ignore(inc: Incoming) -> None:
        pass

    reader = asyncio.create_task(link.run(on_message=ignore))
    await link.request("combiner.register", {"name": name}, timeout=WAIT)
    await link.request("combiner.ready", {"url": "wss://127.0.0.1:9"}, timeout=WAIT)
    await link.send(m.ClientsChanged(joined=[client], reset=True))
    return link, reader


def test_a_combiner_dropping_as_the_round_starts_is_lost_to_it_not_a_crash(fed: Federation) -> None:
    fed.controller()
    seed = big_seed(fed)
    # Selected in name order: a-stall is sent its round.start first, and b-gone leaves meanwhile.
    tokens = {name: fed.identity("combiner", name) for name in ("a-stall", "b-gone")}
    fed.combiner("c1")
    fed.client("good", package=SLOW)
    assert fed.conn is not None
    conn = fed.conn

    async def go() -> dict[str, Any]:
        a, a_reader = await raw_combiner(fed, tokens["a-stall"], "a-stall", "ghost-a")
        b, b_reader = await raw_combiner(fed, tokens["b-gone"], "b-gone", "ghost-b")
        watcher = await connect(conn.url, conn.token, client_context(conn.ca), max_payload=1 << 20)
        events: asyncio.Queue[m.FedEvent] = asyncio.Queue()

        async def collect(inc: Incoming) -> None:
            if isinstance(inc.msg, m.Event):
                events.put_nowait(m.decode_event(inc.msg))

        async def next_event(kind: type[m.FedEvent]) -> Any:
            while not isinstance(ev := await asyncio.wait_for(events.get(), WAIT), kind):
                pass
            return ev

        watch_reader = asyncio.create_task(watcher.run(on_message=collect))
        try:
            await watcher.send(m.Subscribe(kinds=["round.started", "combiner.left"]))
            await asyncio.wait_for(call_async(conn, "client.wait", {"count": 3, "timeout": WAIT}), WAIT)
            # a-stall asks for the big model and stops reading as it starts to arrive: the
            # controller's sends to it wait from now on.
            stalled = asyncio.Event()

            def stall(done: int, total: int) -> None:
                a_reader.cancel()
                stalled.set()

            a.receive_progress = stall
            await a.send(m.Request(op="model.get", args={"id": seed}))
            await asyncio.wait_for(stalled.wait(), WAIT)
            await wait_stalled(a)
            cfg = {"rounds": 1, "min_clients": 1, "round_timeout": 10, "validate": False}
            session = (await call_async(conn, "session.start", cfg))[0]["session"]
            started = await next_event(m.RoundStarted)
            assert started.expected == 3, started  # ghost-a, ghost-b and good were selected
            # While the controller waits to send a-stall its round.start, b-gone leaves...
            await b.ws.close()
            left = await next_event(m.CombinerLeft)
            assert left.combiner == "b-gone", left
            a.ws.transport.abort()  # ...and a-stall drops: the controller moves on to b-gone, gone since
            done = (await asyncio.wait_for(call_async(conn, "session.wait", {"id": session["id"]}), WAIT))[0]["session"]
            status = (await call_async(conn, "status"))[0]  # the controller still answers
            assert status["session"] is None, status
            return done  # type: ignore[no-any-return]
        finally:
            for reader in (a_reader, b_reader, watch_reader):
                reader.cancel()
            await watcher.ws.close()

    done = asyncio.run(go())
    assert "internal error" not in str(done), done
    assert done["status"] == "finished", done
    (rnd,) = done["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["good"], rnd
