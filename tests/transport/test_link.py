"""Link over a real websocket on 127.0.0.1, port 0: typed errors and per-link limits.

Plain ws:// is enough here: TLS is net.py's and security/tls.py's concern, not the link's.
Every test runs under `run`, which fails on any asyncio "exception was never retrieved".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from scaleout.core import messages as m
from scaleout.core.errors import ProtocolError, RemoteError, ScaleoutError
from scaleout.transport.link import Incoming, Link, LinkClosed, RequestTimeout
from scaleout.transport.net import connect, serve

MIB = 1 << 20



def carrier(task_id: str, blob: str | None = None) -> m.Task:
    """A message that refers to a payload, as a task refers to its model."""
    return m.Task(task_id=task_id, kind="train", session_id="s", round_index=1, model_id="m", blob=blob)

def run(main: Coroutine[Any, Any, None]) -> None:
    """asyncio.run, failing on anything the loop would only log (never-retrieved exceptions)."""
    problems: list[dict[str, Any]] = []

    async def wrapper() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: problems.append(ctx))
        await main
        gc.collect()  # a dropped future with an unread exception reports itself here

    asyncio.run(wrapper())
    assert not problems, [p.get("message") for p in problems]


@contextlib.asynccontextmanager
async def linked(on_link: Callable[[Link], Awaitable[None]], max_payload: int = 64 * MIB) -> AsyncIterator[Link]:
    """A client link, its reader running, to a server whose side is handled by ``on_link``."""
    server, port = await serve(on_link, lambda token: None, "127.0.0.1", 0, None, max_payload=max_payload)
    link = await connect(f"ws://127.0.0.1:{port}", "token", None, max_payload=64 * MIB)
    reader = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        await link.ws.close()
        await reader
        server.close()
        await server.wait_closed()


async def echo(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
    return {"op": req.op, "size": None if blob is None else len(blob)}, blob


# -- typed errors ---------------------------------------------------------------------


def test_request_timeout_is_a_scaleout_error_and_a_late_reply_is_harmless() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def slow(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
            if req.op == "slow":
                await release.wait()
            return await echo(req, blob)

        async def on_link(server_link: Link) -> None:
            await server_link.run(on_request=slow)

        async with linked(on_link) as link:
            with pytest.raises(RequestTimeout) as info:
                await link.request("slow", timeout=0.2)
            assert isinstance(info.value, ScaleoutError) and info.value.code == "timeout"
            assert info.value.op == "slow" and "did not answer slow within 0.2 s" in str(info.value)
            release.set()  # the reply to the abandoned request now arrives and is dropped
            result, _ = await link.request("after", timeout=5)
            assert result["op"] == "after"

    run(main())


def test_pending_request_fails_with_link_closed_when_the_peer_closes() -> None:
    async def main() -> None:
        async def on_link(server_link: Link) -> None:
            async def close_instead(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
                await server_link.ws.close(1001, "going away")
                return {}, None

            await server_link.run(on_request=close_instead)

        async with linked(on_link) as link:
            with pytest.raises(LinkClosed) as info:
                await link.request("anything", timeout=10)
            assert info.value.code == "link_closed"
            assert "going away" in str(info.value)
            # Once the link is closed, sends and requests fail at once with the same type.
            with pytest.raises(LinkClosed):
                await link.send(m.Hello(name="late"))
            with pytest.raises(LinkClosed):
                await link.send_blob(b"x" * 10)
            with pytest.raises(LinkClosed):
                await link.request("again", timeout=10)

    run(main())


def test_link_closed_during_a_blob_send_leaves_no_unretrieved_exception() -> None:
    """The reader fails the pending reply while the request is still streaming its blob."""

    async def main() -> None:
        async def on_link(server_link: Link) -> None:
            await server_link.ws.recv()  # the BlobStart
            server_link.ws.transport.abort()  # drop the connection mid-payload

        async with linked(on_link) as link:
            with pytest.raises(LinkClosed):
                await link.request("upload", blob=bytes(32 * MIB), timeout=10)
            assert not link._pending

    run(main())


# -- per-link limits -------------------------------------------------------------------


def test_max_payload_refuses_larger_payloads_and_can_change_while_running() -> None:
    async def main() -> None:
        async def on_link(server_link: Link) -> None:
            async def handle(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
                if req.op == "raise":
                    server_link.max_payload = int(req.args["to"])
                    return {}, None
                return await echo(req, blob)

            await server_link.run(on_request=handle)

        async with linked(on_link, max_payload=1024) as link:
            with pytest.raises(RemoteError, match="exceeds the limit of 1.0 KiB") as info:
                await link.request("echo", blob=b"x" * 4096, timeout=5)
            assert info.value.code == ProtocolError.code
            result, blob = await link.request("echo", blob=b"y" * 1024, timeout=5)
            assert result["size"] == 1024 and blob == b"y" * 1024
            await link.request("raise", {"to": 8192}, timeout=5)
            result, _ = await link.request("echo", blob=b"x" * 4096, timeout=5)
            assert result["size"] == 4096

    run(main())


async def _server_with_inbox(inbox: asyncio.Queue[Incoming], max_in_flight: int) -> Callable[[Link], Awaitable[None]]:
    async def on_link(server_link: Link) -> None:
        server_link.max_in_flight = max_in_flight

        async def on_message(inc: Incoming) -> None:
            await inbox.put(inc)

        await server_link.run(on_message=on_message)

    return on_link


def test_max_in_flight_refuses_a_second_concurrent_payload(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        async with linked(await _server_with_inbox(inbox, max_in_flight=1)) as link:
            # A payload announced and never finished occupies the only slot...
            await link.send(m.BlobStart(transfer="a" * m.TRANSFER_ID_BYTES, size=10, sha256="0" * 64))
            # ...so the next one is refused, its chunks dropped quietly, and the message
            # naming it is told why.
            await link.send_with_blob(carrier("t1"), b"z" * (3 * MIB))
            inc = await asyncio.wait_for(inbox.get(), 5)
            assert inc.blob is None and inc.blob_error == "too many payloads in flight (limit 1)"

    with caplog.at_level(logging.WARNING, logger="scaleout.transport"):
        run(main())
    complaints = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad message")]
    assert len(complaints) == 1 and "too many payloads in flight" in complaints[0]


def test_unclaimed_payloads_are_bounded_by_max_in_flight() -> None:
    async def main() -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        async with linked(await _server_with_inbox(inbox, max_in_flight=1)) as link:
            first = await link.send_blob(b"first")
            second = await link.send_blob(b"second")  # evicts the unclaimed first one
            await link.send(carrier("t1", first))
            await link.send(carrier("t2", second))
            one, two = await asyncio.wait_for(inbox.get(), 5), await asyncio.wait_for(inbox.get(), 5)
            assert one.blob is None and one.blob_error is not None and "unknown payload" in one.blob_error
            assert two.blob == b"second" and two.blob_error is None

    run(main())


# -- payload bytes -----------------------------------------------------------------------


def test_known_sha256_is_sent_as_given() -> None:
    """send_blob trusts the caller's digest (a model id): a wrong one is caught by the receiver."""

    async def main() -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        data = b"model bytes" * 1000
        async with linked(await _server_with_inbox(inbox, max_in_flight=8)) as link:
            await link.send_with_blob(carrier("ok"), data, sha256=hashlib.sha256(data).hexdigest())
            await link.send_with_blob(carrier("bad"), data, sha256="0" * 64)
            good, bad = await asyncio.wait_for(inbox.get(), 5), await asyncio.wait_for(inbox.get(), 5)
            assert good.blob == data
            assert bad.blob is None and bad.blob_error is not None and "corrupt" in bad.blob_error

    run(main())


def test_received_payload_is_bytes_and_never_copied_whole() -> None:
    """Chunks land in one buffer of the announced size, handed out as is: no second copy."""
    size = 32 * MIB
    data = bytes(range(256)) * (size // 256)

    async def main() -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        async with linked(await _server_with_inbox(inbox, max_in_flight=1)) as link:
            tracemalloc.start()
            try:
                await link.send_with_blob(carrier("t"), data)
                inc = await asyncio.wait_for(inbox.get(), 10)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert type(inc.blob) is bytes and inc.blob == data
            # One payload-sized buffer plus a few chunk-sized frames; a copy at the end
            # (the old bytes(bytearray)) would need twice the payload.
            assert peak < size * 1.5, f"peak {peak / MIB:.1f} MiB for a {size / MIB:.0f} MiB payload"

    run(main())
