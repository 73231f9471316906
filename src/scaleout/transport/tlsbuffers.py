"""TLS buffers for asyncio that do not stay large: adaptive reads, and writes in pieces.

asyncio's SSLProtocol allocates and zero-fills a 256 KiB read buffer per TLS connection
(``SSLProtocol.max_size``), so every connected client costs a combiner about 290 KB of
resident memory before it sends a byte: 10,000 idle clients would hold 2.8 GB. A fixed
smaller buffer slows bulk transfers down a lot (32 KiB reads measured at a quarter of the
throughput). So the buffer starts at INITIAL bytes, doubles (up to READ_MAX) each time a
read fills it, and falls back to INITIAL after SHRINK_AFTER reads that needed only a little.
READ_MAX and the read-ahead limit stay at 64 KiB because OpenSSL's incoming BIO, like the
outgoing one, keeps the largest size it held: 256 KiB reads left ~0.6 MB on every link that
once received an update.

Writes: asyncio encrypts a whole queued message into the connection's outgoing memory BIO
before handing it to the socket, and OpenSSL's memory BIO keeps its largest size: after a
1 MiB frame each connection holds about 1 MiB for good (a combiner that sent the model to
80 clients kept ~80 MB). Encrypting in WRITE_PIECE slices, each passed on at once, keeps
that BIO small (measured: 80 clients, 1M params, 250 -> 165 MB resident after a round).
Nothing is encrypted while the socket takes nothing (the connection is paused): the rest of
a frame waits in the backlog as the caller's buffer (a view of the model), not as a second,
encrypted copy per slow peer; it goes on when the socket resumes.

`install()` patches SSLProtocol once per process (idempotent); every TLS link of the
process, client or server side, then uses it. Only ``_ssl_buffer``/``_ssl_buffer_view``
of SSLProtocol are touched, which CPython 3.11 to 3.13 share; on anything else this is a
no-op and asyncio keeps its own behaviour.
"""

from __future__ import annotations

import asyncio.sslproto as sslproto
from typing import Any

INITIAL = 16 * 1024
SHRINK_AFTER = 8  # consecutive small reads before a grown buffer is given back
WRITE_PIECE = 64 * 1024  # bytes encrypted at a time before they go to the socket
# The largest read, and the ciphertext read ahead of a reader that is not taking it: OpenSSL's
# incoming memory BIO keeps the largest size it held for the connection's life, so each link
# that once received a bulk payload would keep ~340 KiB there (plus its 256 KiB read buffer
# until SHRINK_AFTER small reads, which an idle link never makes): a combiner that pulled
# 40 updates held ~24 MB more than one that pulled 10.
READ_MAX = 64 * 1024
READ_HIGH_WATER = 64 * 1024

_installed = False


def install() -> bool:
    """Patch asyncio's SSLProtocol; True if it is (now or already) patched."""
    global _installed
    cls: Any = getattr(sslproto, "SSLProtocol", None)
    if _installed:
        return True
    if cls is None or not all(hasattr(cls, a) for a in ("get_buffer", "buffer_updated", "max_size")):
        return False
    original_init, original_updated = cls.__init__, cls.buffer_updated

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        _resize(self, INITIAL)
        if hasattr(self, "_set_read_buffer_limits"):
            self._set_read_buffer_limits(READ_HIGH_WATER)
        self._scaleout_small_reads = 0

    def get_buffer(self: Any, n: int) -> memoryview:
        return self._ssl_buffer_view  # type: ignore[no-any-return]

    def buffer_updated(self: Any, nbytes: int) -> None:
        original_updated(self, nbytes)  # copies the bytes out of the buffer first
        size = len(self._ssl_buffer)
        if nbytes >= size and size < min(READ_MAX, self.max_size):
            _resize(self, min(size * 2, READ_MAX, self.max_size))
            self._scaleout_small_reads = 0
        elif size > INITIAL and nbytes < INITIAL:
            self._scaleout_small_reads += 1
            if self._scaleout_small_reads >= SHRINK_AFTER:
                _resize(self, INITIAL)
                self._scaleout_small_reads = 0
        else:
            self._scaleout_small_reads = 0

    cls.__init__, cls.get_buffer, cls.buffer_updated = __init__, get_buffer, buffer_updated
    again = getattr(sslproto, "SSLAgainErrors", None)
    if again is not None and hasattr(cls, "_do_write") and hasattr(cls, "_process_outgoing"):

        wrapped = getattr(getattr(sslproto, "SSLProtocolState", None), "WRAPPED", None)
        original_resume = cls.resume_writing

        def _do_write(self: Any) -> None:
            try:
                # A socket that takes nothing (paused) gets nothing more encrypted for it: the
                # plaintext (views of a model being sent) waits in the backlog, uncopied, so a
                # slow peer holds at most a piece of ciphertext here, never a whole frame.
                # Flushing (closing) writes everything out.
                while self._write_backlog and not (self._ssl_writing_paused and self._state == wrapped):
                    data = self._write_backlog[0]
                    view = data if isinstance(data, memoryview) else memoryview(data)
                    count = self._sslobj.write(view[:WRITE_PIECE])
                    if count < len(view):
                        self._write_backlog[0] = view[count:]
                    else:
                        del self._write_backlog[0]
                    self._write_buffer_size -= count
                    self._process_outgoing()  # out of the BIO at once: it never holds more than a piece
            except again:
                pass
            self._process_outgoing()

        def resume_writing(self: Any) -> None:
            original_resume(self)
            if self._write_backlog and self._state == wrapped:  # what waited for the socket goes on
                try:
                    self._do_write()
                except Exception as exc:  # as asyncio's own writes end: the connection fails, not the loop
                    self._fatal_error(exc, "Fatal error on SSL protocol")

        cls._do_write = _do_write
        if wrapped is not None:
            cls.resume_writing = resume_writing
    _installed = True
    return True


def _resize(protocol: Any, size: int) -> None:
    protocol._ssl_buffer = bytearray(size)
    protocol._ssl_buffer_view = memoryview(protocol._ssl_buffer)
