"""A network blip mid-round: the client reconnects and its update still counts.

A TCP proxy (in this test process, on 127.0.0.1 port 0) sits between the client and its
combiner, which advertises the proxy's address; cutting every proxied connection is the
blip. Nothing is mocked: both sides see a real connection loss.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from conftest import FIXTURES, QUICKSTART, Federation, Proc, wait_stdout


class Proxy:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.target: int | None = None
        self.blocked = False  # refuse new connections: the network is down
        self.writers: set[asyncio.StreamWriter] = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.target is not None
        if self.blocked:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> int:
        """Drop every proxied connection at once; returns how many sockets were closed."""

        async def close_all() -> int:
            writers, self.writers = self.writers, set()
            for w in writers:
                w.transport.abort()
            return len(writers)

        return asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(10)

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def proxied_federation(fed: Federation, proxy: Proxy) -> tuple[Proc, Proc]:
    """Controller, a combiner advertising the proxy, and one slow client behind it."""
    fed.controller()
    fed.seed_from(QUICKSTART)
    args = ["combine", "--controller", fed.url, "--token", fed.token("combiner"), "--ca", fed.ca, "--name", "c1", "--port", "0", "--advertise", f"127.0.0.1:{proxy.port}"]
    combiner = Proc("c1", args, fed.logs, True)
    fed.procs.append(combiner)
    assert combiner.url is not None
    proxy.target = int(combiner.url.rsplit(":", 1)[1])
    slow = fed.client("slow", package=FIXTURES / "slow_client")
    fed.wait_clients(1)
    return combiner, slow


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


def test_update_sent_after_a_blip_still_counts(fed: Federation, proxy: Proxy) -> None:
    combiner, slow = proxied_federation(fed, proxy)
    started = fed.admin("session.start", {"rounds": 1, "min_clients": 1, "round_timeout": 60, "validate": False, "settings": {"slow_s": 3}})[0]
    wait_stdout(slow, "slow_client: training")
    assert proxy.cut() >= 2  # the client's link to its combiner is gone, mid-training
    session = fed.admin("session.wait", {"id": started["session"]["id"]})[0]["session"]
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["slow"], rnd
    assert "is back and still working on its train task" in combiner.text()


def test_result_finished_while_offline_is_sent_on_reconnect(fed: Federation, proxy: Proxy) -> None:
    _, slow = proxied_federation(fed, proxy)
    started = fed.admin("session.start", {"rounds": 1, "min_clients": 1, "round_timeout": 60, "validate": False, "settings": {"slow_s": 2}})[0]
    wait_stdout(slow, "slow_client: training")
    proxy.blocked = True
    assert proxy.cut() >= 2
    wait_stdout(slow, "slow_client: trained")  # finished while the network is down
    proxy.blocked = False
    session = fed.admin("session.wait", {"id": started["session"]["id"]})[0]["session"]
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["slow"], rnd
    log = slow.text()
    assert "keeping it until we reconnect" in log and "kept while disconnected" in log, log
