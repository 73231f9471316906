"""Adaptive TLS read buffers: an idle link keeps a small one, a bulk transfer grows it,
and it shrinks back once the transfer is over."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from scaleout.core import messages as m
from scaleout.security import tls
from scaleout.transport import tlsbuffers
from scaleout.transport.link import Incoming, Link
from scaleout.transport.net import connect, serve


def buffer_size(link: Link) -> int:
    return len(link.ws.transport._ssl_protocol._ssl_buffer)


@contextlib.asynccontextmanager
async def linked(files: tls.TlsFiles) -> AsyncIterator[tuple[Link, asyncio.Queue[Link], asyncio.Queue[Incoming]]]:
    """A client link to a server of ours over TLS on loopback: (the client's link, a queue of
    the server's links, a queue of what the server received)."""
    server_side: asyncio.Queue[Link] = asyncio.Queue()
    got: asyncio.Queue[Incoming] = asyncio.Queue()

    async def on_link(link: Link) -> None:
        await server_side.put(link)

        async def on_message(inc: Incoming) -> None:
            await got.put(inc)

        await link.run(on_message=on_message)

    ctx = tls.server_context(files.cert, files.key)
    server, port = await serve(on_link, lambda token: None, "127.0.0.1", 0, ctx, max_payload=64 << 20)
    link = await connect(f"wss://127.0.0.1:{port}", "token", tls.client_context(files.ca_cert), max_payload=64 << 20)
    reader = asyncio.create_task(link.run())
    try:
        yield link, server_side, got
    finally:
        link.ws.transport.abort()
        reader.cancel()
        server.close()
        await server.wait_closed()


def test_idle_small_bulk_large_then_small_again(tmp_path: Path) -> None:
    assert tlsbuffers.install()  # net.py installed it already: idempotent
    files = tls.ensure_controller_tls(tmp_path, ["127.0.0.1"])

    async def main() -> None:
        async with linked(files) as (link, server_side, got):
            await link.send(m.Hello(name="idle"))
            await asyncio.wait_for(got.get(), 10)
            far = await asyncio.wait_for(server_side.get(), 10)
            assert buffer_size(far) == tlsbuffers.INITIAL
            await link.send_with_blob(m.Task(task_id="t", kind="train", session_id="s", round_index=1, model_id="m"), b"x" * (16 << 20))
            inc = await asyncio.wait_for(got.get(), 30)
            assert inc.blob is not None and len(inc.blob) == 16 << 20
            assert buffer_size(far) > tlsbuffers.INITIAL  # grown by the bulk reads, not yet given back
            for i in range(tlsbuffers.SHRINK_AFTER + 2):  # small messages: the bulk phase is over
                await link.send(m.Hello(name=f"small-{i}"))
                await asyncio.wait_for(got.get(), 10)
            assert buffer_size(far) == tlsbuffers.INITIAL

    asyncio.run(main())


def test_a_peer_that_does_not_read_holds_little_ciphertext_and_reads_stay_small(tmp_path: Path) -> None:
    """Sending to a peer whose socket is full encrypts no further than a piece past it: the
    rest of a 1 MiB frame waits as plaintext (a view of the payload, uncopied), so a model sent
    to many slow clients holds a piece of ciphertext per client, not a frame. A link that
    received a bulk payload reads at most READ_MAX at a time (OpenSSL keeps its incoming BIO
    at the largest size it held, for the life of the connection)."""
    files = tls.ensure_controller_tls(tmp_path, ["127.0.0.1"])

    async def main() -> None:
        async with linked(files) as (link, server_side, got):
            await link.send(m.Hello(name="reader"))
            await asyncio.wait_for(got.get(), 10)
            far = await asyncio.wait_for(server_side.get(), 10)
            # Bulk in: the receiving side's reads stay small.
            await link.send_with_blob(m.Task(task_id="t", kind="train", session_id="s", round_index=1, model_id="m"), b"x" * (8 << 20))
            inc = await asyncio.wait_for(got.get(), 30)
            assert inc.blob is not None and len(inc.blob) == 8 << 20
            assert buffer_size(far) <= tlsbuffers.READ_MAX  # was 256 KiB, kept by an idle link
            # Bulk out to a client that stops reading: the server's socket fills up.
            link.ws.transport._ssl_protocol._transport.pause_reading()
            # Small kernel buffers, so the frame cannot hide in them (loopback's take megabytes).
            far.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
            link.ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            sending = asyncio.create_task(far.send_blob(b"y" * (32 << 20)))
            proto = far.ws.transport._ssl_protocol
            for _ in range(1000):  # until its socket takes no more (a condition, not a delay)
                if proto._ssl_writing_paused and not sending.done():
                    break
                await asyncio.sleep(0.01)
            assert proto._ssl_writing_paused and not sending.done()
            ciphertext = proto._outgoing.pending + proto._transport.get_write_buffer_size()
            assert ciphertext <= 4 * tlsbuffers.WRITE_PIECE, ciphertext  # was a whole 1 MiB frame and more
            sending.cancel()

    asyncio.run(main())



def test_what_was_written_before_close_reaches_the_peer(tmp_path: Path) -> None:
    """asyncio's transport.close() flushes what was written: a writer that writes (or drains
    to the low-water mark, as httpd does before it closes) and closes while the socket is
    full must not lose the plaintext still waiting to be encrypted (the tail of a model
    download): the peer reads every byte, then the TLS close."""
    assert tlsbuffers.install()
    files = tls.ensure_controller_tls(tmp_path, ["127.0.0.1"])
    size = 16 << 20
    payload = bytes(range(256)) * (size // 256)

    async def main() -> int:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            writer.transport.close()  # "buffered data will be flushed asynchronously"

        ctx = tls.server_context(files.cert, files.key)
        server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls.client_context(files.ca_cert), server_hostname="127.0.0.1")
        got = 0
        try:
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):
                got += len(chunk)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()
        return got

    assert asyncio.run(main()) == size
