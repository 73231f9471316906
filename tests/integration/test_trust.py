"""One CA signs the controller's and the combiners' certificates: a combiner must never
pass for the controller, and a TLS-configured node never falls back to clear text."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import Federation

from scaleout.core.errors import AuthError, RemoteError
from scaleout.security import tls
from scaleout.transport.link import Link
from scaleout.transport.net import TrustError, connect, serve


def combiner_cert(fed: Federation, tmp: Path) -> tuple[Path, Path]:
    """Have the controller sign a CSR, as a combiner does, claiming the controller's names."""
    csr, key = tls.make_csr(["127.0.0.1", "localhost"], "Scaleout controller")

    join = fed.token("combiner")

    async def register() -> dict:
        link = await connect(fed.url, join, tls.client_context(fed.ca), max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        try:  # enrolled first, as scaleout combine does: registering takes the node's own credential
            token = (await link.request("node.enrol", {"name": "impostor"}))[0]["token"]
        finally:
            await link.ws.close()
            reader.cancel()
        link = await connect(fed.url, token, tls.client_context(fed.ca), max_payload=1 << 20)
        reader = asyncio.create_task(link.run())
        try:
            result, _ = await link.request("combiner.register", {"name": "impostor", "csr": csr.decode()})
            with pytest.raises(RemoteError, match="wss://"):
                await link.request("combiner.ready", {"url": "ws://127.0.0.1:1"})
            return result
        finally:
            await link.ws.close()
            reader.cancel()

    result = asyncio.run(register())
    (tmp / "c.pem").write_text(result["cert"])
    tls.write_private(tmp / "c.key", key)
    return tmp / "c.pem", tmp / "c.key"


def test_combiner_certificate_cannot_pass_for_the_controller(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    cert, key = combiner_cert(fed, tmp_path)
    assert tls.node_role(tls.x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(tls.serialization.Encoding.DER)) == "combiner"

    client_token = fed.token("client")

    async def scenario() -> None:
        async def on_link(link: Link) -> None:
            await link.run()

        def authenticate(token: str | None) -> object:
            if not token:
                raise AuthError("no token")
            return object()

        server, port = await serve(on_link, authenticate, "127.0.0.1", 0, tls.server_context(cert, key), max_payload=1 << 20)
        try:
            ctx = tls.client_context(fed.ca)
            # An admin dialling "the controller" must refuse a combiner's certificate...
            with pytest.raises(TrustError, match="combiner certificate"):
                await connect(f"wss://127.0.0.1:{port}", "secret-admin-token", ctx, max_payload=1 << 20)
            # ...while a client dialling a combiner accepts it.
            link = await connect(f"wss://127.0.0.1:{port}", "t", ctx, max_payload=1 << 20, peer_role="combiner")
            await link.ws.close()
            # And the real controller is not a combiner.
            with pytest.raises(TrustError, match="controller certificate"):
                await connect(fed.url, client_token, ctx, max_payload=1 << 20, peer_role="combiner")
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_tls_caller_refuses_clear_text_address(fed: Federation) -> None:
    fed.controller()
    with pytest.raises(TrustError, match="clear text"):
        asyncio.run(connect(fed.url.replace("wss://", "ws://"), "token", tls.client_context(fed.ca), max_payload=1 << 20))


def test_no_token_reaches_a_server_with_a_combiner_certificate(fed: Federation, tmp_path: Path) -> None:
    """A combiner's CA-signed certificate names 127.0.0.1: a server using it, posing as the
    controller, must not get the token of `scaleout join` or `scaleout status --token`."""
    import contextlib
    import threading

    from conftest import scaleout

    fed.controller()
    cert, key = combiner_cert(fed, tmp_path)
    admin = (fed.data / "admin.token").read_text().strip()
    join = fed.token("client")
    received: list[bytes] = []
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.AbstractEventLoop] = []

    def impostor() -> None:
        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                received.append(await asyncio.wait_for(reader.read(65536), 5))
            except (OSError, asyncio.TimeoutError):
                pass
            writer.close()

        async def main() -> None:
            server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=tls.server_context(cert, key))
            port.append(server.sockets[0].getsockname()[1])
            stop.append(asyncio.get_running_loop())
            ready.set()
            async with server:
                await asyncio.Event().wait()

        with contextlib.suppress(RuntimeError):  # the loop stopped at the end of the test
            asyncio.run(main())

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    assert ready.wait(10)
    url = f"wss://127.0.0.1:{port[0]}"
    try:
        status = scaleout("status", "--controller", url, "--token", admin, "--ca", fed.ca, timeout=30)
        joined = scaleout("join", "--controller", url, "--token", join, "--ca", fed.ca, "--name", "k9",
                          "--work-dir", str(tmp_path / "k9"), timeout=30)
    finally:
        stop[0].call_soon_threadsafe(stop[0].stop)
    seen = b"".join(received)
    assert b"Authorization" not in seen, seen[:300]
    assert admin.encode() not in seen and join.encode() not in seen
    for done in (status, joined):
        assert done.returncode != 0
        assert "combiner certificate where a controller was expected" in done.stderr, done.stderr
