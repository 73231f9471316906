"""A websocket frame reader that copies a received byte once, not three times.

websockets' StreamReader appends every piece the transport hands over to one bytearray
(a copy), slices each frame's payload out of it (a second copy, and the rest of the buffer
moved down) and, on a client, ``recv`` joins that bytearray into bytes (a third). For a
model that is ~3 passes over every byte on the event loop, next to the one decryption.

``adopt(protocol)`` switches a websockets protocol's reader to ``FrameReader`` before any
byte arrives. Until the frames begin (the HTTP handshake) it behaves exactly as before;
from the first frame on it keeps the pieces it is fed as they are (bytes, not copied) and
builds a frame's payload with one join of the pieces it spans, as ``bytes``: a piece that
is exactly a payload is handed over without a copy, and ``recv`` returns such bytes as
they are. Only our links use it (net.py); a plain websockets connection is left alone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from typing import Any

from websockets.streams import StreamReader


SMALL = 512  # bytes: pieces below this are kept joined, not one object each (feed_data)


class FrameReader(StreamReader):
    """StreamReader with the same results, for pieces kept as fed once frames are read."""

    _framing: bool
    _parts: deque[bytes]
    _size: int  # bytes in _parts, less _offset
    _offset: int  # bytes of _parts[0] already read

    def _start(self) -> None:
        self._framing, self._parts, self._size, self._offset = False, deque(), 0, 0

    def _flatten(self) -> None:
        """Move the kept pieces into ``buffer`` (the handshake's reads and the rare paths)."""
        parts = self._parts
        if parts:
            self.buffer += memoryview(parts.popleft())[self._offset :]
            while parts:
                self.buffer += parts.popleft()
            self._size, self._offset = 0, 0

    def feed_data(self, data: bytes | bytearray) -> None:
        if not self._framing:
            super().feed_data(data)
            return
        if self.eof:
            raise EOFError("stream ended")
        if data:
            parts = self._parts
            if len(data) < SMALL and parts and len(parts[-1]) < SMALL:
                # A peer sending a byte per record must not cost an object (and, joined, a
                # view) per byte: small pieces are joined to the small one before (_offset
                # into parts[0] stays valid: its head is unchanged).
                parts[-1] = parts[-1] + data
            else:  # bytes are immutable, kept as they are; anything else is copied once, as before
                parts.append(data if type(data) is bytes else bytes(data))
            self._size += len(data)

    def read_exact(self, n: int) -> Generator[None, None, Any]:
        self._framing = True
        while len(self.buffer) + self._size < n:
            if self.eof:
                p = len(self.buffer) + self._size
                raise EOFError(f"stream ends after {p} bytes, expected {n} bytes")
            yield
        if self.buffer:  # what the handshake's last read left: read as before, once
            self._flatten()
            head = self.buffer[:n]
            del self.buffer[:n]
            return head
        parts = self._parts
        if not parts:  # so n == 0: a frame with an empty payload (a ping, a close) ending what came
            return b""
        first = parts[0]
        offset = self._offset
        if len(first) - offset >= n:  # within one piece: itself, or a slice of it
            if offset == 0 and len(first) == n:
                parts.popleft()
                self._size -= n
                return first
            r = first[offset : offset + n]
            offset += n
            if offset == len(first):
                parts.popleft()
                offset = 0
            self._offset = offset
            self._size -= n
            return r
        views = []
        need = n
        while need:
            piece = parts[0]
            take = min(len(piece) - offset, need)
            views.append(piece if offset == 0 and take == len(piece) else memoryview(piece)[offset : offset + take])
            need -= take
            offset += take
            if offset == len(piece):
                parts.popleft()
                offset = 0
        self._offset = offset
        self._size -= n
        return b"".join(views)

    def read_line(self, m: int, too_long_exc_type: type[Exception] = RuntimeError) -> Generator[None, None, Any]:
        self._flatten()
        self._framing = False  # back to one buffer: what arrives now goes where super() looks
        return (yield from super().read_line(m, too_long_exc_type))

    def read_to_eof(self, m: int, too_long_exc_type: type[Exception] = RuntimeError) -> Generator[None, None, Any]:
        self._flatten()
        self._framing = False
        return (yield from super().read_to_eof(m, too_long_exc_type))

    def at_eof(self) -> Generator[None, None, bool]:
        self._framing = True
        while True:
            if self.buffer or self._size:
                return False
            if self.eof:
                return True
            yield

    def discard(self) -> None:
        super().discard()
        self._parts.clear()
        self._size, self._offset = 0, 0


def adopt(protocol: Any) -> None:
    """Give ``protocol`` (a websockets Protocol that has read nothing yet) a FrameReader;
    a protocol of another shape keeps its own reader."""
    reader = getattr(protocol, "reader", None)
    if type(reader) is not StreamReader or reader.buffer or reader.eof:
        return
    reader.__class__ = FrameReader
    reader._start()  # type: ignore[attr-defined]  # a FrameReader from the line above
