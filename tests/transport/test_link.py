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
import sys
import threading
import tracemalloc
from types import FrameType
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from scaleout.core import messages as m
from scaleout.core.errors import ProtocolError, RemoteError, ScaleoutError
from scaleout.transport.link import CHUNK_BYTES, INLINE_BYTES, PROGRESS_MIN_BYTES, Incoming, Link, LinkClosed, RequestTimeout
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


@contextlib.asynccontextmanager
async def flagged_link(flag: str) -> AsyncIterator[tuple[Link, asyncio.Queue[Incoming], list[Link]]]:
    """``linked`` to a server whose link has ``flag`` (``writable_payloads``, ``file_payloads``)
    set before it runs: the client link, the server's inbox, and the server's link (once it came)."""
    inbox: asyncio.Queue[Incoming] = asyncio.Queue()
    links: list[Link] = []

    async def on_link(link: Link) -> None:
        links.append(link)
        setattr(link, flag, True)
        await link.run(on_message=inbox.put)

    async with linked(on_link) as link:
        yield link, inbox, links


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
    size = 64 * MIB
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
            # One payload-sized buffer plus chunk-sized frames in flight at both ends (a few
            # queued for hashing or built ahead, and up to websockets' queue of 16 while the
            # reader waits for its hashing worker); a copy at the end (the old
            # bytes(bytearray)) would need twice the payload.
            assert peak < size * 1.5, f"peak {peak / MIB:.1f} MiB for a {size / MIB:.0f} MiB payload"

    run(main())


def _pattern(size: int) -> bytes:
    """``size`` bytes that differ chunk by chunk, so a chunk out of place changes the digest."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


@pytest.mark.parametrize("size", [1000, INLINE_BYTES + 1, 3 * CHUNK_BYTES + 5], ids=["inline", "just-threaded", "chunks"])
def test_payloads_are_checked_whatever_their_size(size: int) -> None:
    """Hashed on the loop or by a worker, a payload is whole or refused, as it always was."""
    data = _pattern(size)

    async def main() -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        async with linked(await _server_with_inbox(inbox, max_in_flight=8)) as link:
            async def get() -> Incoming:
                return await asyncio.wait_for(inbox.get(), 10)

            await link.send_with_blob(carrier("good"), data)
            assert (await get()).blob == data

            await link.send_with_blob(carrier("bad"), data, sha256=hashlib.sha256(data[:-1]).hexdigest())
            bad = await get()
            assert bad.blob is None and bad.blob_error is not None and "corrupt" in bad.blob_error

            # More bytes than announced: refused at the chunk that overflows, the rest dropped.
            transfer = "b" * m.TRANSFER_ID_BYTES
            await link.send(m.BlobStart(transfer=transfer, size=size - 1, sha256=hashlib.sha256(data[:-1]).hexdigest()))
            for offset in range(0, size, CHUNK_BYTES):
                await link.ws.send(transfer.encode() + data[offset : offset + CHUNK_BYTES])
            await link.send(carrier("long", transfer))
            long = await get()
            assert long.blob is None and long.blob_error == f"payload is larger than the announced {size - 1} bytes"

            # Fewer bytes than announced, then a message that claims it anyway.
            transfer = "c" * m.TRANSFER_ID_BYTES
            await link.send(m.BlobStart(transfer=transfer, size=size + 1, sha256=hashlib.sha256(data + b"x").hexdigest()))
            for offset in range(0, size, CHUNK_BYTES):
                await link.ws.send(transfer.encode() + data[offset : offset + CHUNK_BYTES])
            await link.send(carrier("short", transfer))
            short = await get()
            assert short.blob is None and short.blob_error == "payload was referred to before all of it arrived"

            await link.send_with_blob(carrier("after"), data)  # the link still works
            assert (await get()).blob == data

    run(main())


def test_sha256_runs_in_worker_threads_not_on_the_event_loop() -> None:
    """Both ends of a large transfer hash it off the loop; the loop only creates empty digests.

    Watched with a profile hook (the interpreter's own record of C calls, per thread): the
    sender hashes the payload it was not given a digest for, the receiver hashes chunks.
    """
    size = 3 * CHUNK_BYTES + 7
    data = _pattern(size)
    loop_thread = threading.get_ident()
    calls: list[tuple[bool, str, str]] = []  # (on the loop thread, what was called, by which function)

    def watch(frame: FrameType, event: str, arg: object) -> None:
        if event != "c_call":
            return
        hashing = arg is hashlib.sha256 or (getattr(arg, "__name__", "") == "update" and hasattr(getattr(arg, "__self__", None), "hexdigest"))
        if hashing:
            name = "sha256" if arg is hashlib.sha256 else "update"
            calls.append((threading.get_ident() == loop_thread, name, frame.f_code.co_name))

    async def main() -> None:
        async def on_link(server_link: Link) -> None:
            await server_link.run(on_request=echo)

        async with linked(on_link) as link:
            result, blob = await link.request("echo", blob=data, timeout=30)
            assert result["size"] == size and blob == data

    threading.setprofile(watch)  # type: ignore[arg-type]
    sys.setprofile(watch)  # type: ignore[arg-type]
    try:
        run(main())
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    on_loop = [c for c in calls if c[0]]
    elsewhere = [c for c in calls if not c[0]]
    # Each side sends once (a request, then its reply), unhashed: two whole-payload digests
    # in workers; each side receives once: updates in workers, one empty digest on the loop.
    assert on_loop == [(True, "sha256", "__init__")] * 2, on_loop
    assert sum(1 for c in elsewhere if c[1] == "sha256") == 2, elsewhere
    assert sum(1 for c in elsewhere if c[1] == "update") >= 2 * 4, elsewhere  # at least a chunk each


def test_progress_is_told_both_ways_and_replaces_the_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    """A request's blob reports its sending, the link its arriving payloads; roles still log."""
    size = PROGRESS_MIN_BYTES + 3 * CHUNK_BYTES + 11
    data = _pattern(size)
    sent: list[tuple[int, int]] = []
    received: list[tuple[int, int]] = []

    def check(reports: list[tuple[int, int]]) -> None:
        assert reports[0] == (0, size) and reports[-1] == (size, size), (reports[:2], reports[-2:])
        done = [d for d, total in reports]
        assert done == sorted(done) and {total for _, total in reports} == {size}
        assert len(reports) == 1 + -(-size // CHUNK_BYTES)  # the start, then once a chunk

    async def main() -> None:
        async def on_link(server_link: Link) -> None:
            await server_link.run(on_request=echo)

        async with linked(on_link) as link:
            link.receive_progress = lambda done, total: received.append((done, total))
            result, blob = await link.request("echo", blob=data, timeout=30, progress=lambda done, total: sent.append((done, total)))
            assert result["size"] == size and blob == data

    with caplog.at_level(logging.INFO, logger="scaleout.transport"):
        run(main())
    check(sent)
    check(received)
    lines = [r.getMessage() for r in caplog.records if "payload from" in r.getMessage()]
    # The server's link has no callback: it logs as roles always did (at 25 % steps); the
    # client's link, told its progress, logs none.
    assert lines and all(line.startswith("receiving payload from 127.0.0.1:") for line in lines), lines


def test_a_result_too_large_for_a_frame_comes_as_the_payload() -> None:
    big = {"rows": [{"name": f"client-{i:06d}", "status": "online"} for i in range(40_000)]}  # ~1.6 MB of JSON

    async def main() -> None:
        async def on_link(link: Link) -> None:
            async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
                return (big if req.op == "big" else {"small": True}), None

            await link.run(on_request=on_request)

        async with linked(on_link) as link:
            result, blob = await link.request("big", timeout=30)
            assert result == big and blob is None
            assert await link.request("small", timeout=30) == ({"small": True}, None)

    run(main())


def test_binary_frames_written_as_views_match_websockets_own():
    """A chunk frame written in pieces (header, tag, view of the chunk) is byte for byte the
    frame websockets would serialize; a client's is masked with the key it carries."""
    from websockets.frames import Frame, Opcode, apply_mask

    from scaleout.transport.link import _binary_frame

    tag = b"0123456789abcdef"
    for size in (0, 1, 109, 110, 65519, 65520, 1 << 20):
        chunk = memoryview(bytes(range(256)) * (size // 256 + 1))[:size]
        plain = b"".join(_binary_frame((tag, chunk), masked=False))
        assert plain == Frame(Opcode.BINARY, tag + bytes(chunk)).serialize(mask=False)
        masked = b"".join(_binary_frame((tag, chunk), masked=True))
        head = len(plain) - len(tag) - size
        assert masked[0] == plain[0] and masked[1] == plain[1] | 0x80 and masked[2:head] == plain[2:head]
        key = masked[head : head + 4]
        assert apply_mask(masked[head + 4 :], key) == tag + bytes(chunk)


def test_a_peer_that_stops_reading_holds_one_frame_of_a_shared_send_budget() -> None:
    """One payload sent to two peers under one byte budget: the peer that reads gets all of
    it, checked, while the one that stopped reading (nothing runs its link, so its socket
    fills up) holds at most one frame of the budget; the budget bounds the bytes, not the peers."""
    from scaleout.transport.budget import ByteBudget

    data = _pattern(32 * MIB)  # more than loopback socket buffers and websockets' queue take

    async def main() -> None:
        servers: list[Link] = []
        joined: asyncio.Queue[Link] = asyncio.Queue()

        async def on_link(link: Link) -> None:
            servers.append(link)
            await joined.put(link)
            await link.run()

        server, port = await serve(on_link, lambda token: None, "127.0.0.1", 0, None, max_payload=64 * MIB)
        reader_link = await connect(f"ws://127.0.0.1:{port}", "token", None, max_payload=64 * MIB)
        to_reader = await asyncio.wait_for(joined.get(), 10)
        deaf = await connect(f"ws://127.0.0.1:{port}", "token", None, max_payload=64 * MIB)  # its run() never starts
        to_deaf = await asyncio.wait_for(joined.get(), 10)
        got: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

        async def on_message(inc: Incoming) -> None:
            got.set_result(inc.take_blob())

        reading = asyncio.create_task(reader_link.run(on_message=on_message))
        budget = ByteBudget(2 * CHUNK_BYTES)
        stuck = asyncio.create_task(to_deaf.send_with_blob(carrier("t-deaf"), data, budget=budget))
        await to_reader.send_with_blob(carrier("t-good"), data, budget=budget)
        assert await asyncio.wait_for(got, 30) == data  # and its sha256 was checked on arrival
        assert not stuck.done()
        assert budget.used <= CHUNK_BYTES and to_deaf._queued <= CHUNK_BYTES + m.TRANSFER_ID_BYTES
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError, LinkClosed):
            await stuck
        assert budget.used == 0
        for link in (reader_link, deaf):
            link.ws.transport.abort()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        server.close()

    run(main())


def test_a_payload_in_pieces_arrives_as_their_bytes_and_checked() -> None:
    """Pieces (a header, then views of arrays, some larger than a chunk, one empty) are sent
    without being joined and arrive as the joined bytes, their sha256 checked."""
    import numpy as np

    from scaleout.transport.link import Pieces

    parts = [b"head" * 3, np.arange(3 * CHUNK_BYTES // 8 + 5, dtype=np.float64).data, b"", np.ones(17, np.float32).view(np.uint8).data]
    data = Pieces(parts)
    joined = b"".join(bytes(p) for p in parts)
    assert len(data) == len(joined) and data.sha256() == hashlib.sha256(joined).hexdigest()

    async def main() -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()
        async with linked(await _server_with_inbox(inbox, max_in_flight=8)) as link:
            await link.send_with_blob(carrier("pieces"), data)
            got = await asyncio.wait_for(inbox.get(), 10)
            assert got.blob_error is None and got.blob == joined

    run(main())


def test_idle_links_keep_no_task_or_timer_to_watch_their_writes() -> None:
    # 10,000 clients: a 1 s sleep per link to look at its write buffer woke each combiner
    # ~1,200 times a second with no round. The watch now runs only while bytes wait.
    async def main() -> None:
        async def on_link(server_link: Link) -> None:
            await server_link.run(on_request=echo)

        async with linked(on_link) as link:
            reply, blob = await link.request("echo", blob=b"x" * 1000, timeout=10)
            assert blob == b"x" * 1000
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            watching = [t for t in others if "_watch_writes" in t.get_coro().__qualname__]
            assert not watching, watching
            from scaleout.transport.link import _WriteWatch

            watch = _WriteWatch.of(asyncio.get_running_loop())
            assert not watch.links and watch.timer is None  # nothing waits to be written on loopback

    run(main())


def test_payloads_arriving_while_writable_payloads_is_set_are_handed_over_writable() -> None:
    """Writable (a bytearray; a larger one an anonymous mapping, not zero-filled on the
    loop first), checked like bytes, so its taker may work in it in place (the controller
    takes a combiner's partial as the round's sums); bytes again once the flag is off."""
    import mmap

    data = _pattern(3 * CHUNK_BYTES + 5)

    async def main() -> None:
        async with flagged_link("writable_payloads") as (link, inbox, links):
            await link.send_with_blob(carrier("writable"), data)
            got = await asyncio.wait_for(inbox.get(), 10)
            assert type(got.blob) is mmap.mmap and not memoryview(got.blob).readonly and got.blob[:] == data
            await link.send_with_blob(carrier("small"), data[:1000])
            small = await asyncio.wait_for(inbox.get(), 10)
            assert type(small.blob) is bytearray and small.blob == data[:1000]
            await link.send_with_blob(carrier("bad"), data, sha256="0" * 64)
            bad = await asyncio.wait_for(inbox.get(), 10)
            assert bad.blob is None and bad.blob_error is not None and "corrupt" in bad.blob_error
            links[0].writable_payloads = False
            await link.send_with_blob(carrier("bytes"), data)
            assert type((await asyncio.wait_for(inbox.get(), 10)).blob) is bytes

    run(main())


def test_payloads_arriving_while_file_payloads_is_set_are_written_to_a_file_and_handed_over_mapped() -> None:
    """A payload larger than INLINE_BYTES goes to an unnamed temporary file as it arrives and
    is handed over as a read-only mapping of it, checked like bytes (a corrupt one refused);
    a small one stays bytes; bytes again once the flag is off (a combiner's pulled update)."""
    import mmap

    from scaleout.transport.link import INLINE_BYTES

    data = _pattern(3 * CHUNK_BYTES + 5)

    async def main() -> None:
        async with flagged_link("file_payloads") as (link, inbox, links):
            await link.send_with_blob(carrier("mapped"), data)
            got = await asyncio.wait_for(inbox.get(), 10)
            assert type(got.blob) is mmap.mmap and got.blob[:] == data
            with pytest.raises(TypeError):
                got.blob[0] = 1  # type: ignore[index]  # read-only
            await link.send_with_blob(carrier("bad"), data, sha256="0" * 64)
            bad = await asyncio.wait_for(inbox.get(), 10)
            assert bad.blob is None and bad.blob_error is not None and "corrupt" in bad.blob_error
            await link.send_with_blob(carrier("small"), data[:INLINE_BYTES])
            assert type((await asyncio.wait_for(inbox.get(), 10)).blob) is bytes
            links[0].file_payloads = False
            await link.send_with_blob(carrier("bytes"), data)
            assert type((await asyncio.wait_for(inbox.get(), 10)).blob) is bytes

    run(main())


def test_a_payload_that_finds_no_room_for_its_file_is_refused_and_the_link_goes_on(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No temporary folder (or a full one): that payload is refused, saying so, not the link."""
    import tempfile

    data = _pattern(3 * CHUNK_BYTES + 5)

    async def main() -> None:
        async with flagged_link("file_payloads") as (link, inbox, _):
            monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))
            await link.send_with_blob(carrier("nowhere"), data)
            got = await asyncio.wait_for(inbox.get(), 10)
            assert got.blob is None and got.blob_error is not None and "could not be stored" in got.blob_error
            monkeypatch.undo()
            await link.send_with_blob(carrier("again"), data)
            assert (await asyncio.wait_for(inbox.get(), 10)).blob[:] == data

    run(main())


def test_a_received_payload_comes_with_the_sha256_it_was_checked_against() -> None:
    """Incoming.sha256 and request_checked's digest are the payload's, as checked on receipt,
    so a taker comparing it with a model id need not hash it again; a refused one has none."""
    data = _pattern(2 * CHUNK_BYTES + 3)
    digest = hashlib.sha256(data).hexdigest()

    async def main() -> None:
        inbox: asyncio.Queue[Incoming] = asyncio.Queue()

        async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
            return {}, data

        async def on_link(link: Link) -> None:
            await link.run(on_message=inbox.put, on_request=on_request)

        async with linked(on_link) as link:
            await link.send_with_blob(carrier("good"), data)
            got = await asyncio.wait_for(inbox.get(), 10)
            assert got.blob == data and got.sha256 == digest
            await link.send_with_blob(carrier("bad"), data, sha256="0" * 64)
            bad = await asyncio.wait_for(inbox.get(), 10)
            assert bad.blob is None and bad.sha256 is None and "corrupt" in (bad.blob_error or "")
            result, blob, checked = await link.request_checked("get", timeout=10)
            assert blob == data and checked == digest
            assert await link.request("get", timeout=10) == ({}, data)

    run(main())


def test_a_landing_check_is_fed_one_file_payloads_chunks_in_order_and_knows_which_payload_it_judged() -> None:
    """``Link.landing`` goes to the next payload written to a file whose size it expects (then
    is cleared): it is fed every byte, in order, in pieces of at most LANDING_BYTES, and learns
    which payload it judged only once that payload's digest matched. A decoy of the same size
    sent first takes it, so the payload after it is not the one judged (a combiner then checks
    that one whole); a corrupt payload is never marked judged."""
    import numpy as np

    from scaleout.core import payload
    from scaleout.core.aggregators.landing import LandingCheck
    from scaleout.transport.link import LANDING_BYTES

    good = payload.encode({"w": np.ones(800_000, np.float32)})  # 3.2 MB: four chunks
    bad = np.ones(800_000, np.float32)
    bad[-1] = np.nan
    poisoned = payload.encode({"w": bad})
    assert len(good) == len(poisoned)
    template = payload.describe(good)

    class Recorded(LandingCheck):
        pieces: list[tuple[int, int]] = []

        def feed(self, offset: int, chunk: Any) -> None:
            self.pieces.append((offset, len(chunk)))
            super().feed(offset, chunk)

    async def main() -> None:
        async with flagged_link("file_payloads") as (link, inbox, links):
            server = links[0]
            check = server.landing = Recorded(template, len(good))
            await link.send_with_blob(carrier("first"), good)
            first = await asyncio.wait_for(inbox.get(), 10)
            assert server.landing is None and check.payload is first.blob and check.verdict() is not None
            at = 0
            for offset, size in check.pieces:
                assert offset == at and 0 < size <= LANDING_BYTES
                at += size
            assert at == len(good)
            # A decoy first: it takes the check; the poisoned payload after it is not what was judged.
            decoy = server.landing = LandingCheck(template, len(good))
            await link.send_with_blob(carrier("decoy"), good)
            await link.send_with_blob(carrier("poisoned"), poisoned)
            got = [await asyncio.wait_for(inbox.get(), 10) for _ in range(2)]
            assert decoy.payload is got[0].blob and decoy.payload is not got[1].blob and decoy.verdict() is not None
            # A corrupt payload: fed, never marked judged.
            corrupt = server.landing = LandingCheck(template, len(good))
            await link.send_with_blob(carrier("corrupt"), good, sha256="0" * 64)
            refused = await asyncio.wait_for(inbox.get(), 10)
            assert refused.blob is None and corrupt.payload is None

    run(main())
