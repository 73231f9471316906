"""TLS buffers for asyncio that do not stay large: adaptive reads, and writes in pieces.

asyncio's SSLProtocol allocates and zero-fills a 256 KiB read buffer per TLS connection
(``SSLProtocol.max_size``), so every connected client costs a combiner about 290 KB of
resident memory before it sends a byte: 10,000 idle clients would hold 2.8 GB. A fixed
smaller buffer slows bulk transfers down a lot (32 KiB reads measured at a quarter of the
throughput). So the buffer starts at INITIAL bytes, doubles (up to ``max_size``) each time a
read fills it, and falls back to INITIAL after SHRINK_AFTER reads that needed only a little.

Writes: asyncio encrypts a whole queued message into the connection's outgoing memory BIO
before handing it to the socket, and OpenSSL's memory BIO keeps its largest size: after a
1 MiB frame each connection holds about 1 MiB for good (a combiner that sent the model to
80 clients kept ~80 MB). Encrypting in WRITE_PIECE slices, each passed on at once, keeps
that BIO small (measured: 80 clients, 1M params, 250 -> 165 MB resident after a round).

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
        self._scaleout_small_reads = 0

    def get_buffer(self: Any, n: int) -> memoryview:
        return self._ssl_buffer_view  # type: ignore[no-any-return]

    def buffer_updated(self: Any, nbytes: int) -> None:
        original_updated(self, nbytes)  # copies the bytes out of the buffer first
        size = len(self._ssl_buffer)
        if nbytes >= size and size < self.max_size:
            _resize(self, min(size * 2, self.max_size))
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

        def _do_write(self: Any) -> None:
            try:
                while self._write_backlog:
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

        cls._do_write = _do_write
    _installed = True
    return True


def _resize(protocol: Any, size: int) -> None:
    protocol._ssl_buffer = bytearray(size)
    protocol._ssl_buffer_view = memoryview(protocol._ssl_buffer)
