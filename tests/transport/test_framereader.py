"""FrameReader: the frames websockets' own reader would parse, from the same bytes however
they are cut, with a frame's payload copied once; our links use it on both sides."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Generator
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from scaleout.transport.framereader import FrameReader, adopt
from scaleout.transport.link import Link
from scaleout.transport.net import connect, serve


def _frames(rng: random.Random, mask: bool) -> tuple[bytes, list[tuple[Opcode, bytes]]]:
    """Serialized frames of sizes around every length encoding, and what they carry."""
    sent: list[tuple[Opcode, bytes]] = []
    wire = b""
    for size in [0, 1, 125, 126, 127, 65535, 65536, 70000, 300_000, 1 << 20, *[rng.randrange(0, 200_000) for _ in range(20)]]:
        op = rng.choice([Opcode.BINARY, Opcode.TEXT]) if size < 1000 else Opcode.BINARY
        data = os.urandom(size) if op is Opcode.BINARY else bytes(rng.choice(b"abc") for _ in range(size))
        sent.append((op, data))
        wire += Frame(op, data).serialize(mask=mask)
    return wire, sent


def _parse_all(reader: StreamReader, wire: bytes, cuts: list[int], mask: bool, count: int) -> list[tuple[Opcode, bytes]]:
    """Feed ``wire`` to ``reader`` in pieces cut at ``cuts`` and parse ``count`` frames, as
    websockets' protocol does (at_eof, then Frame.parse(read_exact))."""
    got: list[tuple[Opcode, bytes]] = []

    def parser() -> Generator[None, None, None]:
        while len(got) < count:
            assert not (yield from reader.at_eof())
            frame = yield from Frame.parse(reader.read_exact, mask=mask, max_size=None, extensions=[])
            got.append((frame.opcode, bytes(frame.data)))
        while True:  # done: later feeds find nothing more to parse
            yield

    gen = parser()
    next(gen)
    start = 0
    for end in [*cuts, len(wire)]:
        reader.feed_data(wire[start:end])
        start = end
        next(gen)
    return got


def _adopted() -> FrameReader:
    reader = StreamReader()
    adopt(type("P", (), {"reader": reader})())
    assert isinstance(reader, FrameReader)
    return reader  # type: ignore[return-value]


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_frames_parse_as_with_websockets_own_reader_however_the_bytes_are_cut(mask: bool, seed: int) -> None:
    rng = random.Random(seed)
    wire, sent = _frames(rng, mask)
    cut_size = [1, 7, 16 << 10, 256 << 10, 1 << 20][seed % 5 if seed else 2]
    cuts = sorted({rng.randrange(1, len(wire)) for _ in range(len(wire) // cut_size)} | set(range(cut_size, len(wire), cut_size)))
    theirs = _parse_all(StreamReader(), wire, cuts, mask, len(sent))
    ours = _parse_all(_adopted(), wire, cuts, mask, len(sent))
    assert theirs == sent
    assert ours == sent


def test_the_handshake_reads_lines_from_one_buffer_then_frames_from_the_pieces() -> None:
    """Bytes fed before the frames (the HTTP handshake, read by generators that began before
    the reader was switched) stay where websockets' reader looks; the frame after them parses."""
    reader = _adopted()
    line = reader.read_line(100)
    next(line)  # started, waiting for bytes, as a handshake's read is when adopt() runs
    frame = Frame(Opcode.BINARY, b"x" * 5000).serialize(mask=False)
    reader.feed_data(b"HTTP/1.1 101 OK\r\n" + frame[:10])
    with pytest.raises(StopIteration) as done:
        next(line)
    assert done.value.value == b"HTTP/1.1 101 OK\r\n"
    reader.feed_data(frame[10:3000])
    reader.feed_data(frame[3000:])
    assert _parse_all(reader, b"", [], False, 1) == [(Opcode.BINARY, b"x" * 5000)]
    reader.feed_eof()
    gen = reader.at_eof()
    with pytest.raises(StopIteration) as eof:
        next(gen)
    assert eof.value.value is True


def test_a_payload_that_is_exactly_one_piece_is_handed_over_without_a_copy() -> None:
    reader = _adopted()
    gen = reader.read_exact(6)
    next(gen)
    piece = b"abcdef"
    reader.feed_data(piece)
    with pytest.raises(StopIteration) as done:
        next(gen)
    assert done.value.value is piece


def test_both_ends_of_a_link_read_frames_with_a_frame_reader() -> None:
    async def main() -> None:
        seen: list[Any] = []
        arrived = asyncio.Event()

        async def on_link(link: Link) -> None:
            seen.append(type(link.ws.protocol.reader))
            arrived.set()
            await link.run()

        server, port = await serve(on_link, lambda token: None, "127.0.0.1", 0, None, max_payload=1 << 20)
        link = await connect(f"ws://127.0.0.1:{port}", "token", None, max_payload=1 << 20)
        try:
            assert type(link.ws.protocol.reader) is FrameReader
            await asyncio.wait_for(arrived.wait(), 10)
            assert seen == [FrameReader]
        finally:
            await link.ws.close()
            server.close()

    asyncio.run(main())


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("op", [Opcode.PING, Opcode.PONG, Opcode.CLOSE, Opcode.BINARY])
def test_a_frame_with_an_empty_payload_at_the_end_of_what_came_parses(mask: bool, op: Opcode) -> None:
    """Its header the last bytes received: there is nothing to take (was IndexError, 'parser failed')."""
    for cut in (1, 0):
        wire = Frame(op, b"").serialize(mask=mask)
        cuts = list(range(1, len(wire))) if cut else []
        assert _parse_all(_adopted(), wire, cuts, mask, 1) == [(op, b"")]


def _peak_parsing_in_bytes(reader: StreamReader, wire: bytes) -> int:
    """tracemalloc's peak while ``reader`` is fed ``wire`` a byte at a time (a peer whose
    every byte comes in its own TLS record and read) and one masked frame is parsed."""
    import tracemalloc

    parser = Frame.parse(reader.read_exact, mask=True, max_size=None, extensions=[])
    next(parser)
    tracemalloc.start()
    try:
        for i in range(len(wire)):
            reader.feed_data(wire[i : i + 1])  # a fresh bytes object each, as the transport hands over
            try:
                next(parser)
            except StopIteration as stop:
                assert len(stop.value.data) == len(wire) - 14 and i == len(wire) - 1
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_frame_fed_a_byte_at_a_time_costs_about_what_websockets_own_reader_does() -> None:
    """Each piece was kept as its own bytes object (~34 bytes for 1) and joined through a
    memoryview each (~190 bytes): a 1 MiB frame sent a byte per record held ~40 MB while it
    came and peaked at ~250 MB for its join (websockets' reader: a few MB)."""
    wire = Frame(Opcode.BINARY, os.urandom(64 << 10)).serialize(mask=True)
    theirs = _peak_parsing_in_bytes(StreamReader(), wire)
    ours = _peak_parsing_in_bytes(_adopted(), wire)
    assert ours <= 2 * theirs, (ours, theirs)


def _server_says(tmp_path: Any, wire: bytes, caplog: pytest.LogCaptureFixture) -> tuple[int | None, str]:
    """Our client (net.connect, a FrameReader) against a hand-written TLS websocket server
    that answers the upgrade and then sends ``wire``, a byte per write; the close our client sent."""
    import base64
    import hashlib
    import logging

    from scaleout.security import tls

    files = tls.ensure_controller_tls(tmp_path, ["127.0.0.1"])

    async def main() -> tuple[int | None, str]:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key:"))
            accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            try:
                for i in range(len(wire)):
                    writer.write(wire[i : i + 1])
                    await writer.drain()
                await reader.read(1 << 16)  # its answer (a close, a pong), then we hang up
            except ConnectionError:
                pass
            writer.close()

        server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=tls.server_context(files.cert, files.key))
        port = server.sockets[0].getsockname()[1]
        try:
            link = await connect(f"wss://127.0.0.1:{port}", "token", tls.client_context(files.ca_cert), max_payload=1 << 20)
            await asyncio.wait_for(link.run(), 20)
            sent = link.ws.protocol.close_sent  # what our client said as it closed
            return (sent.code, sent.reason) if sent is not None else (None, "")
        finally:
            server.close()

    with caplog.at_level(logging.DEBUG):
        out = asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    return out


@pytest.mark.parametrize(
    ("name", "wire", "code"),
    [
        ("a masked frame to a client", Frame(Opcode.TEXT, b"{}").serialize(mask=True), 1002),
        ("an empty ping then a close", Frame(Opcode.PING, b"").serialize(mask=False) + Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(mask=False), 1000),
        ("a close with no status", Frame(Opcode.CLOSE, b"").serialize(mask=False), 1005),
        ("a length with the top bit set", b"\x82\x7f" + (1 << 63 | 5).to_bytes(8, "big"), 1009),
        ("a reserved opcode", b"\x83\x00", 1002),
    ],
)
def test_our_client_reading_a_bad_server_closes_with_websockets_reason(tmp_path: Any, caplog: pytest.LogCaptureFixture, name: str, wire: bytes, code: int) -> None:
    got, _ = _server_says(tmp_path, wire, caplog)
    assert got == code, name
