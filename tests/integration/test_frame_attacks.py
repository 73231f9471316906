"""Malformed websocket frames from an authenticated peer, over real TLS, to a real controller
whose links read frames with FrameReader (transport/framereader.py): each link is closed with
websockets' own reason, the controller logs no traceback and serves the next peer."""

from __future__ import annotations

import asyncio
import os
import ssl
import struct

from conftest import Federation, raw_websocket
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

TIMEOUT = 10.0


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True, length: int | None = None) -> bytes:
    """One client frame written by hand; ``length`` overrides the declared payload length."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 1 << 16:
        head += bytes([m | 126]) + struct.pack("!H", n)
    else:
        head += bytes([m | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def parse_server_frames(got: bytes) -> list[Frame]:
    frames = StreamReader()
    frames.feed_data(got)
    frames.feed_eof()
    out = []
    while True:
        parser = Frame.parse(frames.read_exact, mask=False, max_size=None, extensions=[])
        try:
            next(parser)
        except StopIteration as stop:
            out.append(stop.value)
        except EOFError:
            return out


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 16), TIMEOUT):
            got += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return got


def close_in(frames: list[Frame]) -> tuple[int | None, str]:
    for f in frames:
        if f.opcode is Opcode.CLOSE:
            c = Close.parse(f.data)
            return c.code, c.reason
    return None, ""


async def close_of(url: str, ca: str, token: str, wire: bytes, *, cut: int = 0) -> tuple[int | None, str]:
    """Send ``wire`` (in ``cut``-byte writes if ``cut``) on a hand-upgraded websocket, read
    until the controller hangs up, and return the code and reason of the close frame it sent
    (None: it sent none)."""
    reader, writer = await raw_websocket(url, ca, token, timeout=TIMEOUT)
    try:
        if cut:
            for i in range(0, len(wire), cut):
                writer.write(wire[i : i + cut])
                await writer.drain()
        else:
            writer.write(wire)
    except ConnectionError:
        pass  # the controller hung up before the rest (after a close, say): what it sent is read below
    got = await read_to_eof(reader)
    writer.close()
    return close_in(parse_server_frames(got))


def test_frames_with_an_empty_payload_are_read_not_a_parser_failure(fed: Federation) -> None:
    """A ping, pong or message with no payload whose header ends the bytes received so far: the
    reader had nothing to take and failed ('parser failed', traceback at ERROR, link cut 1011)."""
    fed.controller()
    token = (fed.data / "admin.token").read_text().strip()

    async def go() -> tuple[list[Frame], tuple[int | None, str], tuple[int | None, str]]:
        # an empty ping, alone: the pong answers it, then we close
        reader, writer = await raw_websocket(fed.url, fed.ca, token, timeout=TIMEOUT)
        writer.write(frame(Opcode.PING, b""))
        head = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)
        writer.write(frame(Opcode.CLOSE, Close(1000, "bye").serialize()))
        after = parse_server_frames(head + await read_to_eof(reader))
        writer.close()
        pong_then = await close_of(fed.url, fed.ca, token, frame(Opcode.PONG, b"") + frame(Opcode.CLOSE, Close(1000, "bye").serialize()), cut=1)
        empty_close = await close_of(fed.url, fed.ca, token, frame(Opcode.CLOSE, b""))
        return after, pong_then, empty_close

    after, pong_then, empty_close = asyncio.run(go())
    assert [(f.opcode, bytes(f.data)) for f in after] == [(Opcode.PONG, b""), (Opcode.CLOSE, Close(1000, "bye").serialize())]
    assert pong_then == (1000, "bye")
    assert empty_close == (1005, "")  # no status: websockets answers with none either
    assert fed.admin("status")[0]["session"] is None


BIG = 1 << 40


def test_malformed_frames_close_the_link_with_websockets_reason(fed: Federation) -> None:
    fed.controller()
    token = (fed.data / "admin.token").read_text().strip()
    cases: list[tuple[str, bytes, tuple[int | None, str]]] = [
        ("64-bit length, top bit set", frame(Opcode.BINARY, b"", length=(1 << 63) + 5), (1009, "")),
        ("length beyond max_size", frame(Opcode.BINARY, b"", length=BIG), (1009, "")),
        ("unmasked to a server", frame(Opcode.TEXT, b"{}", mask=False), (1002, "")),
        ("ping too long", frame(Opcode.PING, b"x" * 126), (1002, "")),
        ("fragmented ping", frame(Opcode.PING, b"x", fin=False), (1002, "")),
        ("continuation without a start", frame(Opcode.CONT, b"x"), (1002, "")),
        ("reserved bit", frame(Opcode.TEXT, b"{}", rsv=1), (1002, "")),
        ("reserved opcode", frame(3, b"{}"), (1002, "")),
        ("close with a bad code", frame(Opcode.CLOSE, struct.pack("!H", 999)), (1002, "")),
        ("close with a 1-byte payload", frame(Opcode.CLOSE, b"\x03"), (1002, "")),
        ("close with a bad UTF-8 reason", frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"), (1007, "")),
        ("text that is not UTF-8", frame(Opcode.TEXT, b"\xff\xfe"), (1007, "")),
        ("new message inside a fragmented one", frame(Opcode.TEXT, b"{", fin=False) + frame(Opcode.TEXT, b"}"), (1002, "")),
        ("data after the close", frame(Opcode.CLOSE, Close(1000, "bye").serialize()) + b"\x00" * 5000 + frame(Opcode.TEXT, b"{}"), (1000, "")),
        ("many tiny frames, then a close", frame(Opcode.PING, b"") * 2000 + frame(Opcode.PONG, b"p") * 2000 + frame(Opcode.CLOSE, Close(1000, "bye").serialize()), (1000, "")),
        ("ping inside a fragmented message, then garbage", frame(Opcode.TEXT, b"{", fin=False) + frame(Opcode.PING, b"p") + frame(Opcode.BINARY, b"}"), (1002, "")),
    ]

    async def go() -> dict[str, tuple[int | None, str]]:
        got = {}
        for name, wire, _ in cases:
            got[name] = await close_of(fed.url, fed.ca, token, wire)
            # and cut at every byte boundary (data after a close, so written, meets a reset instead)
            got[name + " (byte by byte)"] = await close_of(fed.url, fed.ca, token, wire, cut=1 if "after the close" not in name else 0)
        return got

    got = asyncio.run(go())
    want = {}
    for name, _, expected in cases:
        want[name] = want[name + " (byte by byte)"] = expected
    # reasons are websockets' own; compare codes, and that a reason is said for protocol errors
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}, got
    assert fed.admin("status")[0]["session"] is None  # still serving
    log = fed.procs[0].text()
    assert "parser failed" not in log
