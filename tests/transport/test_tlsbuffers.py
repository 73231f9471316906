"""Adaptive TLS read buffers: an idle link keeps a small one, a bulk transfer grows it,
and it shrinks back once the transfer is over."""

from __future__ import annotations

import asyncio
from pathlib import Path

from scaleout.core import messages as m
from scaleout.security import tls
from scaleout.transport import tlsbuffers
from scaleout.transport.link import Incoming, Link
from scaleout.transport.net import connect, serve


def buffer_size(link: Link) -> int:
    return len(link.ws.transport._ssl_protocol._ssl_buffer)


def test_idle_small_bulk_large_then_small_again(tmp_path: Path) -> None:
    assert tlsbuffers.install()  # net.py installed it already: idempotent
    files = tls.ensure_controller_tls(tmp_path, ["127.0.0.1"])

    async def main() -> None:
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
        finally:
            await link.ws.close()
            reader.cancel()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
