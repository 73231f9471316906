"""A strict, bounded reader of the tar stream inside a compute package.

Python's ``tarfile`` reads a pax header or GNU long name whole into memory, follows
headers it cannot parse in its own ways (negative base-256 sizes, a global header's size,
a regular file named like a directory, ...) and keeps every header it read in a stream.
A checker that walks the headers first and then lets ``tarfile`` read them again has two
readers to agree: an attacker only needs them to disagree once to hide a gigabyte header.
So this reader is the only one: it accepts what ``tar``, ``git archive`` and ``tarfile``
write for a folder of files (ustar, GNU and pax formats; regular files and directories) and
refuses everything else with a reason, reading at most ``max_header`` bytes of any header
into memory and at most ``max_headers`` of them in all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from scaleout.core.errors import PackageError
from scaleout.core.units import fmt_bytes
from scaleout.package.limits import UnpackLimits

BLOCK = 512
TRAILING_MAX = 16 << 20  # zero bytes tolerated after the end-of-archive blocks (tar -b 4096 pads to 2 MiB records)
RECORDS_PER_MEMBER = 16  # pax records allowed per member limit: parsing millions of "5 a=\n" costs seconds
_CHUNK = 1 << 16

_FILE_TYPES = (b"0", b"\0", b"7")  # regular, old-style regular, contiguous (a regular file to every reader)
_LINK_TYPES = (b"1", b"2", b"3", b"4", b"6")  # hard and soft links, devices, fifos
_NUMBER = re.compile(rb"[ \0]*([0-7]*)[ \0]*")
_RECORD_LENGTH = re.compile(rb"([1-9][0-9]{0,7}) ")


@dataclass(frozen=True)
class Member:
    """One entry of the archive: a regular file or a directory."""

    name: str
    is_dir: bool
    size: int  # bytes of data (0 for a directory)
    mode: int


def _number(field: bytes, what: str) -> int:
    """A header's number: octal text (NUL- or space-padded) or GNU's positive base-256."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    match = _NUMBER.fullmatch(field)
    if match is None or field[:1] == b"\xff":
        raise PackageError(f"package archive is corrupt: a tar header's {what} is not a number ({bytes(field)!r})")
    digits = match.group(1)
    return int(digits, 8) if digits else 0


def _text(raw: bytes, what: str) -> str:
    if b"\0" in raw:
        raise PackageError(f"package archive has a {what} with a NUL byte in it ({raw[:60]!r})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PackageError(f"package archive has a {what} that is not UTF-8 ({raw[:60]!r})") from None


def _pax_records(body: bytes) -> dict[bytes, bytes]:
    """The ``LEN key=value\\n`` records of a pax header, every byte of it accounted for."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        match = _RECORD_LENGTH.match(body, pos)
        end = pos + int(match.group(1)) if match else 0
        if match is None or end > len(body) or body[end - 1 : end] != b"\n" or b"=" not in body[match.end() : end]:
            raise PackageError(f"package archive has a malformed pax extended header (at byte {pos} of {len(body)})")
        key, _, value = body[match.end() : end - 1].partition(b"=")
        if not key or b"\0" in key:
            raise PackageError("package archive has a pax extended header record without a name")
        records[key] = value
        pos = end
    if any(body[pos:]):
        raise PackageError("package archive has data after the records of a pax extended header")
    return records


class TarStream:
    """Iterate the members of an uncompressed tar stream (``f``, read sequentially).

    Each member's data is read with :meth:`copy_to` before the next one is asked for;
    data not read is skipped. The iteration ends at the end-of-archive blocks; anything that
    is not a well-formed regular file or directory raises :class:`PackageError`."""

    def __init__(self, f: BinaryIO, limits: UnpackLimits) -> None:
        self.f = f
        self.limits = limits
        self.headers = 0  # bytes of pax headers and GNU long names so far, each at least a block
        self.records = 0  # pax records so far
        self._left = 0  # data of the current member not yet read, padding included
        self._data = 0  # of which data (the rest is padding)

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left > 0:
            chunk = self.f.read(min(left, _CHUNK))
            if not chunk:
                raise PackageError("package archive is corrupt or unreadable: the tar ends in the middle of a member")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = self.f.read(min(n, _CHUNK))
            if not chunk:
                raise PackageError("package archive is corrupt or unreadable: the tar ends in the middle of a member")
            n -= len(chunk)

    def copy_to(self, out: BinaryIO) -> None:
        """Write the current member's data to ``out``."""
        while self._data > 0:
            chunk = self.f.read(min(self._data, _CHUNK))
            if not chunk:
                raise PackageError("package archive is corrupt or unreadable: the tar ends in the middle of a member")
            out.write(chunk)
            self._data -= len(chunk)
            self._left -= len(chunk)

    def _header(self) -> bytes | None:
        """The next header block; None at the end of the archive."""
        block = self.f.read(BLOCK)
        if len(block) < BLOCK:
            raise PackageError("package archive is corrupt or unreadable: the tar has no end-of-archive marker")
        if not any(block):
            return None
        stored = _number(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
        # The signed sum (old writers') only when the unsigned one fails: a byte loop per header cost 3 s for 10,000 members.
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in block[:148] + block[156:]):
            raise PackageError("package archive is corrupt or unreadable: a tar header's checksum is wrong")
        return block

    def _meta(self, size: int, kind: bytes) -> bytes:
        """The body of a pax header or GNU long name, within the limits."""
        what = "GNU long name" if kind == b"L" else "pax extended header"
        if size > self.limits.max_header:
            raise PackageError(
                f"package archive has a {what} of {fmt_bytes(size)}; the limit is {fmt_bytes(self.limits.max_header)} (a header bomb?)"
            )
        self.headers += BLOCK + size  # an empty one costs its header block: a million of them are refused too
        if self.headers > self.limits.max_headers:
            raise PackageError(
                f"package archive has more than {fmt_bytes(self.limits.max_headers)} of pax extended headers and GNU long names in all (the limit; a header bomb?)"
            )
        return self._read(-(-size // BLOCK) * BLOCK)[:size]

    def __iter__(self) -> Iterator[Member]:
        pax: dict[bytes, bytes] | None = None  # the 'x' header for the next member
        long_name: bytes | None = None  # the 'L' name for the next member
        while True:
            self._skip(self._left)
            self._left = self._data = 0
            block = self._header()
            if block is None:
                if pax is not None or long_name is not None:
                    raise PackageError("package archive ends after a pax extended header or GNU long name, without its member")
                self._trailing()
                return
            kind = block[156:157]
            size = _number(block[124:136], "size")
            if kind in (b"x", b"L"):
                if (pax if kind == b"x" else long_name) is not None:
                    raise PackageError("package archive has two pax extended headers or GNU long names in a row for one member")
                body = self._meta(size, kind)
                if kind == b"x":
                    pax = self._checked_pax(body)
                else:
                    long_name = body.rstrip(b"\0")
                continue
            if kind == b"g":
                records = self._checked_pax(self._meta(size, kind))
                if b"path" in records or b"size" in records:
                    raise PackageError("package archive has a pax global header that sets every member's path or size")
                continue
            if kind == b"S" or (pax is not None and any(key.startswith(b"GNU.sparse") for key in pax)):
                raise PackageError("package archive holds a sparse file; only regular files and directories are allowed")
            if kind == b"K":
                raise PackageError("package archive holds a link (a GNU long link name); only regular files and directories are allowed")
            name = self._name(block, pax, long_name)
            if kind in _LINK_TYPES:
                raise PackageError(f"package archive member {shown(name)} is a link or special file; only regular files and directories are allowed")
            if kind not in _FILE_TYPES and kind != b"5":
                raise PackageError(f"package archive holds a member of tar type {kind!r}; only regular files and directories are allowed")
            if pax is not None and b"size" in pax:
                size = int(pax[b"size"])
            is_dir = kind == b"5" or name.endswith("/")
            if is_dir and size:
                raise PackageError(f"package archive member {shown(name)} is a directory with {size} bytes of data")
            pax = long_name = None
            self._data, self._left = size, -(-size // BLOCK) * BLOCK
            yield Member(name=name, is_dir=is_dir, size=size, mode=_number(block[100:108], "mode"))

    def _checked_pax(self, body: bytes) -> dict[bytes, bytes]:
        self.records += body.count(b"\n")  # an upper bound of its records, known before parsing them
        most = RECORDS_PER_MEMBER * max(self.limits.max_files, 1000)
        if self.records > most:
            raise PackageError(f"package archive has more than {most} pax records in all (the limit; a header bomb?)")
        records = _pax_records(body)
        size = records.get(b"size")
        if size is not None and not re.fullmatch(rb"[0-9]{1,20}", size):
            raise PackageError(f"package archive has a pax size that is not a plain number ({size[:20]!r})")
        return records

    def _name(self, block: bytes, pax: dict[bytes, bytes] | None, long_name: bytes | None) -> str:
        if pax is not None and b"path" in pax:
            return _text(pax[b"path"], "member name")
        if long_name is not None:
            return _text(long_name, "member name")
        name = block[:100].split(b"\0", 1)[0]
        if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix holds the start of a long path (GNU's holds times)
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        return _text(name, "member name")

    def _trailing(self) -> None:
        """After the end-of-archive marker only zero padding may follow (read, so gzip checks its CRC)."""
        seen = 0
        while chunk := self.f.read(_CHUNK):
            seen += len(chunk)
            if seen > TRAILING_MAX or any(chunk):
                raise PackageError("package archive has trailing data after the end of the tar")


def shown(name: str) -> str:
    """A member's name in a message: a hostile one may be thousands of characters long."""
    return repr(name) if len(name) <= 120 else repr(name[:100] + "...") + f" ({len(name)} characters)"
