"""Serve and connect: TLS websockets with a bearer token checked at the handshake."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Iterator
from http import HTTPStatus
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import InvalidHandshake, InvalidStatus

from scaleout.core.errors import AuthError, ConfigError, ScaleoutError
from scaleout.transport import framereader, httpd, tlsbuffers
from scaleout.transport.link import MAX_FRAME_BYTES, SEND_TIMEOUT_S, Link

log = logging.getLogger("scaleout.transport")

tlsbuffers.install()  # idle TLS links cost ~50 KB, not ~290 KB (see tlsbuffers)

PING_INTERVAL = float(os.environ.get("SCALEOUT_PING_INTERVAL_S") or 20.0)  # hidden: tests see a busy peer sooner
MAX_QUEUE = 4  # frames (up to 1 MiB each) a link buffers before it stops reading the socket
# A peer is called lost when a ping goes unanswered for three intervals, not one: a loop that is
# busy (a combiner sending a round's model to its 1,250 clients on a loaded box) reads its socket,
# and so answers, late; with one interval, combiners lost their controller link as a round began
# and registered again, in the middle of the round. A dead host is still found within 4 intervals.
PING_TIMEOUT = 3 * PING_INTERVAL
RECONNECT_SPREAD_S = 3.0  # a fleet that loses its links at once comes back over this many seconds
HANDSHAKE_TIMEOUT = 10.0  # TLS and websocket handshakes together; then the connection is dropped


class ConnectError(ScaleoutError):
    code = "unreachable"


class TrustError(ConnectError):
    """The peer's certificate is not signed by the CA we trust: retrying will not help."""

    code = "untrusted"


def bearer(request_headers: Any) -> str | None:
    value = request_headers.get("Authorization", "")
    return value[7:].strip() if value.startswith("Bearer ") else None


async def serve(
    on_link: Callable[[Link], Awaitable[None]],
    authenticate: Callable[[str | None], Any],
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    *,
    max_payload: int,
    public: dict[str, str] | None = None,
    connect_rate: tuple[float, float] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    send_timeout: float = SEND_TIMEOUT_S,
    http: httpd.Handler | None = None,
    http_prefix: str = "/api/",
) -> tuple[Server, int]:
    """Start a websocket server; ``authenticate(token)`` returns claims or raises AuthError.

    Unauthenticated connections are refused with HTTP 401 before any message is read; an
    address opening more than ``connect_rate`` = (per second, burst) connections gets HTTP
    429 (a node retries with backoff) before its token is looked at. A connection whose TLS and
    websocket handshakes are not done within ``handshake_timeout`` seconds is dropped, and
    a peer that does not take what is sent to it within ``send_timeout`` seconds (Link).
    ``public`` maps paths to texts anyone may GET (the CA certificate, for join tokens).
    ``http`` answers plain HTTP requests for paths under ``http_prefix`` on the same port and
    TLS (transport/httpd.py), within the same connection rate and handshake timeout.
    Returns the server and the port actually bound (port 0 picks a free one).
    """
    from scaleout.core.ratelimit import RateLimiter

    limiter = RateLimiter(*connect_rate) if connect_rate is not None else None
    loop = asyncio.get_running_loop()
    refused_at: dict[str, float] = {}  # address -> when we last logged a refusal (one line per second)

    def too_fast(addr: str) -> float:
        """Seconds until ``addr`` may open another connection (0: now)."""
        if limiter is None:
            return 0.0
        now = loop.time()
        wait = limiter.take(addr, now)
        if wait > 0 and now - refused_at.get(addr, -1.0) >= 1.0:
            refused_at[addr] = now
            if len(refused_at) > 1000:
                refused_at.clear()
            log.warning("refusing connections from %s: more than %g per second", addr, limiter.rate)
        return wait

    def process_request(connection: ServerConnection, request: Any) -> Any:
        addr = connection.remote_address[0] if connection.remote_address else "?"
        wait = too_fast(addr)
        if wait > 0:
            response = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, f"too many connections from {addr}; retry in {wait:.1f} s\n")
            response.headers["Retry-After"] = str(max(1, round(wait)))
            return response
        if public and request.path in public and "Upgrade" not in request.headers:
            return connection.respond(HTTPStatus.OK, public[request.path])
        try:
            connection.claims = authenticate(bearer(request.headers))  # type: ignore[attr-defined]
        except AuthError as exc:
            log.warning("refused connection from %s: %s", _peer(connection), exc)
            return connection.respond(HTTPStatus.UNAUTHORIZED, f"{exc}\n")
        return None

    def admit_http(addr: str) -> httpd.Response | None:
        wait = too_fast(addr)
        if wait <= 0:
            return None
        text = f"too many connections from {addr}; retry in {wait:.1f} s"
        return httpd.error_response(HTTPStatus.TOO_MANY_REQUESTS, "rate_limited", text, {"Retry-After": str(max(1, round(wait)))})

    def sniffing(protocol: Any, server: Server, **kwargs: Any) -> asyncio.Protocol:
        """Each accepted connection: websockets' own, behind a Sniffer that serves /api/ itself."""
        framereader.adopt(protocol)  # a frame's bytes copied once as they are read (framereader)
        connection = ServerConnection(protocol, server, **kwargs)
        if http is None:
            return connection

        def serve_http(transport: asyncio.Transport, data: bytes, deadline: float) -> None:
            if server.close_task is not None:  # shutting down: websockets refuses its new connections with 503 too
                transport.abort()
                return
            task = httpd.start(transport, data, deadline, http, admit_http, idle_timeout=handshake_timeout, send_timeout=send_timeout)
            server.handler_tasks.add(task)  # closing the server waits for it, as for a websocket handler
            task.add_done_callback(server.handler_tasks.discard)

        return httpd.Sniffer(connection, http_prefix.encode(), serve_http, handshake_timeout)

    async def handler(connection: ServerConnection) -> None:
        link = Link(connection, _peer(connection), max_payload=max_payload, send_timeout=send_timeout)
        link.claims = getattr(connection, "claims", None)
        await on_link(link)

    try:
        server = await ws_serve(
            handler,
            host,
            port,
            ssl=ssl_context,
            process_request=process_request,
            max_size=MAX_FRAME_BYTES,
            max_queue=MAX_QUEUE,
            compression=None,
            open_timeout=handshake_timeout,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            logger=logging.getLogger("scaleout.transport.ws"),
            create_connection=sniffing,  # type: ignore[arg-type]  # a factory of the connection's asyncio protocol
        )
    except OSError as exc:
        raise ConfigError("", _cannot_listen(host, port, exc)) from None
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    return server, bound


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: port {port} is already in use (another scaleout serve or combine?); stop that process, or choose another port with --port (--port 0 picks a free one)"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); choose another port with --port"
    return f"{where}: {exc.strerror or exc}; check --host and --port"


def _peer(connection: ServerConnection) -> str:
    addr = connection.remote_address
    return f"{addr[0]}:{addr[1]}" if addr else "unknown peer"


async def connect(
    url: str, token: str, ssl_context: ssl.SSLContext | None, *, max_payload: int, timeout: float = 10.0, peer_role: str = "controller"
) -> Link:
    """Open a link to ``url``; AuthError when the token is refused, ConnectError otherwise.

    With TLS, the peer must present a certificate for ``peer_role``: one CA signs the
    controller's and the combiners' certificates, and a combiner must not pass for the
    controller. That is checked right after the TLS handshake, before the HTTP upgrade
    request (which carries the token) is written: an impostor never sees the token.
    A TLS-configured caller never falls back to a clear-text ``ws://`` URL.
    """
    if ssl_context is not None and not url.startswith("wss://"):
        raise TrustError(f"refusing to send a token over clear text to {url}: expected a wss:// address")
    if ssl_context is None and url.startswith("wss://"):
        raise ConfigError("insecure", f"{url} uses TLS: drop --insecure (it is only for a controller started with --insecure, at a ws:// address)")
    try:
        ws = await ws_connect(
            url,
            ssl=ssl_context if url.startswith("wss://") else None,
            additional_headers={"Authorization": f"Bearer {token}"},
            create_connection=_role_checked(url, peer_role) if ssl_context is not None else _Connection,
            max_size=MAX_FRAME_BYTES,
            max_queue=MAX_QUEUE,
            compression=None,
            proxy=None,
            open_timeout=timeout,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
        if status == HTTPStatus.UNAUTHORIZED:
            raise AuthError(f"{url} refused the token: {body or 'unauthorized'}") from None
        raise ConnectError(f"{url} answered HTTP {status}: {body}") from None
    except ssl.SSLCertVerificationError as exc:
        if getattr(ssl_context, "system_ca", False):
            raise TrustError(
                f"cannot verify the TLS certificate of {url}: {exc.verify_message}; --ca is missing: pass the controller's CA "
                "file (DATA_DIR/ca.pem), or use a join token, which names its CA"
            ) from None
        raise TrustError(f"cannot verify the TLS certificate of {url}: {exc.verify_message}; is --ca the right CA file?") from None
    except (OSError, InvalidHandshake, asyncio.TimeoutError, ssl.SSLError) as exc:
        raise ConnectError(f"cannot reach {url}: {str(exc) or type(exc).__name__}") from None
    return Link(ws, url, max_payload=max_payload)


class _Connection(ClientConnection):
    """A client connection whose frames are read with one copy (framereader)."""

    def __init__(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        framereader.adopt(protocol)
        super().__init__(protocol, *args, **kwargs)


def _role_checked(url: str, expected: str) -> Any:
    """A websocket connection class that checks the peer certificate's role before its
    opening handshake writes a header (the token): a wrong role raises TrustError there."""

    class RoleChecked(_Connection):
        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            from scaleout.security.tls import peer_role_problem

            ssl_object = self.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            problem = peer_role_problem(der, expected) if der else "presented no certificate"
            if problem is not None:
                raise TrustError(f"{url} {problem}; nothing was sent to it")
            await super().handshake(*args, **kwargs)

    return RoleChecked


def backoff(
    initial: float = 0.2, maximum: float = 15.0, factor: float = 2.0, rng: random.Random | None = None, spread: float = 0.0,
) -> Iterator[float]:
    """Delays for reconnect attempts: exponential with jitter, capped. With ``spread``, the
    first is anywhere in [0, spread) (then the usual ones): for a link that worked and was
    lost, which its peer's other links were likely lost with (a combiner gone, a controller
    that restarted), so a thousand clients do not all dial again within the same 0.2 s."""
    rng = rng or random.Random()
    if spread > 0:
        yield rng.uniform(0.0, spread)
    delay = initial
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(maximum, delay * factor)
