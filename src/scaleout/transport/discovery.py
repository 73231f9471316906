"""Find a controller's CA from a join token: download it without trusting it, then check
its sha256 against the fingerprint the token pins (kubeadm's discovery-token-ca-cert-hash)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from scaleout.core.errors import ScaleoutError
from scaleout.transport.net import ConnectError, TrustError

CA_PATH = "/ca.pem"
MAX_CA_BYTES = 64 << 10
FETCH_TIMEOUT_S = 10.0


async def fetch_ca(url: str, fingerprint: str, timeout: float = FETCH_TIMEOUT_S, pinned_by: str = "the join token") -> bytes:
    """The CA certificate (PEM) the controller at ``url`` serves, if its fingerprint is
    ``fingerprint`` (what ``pinned_by`` pins: a TrustError names it if it is another);
    ConnectError if it cannot be fetched."""
    from scaleout.security.tls import fingerprint as fingerprint_of

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted yet: the fingerprint decides below
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host or None)
            try:
                writer.write(f"GET {CA_PATH} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                data = await reader.read(MAX_CA_BYTES)
                while len(data) < MAX_CA_BYTES and (more := await reader.read(MAX_CA_BYTES - len(data))):
                    data += more
            finally:
                writer.close()
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise ConnectError(f"cannot reach {url} to fetch its CA: {str(exc) or type(exc).__name__}") from None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectError(f"{url} did not hand out its CA certificate (is it a scaleout controller?)")
    try:
        got = fingerprint_of(body)
    except ScaleoutError:
        raise TrustError(f"{url} handed out something that is not a certificate as its CA") from None
    if got != fingerprint:
        raise TrustError(
            f"the controller at {url} presented CA {got[:23]}... but {pinned_by} pins {fingerprint[:23]}...: "
            + ("the token is for another controller" if pinned_by == "the join token" else f"{pinned_by} names another controller's CA")
            + ", or someone is in between; refusing to connect"
        )
    return body


async def pin_ca(urls: tuple[str, ...], fingerprint: str, store: Path) -> tuple[str, Path]:
    """The first of ``urls`` that hands out the CA pinned by ``fingerprint``, and that CA
    saved under ``store`` (reused from there when the token names one address)."""
    from scaleout.security.jointoken import fingerprint_key
    from scaleout.security.tls import fingerprint as fingerprint_of
    from scaleout.security.tls import write_public

    path = store / f"ca-{fingerprint_key(fingerprint, urls[0])}.pem"
    if len(urls) == 1 and path.is_file():
        try:
            if fingerprint_of(path.read_bytes()) == fingerprint:
                return urls[0], path
        except (ScaleoutError, OSError):
            pass
    failures: list[str] = []
    for url in urls:
        try:
            pem = await fetch_ca(url, fingerprint, FETCH_TIMEOUT_S if len(urls) == 1 else 3.0)
        except TrustError:
            raise
        except ConnectError as exc:
            failures.append(str(exc))
            continue
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_public(path, pem)
        return url, path
    raise ConnectError("; ".join(failures) if len(failures) == 1 else "no controller address in the join token answered: " + "; ".join(failures))
