"""Plain HTTP/1.1 requests on the websocket port (the controller's /api/v1, roles/httpapi.py).

websockets' server reads only GET upgrade requests (no other method, no body), so the
listening socket's protocol is a ``Sniffer``: it reads a connection's request line, and a
path under the HTTP prefix is served here, while anything else (a websocket upgrade, GET
/ca.pem) is handed, with the bytes read so far, to the websockets connection made for it,
which goes on as if it had read them itself (its handshake, 401, 429 and timeouts as before).

One request per connection (``Connection: close``). A body needs a Content-Length (chunked
gets 411) and is bounded by whoever reads it (413, before a byte of it is read); a large one
is streamed to a file, written in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from scaleout.core.errors import LimitExceeded, ProtocolError, ScaleoutError
from scaleout.core.units import fmt_bytes

log = logging.getLogger("scaleout.transport.http")

SNIFF_LIMIT = 8192  # bytes of a request line looked at before it is handed on
HEAD_LIMIT = 16 * 1024  # a request's line and headers
CHUNK = 1 << 20  # a body is written to its file, and a response sent, this much at a time
DISCARD_LIMIT = 1 << 20  # an unread body up to this size is read and dropped before closing (so the answer is not reset)


class BodyTooLarge(LimitExceeded):
    """A request body over what its route takes (HTTP 413)."""

    def __init__(self, size: int, limit: int, what: str = "the request body") -> None:
        self.what, self.size, self.limit = what, size, limit
        ScaleoutError.__init__(self, f"{what} is {fmt_bytes(size)}; this request takes at most {fmt_bytes(limit)}")


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(value, allow_nan=False).encode(), headers=headers or {})


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"error": {"code": code, "message": message}}, headers)


class Request:
    """One request: its method, path, query and headers (names lower-case); its body is
    read (``read``) or saved to a file (``save``) within a bound, at most once."""

    def __init__(
        self, method: str, target: str, headers: dict[str, str], peer: str, length: int,
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float,
    ) -> None:
        parts = urlsplit(target)
        self.method = method
        self.path = parts.path
        self.query = parse_qs(parts.query, keep_blank_values=True)
        self.headers = headers
        self.peer = peer
        self.length = length
        self.unread = length
        self._reader, self._writer, self._idle = reader, writer, idle_timeout

    async def read(self, limit: int) -> bytes:
        """The whole body (b"" without one); BodyTooLarge over ``limit`` bytes."""
        self._admit(limit)
        data = await self._chunk(self.length) if self.length else b""
        while len(data) < self.length:
            data += await self._chunk(self.length - len(data))
        self.unread = 0
        return data

    async def save(self, path: Path, limit: int) -> int:
        """Stream the body to ``path`` (written in a worker thread, a megabyte at a time);
        its size. BodyTooLarge over ``limit`` bytes, before any of it is read."""
        self._admit(limit)
        f = await asyncio.to_thread(open, path, "wb")
        try:
            while self.unread:
                buf = bytearray()
                while self.unread and len(buf) < CHUNK:
                    piece = await self._chunk(min(self.unread, CHUNK))
                    buf += piece
                    self.unread -= len(piece)
                await asyncio.to_thread(f.write, buf)
        finally:
            await asyncio.to_thread(f.close)
        return self.length

    def _admit(self, limit: int) -> None:
        if self.unread != self.length:
            raise ProtocolError("the request body was read already")
        if self.length > limit:
            raise BodyTooLarge(self.length, limit)
        if self.length and self.headers.get("expect", "").lower() == "100-continue":
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it before a large body

    async def _chunk(self, n: int) -> bytes:
        try:
            piece = await asyncio.wait_for(self._reader.read(n), self._idle)
        except TimeoutError:
            raise ProtocolError(f"the request body stalled: nothing came for {self._idle:g} s") from None
        if not piece:
            raise ProtocolError(f"the request body ended after {self.length - self.unread} of {self.length} bytes")
        return piece


Handler = Callable[[Request], Awaitable[Response]]


class Sniffer(asyncio.Protocol):
    """The protocol of each accepted connection until its request line is read: a path
    starting with ``prefix`` goes to ``http``, anything else to ``fallback`` (the websockets
    connection), which is given the transport and the bytes read so far."""

    def __init__(self, fallback: asyncio.Protocol, prefix: bytes, http: Callable[[asyncio.Transport, bytes, float], None], timeout: float) -> None:
        self.fallback, self.prefix, self.http, self.timeout = fallback, prefix, http, timeout
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.timeout
        self.timer = loop.call_later(self.timeout, transport.abort)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\n" in self.buf or len(self.buf) >= SNIFF_LIMIT:
            self._hand_on()

    def eof_received(self) -> bool | None:
        self._stop_timer()
        return None  # closes: nothing was asked

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _hand_on(self) -> None:
        self._stop_timer()
        transport, data = self.transport, bytes(self.buf)
        assert transport is not None
        words = data.split(b"\n", 1)[0].split(b" ")
        if len(words) >= 2 and words[1].startswith(self.prefix):
            self.http(transport, data, self.deadline)
            return
        transport.set_protocol(self.fallback)
        self.fallback.connection_made(transport)
        self.fallback.data_received(data)


def start(transport: asyncio.Transport, data: bytes, deadline: float, handle: Handler, admit: Callable[[str], Response | None],
          *, idle_timeout: float, send_timeout: float) -> asyncio.Task[None]:
    """Serve the one request of a connection the Sniffer gave up: its bytes so far are ``data``,
    its head must be in by ``deadline`` (loop time); ``admit(address)`` may refuse it (429)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=HEAD_LIMIT, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    reader.feed_data(data)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return loop.create_task(_serve(reader, writer, deadline, handle, admit, idle_timeout, send_timeout))


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float, handle: Handler,
                 admit: Callable[[str], Response | None], idle_timeout: float, send_timeout: float) -> None:
    peername = writer.get_extra_info("peername")
    address = str(peername[0]) if peername else "?"
    peer = f"{peername[0]}:{peername[1]}" if peername else "unknown peer"
    request: Request | None = None
    try:
        response: Response | None
        try:
            left = deadline - asyncio.get_running_loop().time()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), max(left, 0.001))
        except asyncio.LimitOverrunError:
            response = error_response(431, "too_large", f"the request line and headers are over {HEAD_LIMIT // 1024} KiB")
        except TimeoutError:
            response = error_response(408, "timeout", "the request line and headers did not arrive in time")
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # gone before it asked
        else:
            response = admit(address)
            if response is None:
                parsed = _parse(head, peer, reader, writer, idle_timeout)
                if isinstance(parsed, Response):
                    response = parsed
                else:
                    request = parsed
                    try:
                        response = await handle(request)
                    except Exception:  # the role edge: a bug answers 500 and is logged, never a dropped connection
                        log.exception("HTTP %s %s from %s failed", request.method, request.path[:200], peer)
                        response = error_response(500, "internal", "internal error: the controller's log has the details")
        await _respond(writer, response, send_timeout)
        if request is not None and 0 < request.unread <= DISCARD_LIMIT:
            await asyncio.wait_for(reader.readexactly(request.unread), idle_timeout)  # else closing resets the answer
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
        log.debug("HTTP connection from %s: %s", peer, exc or type(exc).__name__)
    except Exception:  # the role edge: a bug must not take the server down
        log.exception("HTTP request from %s failed", peer)
    finally:
        writer.transport.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (TimeoutError, OSError):
            writer.transport.abort()


def _parse(head: bytes, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle_timeout: float) -> Request | Response:
    lines = head[:-4].decode("latin-1").split("\r\n")
    words = lines[0].split(" ")
    if len(words) != 3 or not words[0].isalpha() or not words[1].startswith("/") or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return error_response(400, "bad_request", f"malformed request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            return error_response(400, "bad_request", f"malformed header line {line[:80]!r}")
        key, value = name.lower(), value.strip()
        if key in headers and key in ("content-length", "authorization", "host"):
            return error_response(400, "bad_request", f"header {name} is given twice")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    if "transfer-encoding" in headers:
        return error_response(411, "length_required", "send the body with a Content-Length (chunked bodies are not taken)")
    text = headers.get("content-length", "0")
    if not re.fullmatch(r"[0-9]{1,18}", text):  # isdigit() takes "²", which int() does not
        return error_response(400, "bad_request", f"Content-Length must be a whole number of bytes, got {text[:40]!r}")
    return Request(words[0], words[1], headers, peer, int(text), reader, writer, idle_timeout)


async def _respond(writer: asyncio.StreamWriter, response: Response, send_timeout: float) -> None:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Request Header Fields Too Large" if response.status == 431 else ""
    head = [f"HTTP/1.1 {response.status} {phrase}", f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in response.headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    view = memoryview(response.body)
    for i in range(0, len(view), CHUNK):
        writer.write(view[i : i + CHUNK])
        await asyncio.wait_for(writer.drain(), send_timeout)
    await asyncio.wait_for(writer.drain(), send_timeout)
