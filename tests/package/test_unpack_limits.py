"""Bounded unpacking: size, file count, depth, compression ratio (the issue's bombs), refused
by the same check_archive that `package set-active` runs, before anything is written."""

from __future__ import annotations

import gzip
import io
import tarfile
import time
from pathlib import Path

import pytest

from scaleout.core.errors import PackageError
from scaleout.package.archive import check_archive, extract_archive
from scaleout.package.limits import MIB, UnpackLimits

YAML = b"entry_points:\n  startup: startup.py\n"


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read in pieces (a 500 MiB member never sits in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def archive(members: list[tuple[str, int]], dirs: list[str] = ()) -> bytes:  # type: ignore[assignment]
    """A .tgz with pkg/scaleout.yaml, ``dirs`` and files of zeros: (name, size)."""
    out = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if any(len(n) > 100 for n, _ in members) else tarfile.USTAR_FORMAT
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("pkg/scaleout.yaml")
        info.size = len(YAML)
        tar.addfile(info, io.BytesIO(YAML))
        for name in dirs:
            d = tarfile.TarInfo(name)
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, Zeros(size) if size else None)  # type: ignore[arg-type]
    return out.getvalue()


def test_500_mib_of_zeros_is_refused_as_a_bomb(tmp_path: Path) -> None:
    data = archive([("pkg/zeros.bin", 500 * MIB)])
    assert len(data) < 5 * MIB  # a few MB that would unpack to 500 MiB
    started = time.monotonic()
    with pytest.raises(PackageError, match=r"expands to more than .*over 100 times its size \(a compression bomb\?\)"):
        check_archive(data)
    assert time.monotonic() - started < 2  # refused from the member's header, not after inflating it
    with pytest.raises(PackageError, match="compression bomb"):
        extract_archive(data, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_total_size_limit() -> None:
    data = archive([("pkg/a.bin", 3 * MIB), ("pkg/b.bin", 3 * MIB)])
    check_archive(data)  # 6 MiB from a few KB: small packages may expand up to 16 MiB whatever the ratio
    with pytest.raises(PackageError, match=r"expands to more than 5242880 bytes \(5.0 MiB, the limit\)"):
        check_archive(data, UnpackLimits(max_bytes=5 * MIB))


def test_100000_empty_files_are_refused(tmp_path: Path) -> None:
    data = archive([(f"pkg/f{i}", 0) for i in range(100_000)])
    with pytest.raises(PackageError, match="more than 10000 files and directories"):
        check_archive(data)
    with pytest.raises(PackageError, match="more than 10000 files"):
        extract_archive(data, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_2000_level_deep_path_gets_a_clear_error(tmp_path: Path) -> None:
    deep = "pkg/" + "/".join(["d"] * 2000) + "/x.py"
    with pytest.raises(PackageError, match=r"\(4008 characters\) has a path longer than 1024 characters"):
        extract_archive(archive([(deep, 1)]), tmp_path / "a")
    # Short names, too deep: the depth limit.
    deep = "pkg/" + "/".join(["d"] * 40) + "/x.py"
    with pytest.raises(PackageError, match="is 42 levels deep; the limit is 32"):
        extract_archive(archive([(deep, 1)]), tmp_path / "b")
    with pytest.raises(PackageError, match="levels deep"):
        extract_archive(archive([], dirs=[deep.rsplit("/", 1)[0]]), tmp_path / "c")
    ok = "pkg/" + "/".join(["d"] * 30) + "/x.py"
    assert extract_archive(archive([(ok, 1)]), tmp_path / "d") == tmp_path / "d" / "pkg"


def test_limits_are_configurable() -> None:
    data = archive([(f"pkg/f{i}", 0) for i in range(20)])
    with pytest.raises(PackageError, match="more than 10 files"):
        check_archive(data, UnpackLimits(max_files=10))
    with pytest.raises(PackageError, match="limit is 1"):
        check_archive(archive([("pkg/a/b.py", 1)]), UnpackLimits(max_depth=1))
    check_archive(data, UnpackLimits(max_files=22))  # 21 files and the folder pkg they imply
    with pytest.raises(PackageError, match="more than 21 files and directories"):
        check_archive(data, UnpackLimits(max_files=21))


def test_folders_an_archive_only_implies_count_towards_the_file_limit() -> None:
    # A re-attack: 9,997 files, each 32 folders deep in a chain of its own, unpacked to 310,000
    # folders (1.2 GiB of disk, 53 s) while the limit counted 10,000 entries.
    data = archive([(f"pkg/{i}/" + "d/" * 29 + "f", 0) for i in range(400)])
    with pytest.raises(PackageError, match="more than 10000 files and directories .*the folders it implies"):
        check_archive(data)
    check_archive(data, UnpackLimits(max_files=400 * 31 + 2))  # each chain's 30 folders and file, pkg, scaleout.yaml


def test_unpacked_files_are_private(tmp_path: Path) -> None:
    root = extract_archive(archive([("pkg/a.py", 3)]), tmp_path / "dest")
    assert (root / "a.py").stat().st_mode & 0o777 == 0o600


def raw_tar_header(name: bytes, kind: bytes, size: int) -> bytes:
    """One ustar header block, written by hand (tarfile would not write a declared size it lacks)."""
    block = bytearray(512)
    block[: len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = f"{size:011o}\0".encode()
    block[136:148] = b"00000000000\0"
    block[156:157] = kind
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def header_bomb(kind: bytes, size: int) -> bytes:
    """A .tgz whose first member is a pax header ('x', 'g') or GNU long name ('L') of ``size``
    bytes of 'a' (a pax comment record), then pkg/scaleout.yaml: small compressed, huge inside."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(raw_tar_header(b"././@PaxHeader" if kind in b"xgX" else b"././@LongLink", kind, size))
        prefix = f"{size} comment=".encode() if kind in b"xgX" else b""
        gz.write(prefix)
        left, chunk = size - len(prefix) - 1, b"a" * (1 << 20)
        while left > 0:
            gz.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        gz.write(b"\n" + bytes(-size % 512))
        gz.write(raw_tar_header(b"pkg/scaleout.yaml", b"0", len(YAML)) + YAML + bytes(-len(YAML) % 512))
        gz.write(bytes(1024))
    return out.getvalue()


@pytest.mark.parametrize(("kind", "what"), [(b"x", "pax extended header"), (b"g", "pax extended header"), (b"L", "GNU long name")])
def test_a_header_bomb_is_refused_before_it_is_read(tmp_path: Path, kind: bytes, what: str) -> None:
    # Issue 20 #8: a 3.6 MB .tgz declaring an 800 MB pax header took the controller to 3.25 GB.
    import tracemalloc

    data = header_bomb(kind, 64 * MIB)
    assert len(data) < MIB  # small compressed
    tracemalloc.start()
    try:
        with pytest.raises(PackageError, match=rf"has a {what} of 64.0 MiB; the limit is 64.0 KiB \(a header bomb\?\)"):
            check_archive(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, f"checking a header bomb allocated {peak} bytes"  # Python's tarfile holds all 64 MiB
    with pytest.raises(PackageError, match="a header bomb"):
        extract_archive(data, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    # The same kind of header within the bound is an ordinary archive.
    check_archive(header_bomb(kind, 4096 if kind != b"L" else 1000))  # (a long name is a path: at most 1024 characters)


def test_a_sparse_member_is_refused() -> None:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw_tar_header(b"pkg/scaleout.yaml", b"0", len(YAML)) + YAML + bytes(-len(YAML) % 512))
        gz.write(raw_tar_header(b"pkg/holes", b"S", 0) + bytes(1024))
    with pytest.raises(PackageError, match="sparse file"):
        check_archive(out.getvalue())


def test_100000_entries_naming_the_root_are_counted_and_refused_with_bounded_memory() -> None:
    # "./" entries unpack to nothing, so they were not counted: 100k of them passed, and a
    # tarfile stream keeps every header it read (the 838 MB peak for 100k files).
    import tracemalloc

    data = archive([], dirs=["./"] * 100_000)
    tracemalloc.start()
    try:
        with pytest.raises(PackageError, match="more than 10000 files and directories"):
            check_archive(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB, peak


def many_pax_headers(count: int, size: int) -> bytes:
    """A .tgz of ``count`` small files, each after a pax header of ``size`` bytes (a comment)."""
    out = io.BytesIO()
    body = f"{size} comment=".encode()
    body += b"a" * (size - len(body) - 1) + b"\n" + bytes(-size % 512)
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(raw_tar_header(b"pkg/scaleout.yaml", b"0", len(YAML)) + YAML + bytes(-len(YAML) % 512))
        for i in range(count):
            gz.write(raw_tar_header(b"././@PaxHeader", b"x", size) + body)
            gz.write(raw_tar_header(f"pkg/f{i}".encode(), b"0", 0))
        gz.write(bytes(1024))
    return out.getvalue()


def test_many_pax_headers_within_the_per_header_bound_are_refused_in_all() -> None:
    # Each 60 KB header passes max_header; 9,000 of them (540 MB) took 27 s of CPU to check.
    data = many_pax_headers(300, 60_000)  # 18 MB of headers
    assert len(data) < MIB
    with pytest.raises(PackageError, match=r"more than 16.0 MiB of pax extended headers and GNU long names in all \(the limit; a header bomb\?\)"):
        check_archive(data)
    check_archive(many_pax_headers(20, 60_000))  # 1.2 MB of them: an ordinary archive


def test_a_pax_size_tarfile_and_the_walk_would_read_differently_is_refused() -> None:
    # A re-attack: pax "size=+0" is 0 to tarfile's int() but not a number to a strict reader, so
    # the two disagreed on where the next header starts and a hidden 1 GB header got through.
    record = b" size=+0\n"
    body = str(len(record) + 2).encode() + record
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw_tar_header(b"././@PaxHeader", b"x", len(body)) + body + bytes(-len(body) % 512))
        gz.write(raw_tar_header(b"pkg/scaleout.yaml", b"0", len(YAML)) + YAML + bytes(-len(YAML) % 512))
        gz.write(bytes(1024))
    with pytest.raises(PackageError, match=r"a pax size that is not a plain number \(b'\+0'\)"):
        check_archive(out.getvalue())


def test_a_member_of_a_type_the_walk_does_not_know_is_refused() -> None:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw_tar_header(b"pkg/scaleout.yaml", b"0", len(YAML)) + YAML + bytes(-len(YAML) % 512))
        gz.write(raw_tar_header(b"pkg/volume", b"V", 0))
        gz.write(bytes(1024))
    with pytest.raises(PackageError, match=r"a member of tar type b'V'; only regular files and directories are allowed"):
        check_archive(out.getvalue())


# -- the re-attack: headers the old pre-walk and tarfile read differently ---------------------
# The walk that ran before tarfile mirrored its offsets; each case below made the two disagree
# on where the next header starts, so a 64 MiB pax header (standing for a gigabyte) hid behind
# a small one. Now one strict reader parses everything: each is refused without reading it.

HIDDEN = 64 * MIB


def with_checksum(block: bytearray, signed: bool = False) -> bytes:
    block[148:156] = b" " * 8
    if signed:  # a base-256 negative checksum, as a signed-sum writer might store it
        total = sum(b - 256 if b > 127 else b for b in block)
        block[148:156] = b"\xff" + (256**7 + total).to_bytes(7, "big")
    else:
        block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def header(name: bytes, kind: bytes, size: int | bytes, signed: bool = False, fill: bytes = b"") -> bytes:
    block = bytearray(raw_tar_header(name, kind, 0))
    if isinstance(size, bytes):
        block[124:136] = size
    else:
        block[124:136] = f"{size:011o}\0".encode()
    if fill:
        block[157:157 + len(fill)] = fill
    return with_checksum(block, signed)


def record(key: bytes, value: bytes) -> bytes:
    rest = b" " + key + b"=" + value + b"\n"
    n = len(rest) + 1
    while len(str(n)) + len(rest) != n:
        n += 1
    return str(n).encode() + rest


def pax(body: bytes, kind: bytes = b"x", declared: int | None = None) -> bytes:
    return header(b"././@PaxHeader", kind, len(body) if declared is None else declared) + body + bytes(-len(body) % 512)


def bomb_header() -> bytes:
    """A 64 MiB pax header, written as a 'file' after a header that claims to own it."""
    return header(b"pkg/bomb", b"x", HIDDEN)


def hiding(*parts: bytes) -> bytes:
    """A .tgz: pkg/scaleout.yaml, ``parts``, then (unless a part already wrote it) the bomb body."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        gz.write(raw_tar_header(b"pkg/scaleout.yaml", b"0", len(YAML)) + YAML + bytes(-len(YAML) % 512))
        for part in parts:
            gz.write(part)
        gz.write(bomb_header())
        chunk = b"A" * MIB
        for _ in range(HIDDEN // MIB):
            gz.write(chunk)
        gz.write(raw_tar_header(b"pkg/end", b"0", 0) + bytes(1024))
    return out.getvalue()


OWNS_BOMB = 512 + HIDDEN  # a size that makes the bomb's header and body a member's data
REATTACKS = {
    "two pax headers in a row": (hiding(pax(record(b"size", b"0")), pax(record(b"mtime", b"1")), header(b"pkg/f", b"0", OWNS_BOMB)), "two pax extended headers"),
    "pax, long name, pax": (hiding(pax(record(b"size", b"0")), header(b"././@LongLink", b"L", 6) + b"pkg/g\0" + bytes(506), pax(record(b"mtime", b"1")), header(b"pkg/f", b"0", OWNS_BOMB)), "in a row"),
    "pax, long link name, pax": (hiding(pax(record(b"size", b"0")), header(b"././@LongLink", b"K", 4) + b"abc\0" + bytes(508), header(b"pkg/f", b"0", OWNS_BOMB)), "a link"),
    "global header's size": (hiding(pax(record(b"size", str(OWNS_BOMB).encode()), b"g"), header(b"pkg/f", b"0", 0)), "pax global header that sets"),
    "record longer than its header": (hiding(pax(record(b"size", b"0"), declared=len(record(b"size", b"0")) - 1), header(b"pkg/f", b"0", OWNS_BOMB)), "malformed pax extended header"),
    "huge record length": (hiding(pax(b"99999999999 size=0\n"), header(b"pkg/f", b"0", OWNS_BOMB)), "malformed pax extended header"),
    "empty keyword before size": (hiding(pax(b"7 =abc\n" + record(b"size", str(OWNS_BOMB).encode())), header(b"pkg/f", b"0", 0)), "record without a name"),
    "negative base-256 size": (hiding(header(b"pkg/f", b"0", b"\xff" * 12)), "size is not a number"),
    "negative checksum": (hiding(with_checksum(bytearray(bomb_header()[:157] + b"\x80" * 100 + bomb_header()[257:]), signed=True)), "checksum is not a number"),
    "\\x1c around an octal size": (hiding(header(b"pkg/d/", b"5", b"\x1c0000000000\0")), "size is not a number"),
    "old-style file named like a directory": (hiding(header(b"pkg/d/", b"\0", OWNS_BOMB)), "is a directory with"),
}


@pytest.mark.parametrize("case", list(REATTACKS), ids=list(REATTACKS))
def test_headers_two_readers_would_read_differently_are_refused_without_reading_the_bomb(case: str) -> None:
    import tracemalloc

    data, message = REATTACKS[case]
    assert len(data) < MIB
    tracemalloc.start()
    try:
        with pytest.raises(PackageError, match=message):
            check_archive(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB, f"checking {case!r} allocated {peak} bytes"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_what_tar_writers_write_unpacks(tmp_path: Path, fmt: int) -> None:
    # Long paths (a GNU long name or a pax path), non-ASCII names, empty directories, the
    # executable bit and a git-archive-style global header all come through one reader.
    deep = "pkg/" + "/".join(["d" * 40] * 2) + ("/" + "f" * 30 + ".py" if fmt != tarfile.USTAR_FORMAT else "/f.py")
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w", format=fmt) as tar:
        if fmt == tarfile.PAX_FORMAT:
            tar.pax_headers = {"comment": "0123456789abcdef"}  # what git archive writes
        for name, body, mode in [("pkg/scaleout.yaml", YAML, 0o644), (deep, b"x = 1\n", 0o644), ("pkg/ünï/ß.py", b"", 0o644), ("pkg/run.sh", b"#!/bin/sh\n", 0o755)]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), mode
            tar.addfile(info, io.BytesIO(body))
        empty = tarfile.TarInfo("pkg/empty")
        empty.type = tarfile.DIRTYPE
        tar.addfile(empty)
    root = extract_archive(out.getvalue(), tmp_path / "dest")
    assert (root / deep.removeprefix("pkg/")).read_bytes() == b"x = 1\n"
    assert (root / "ünï" / "ß.py").is_file() and (root / "empty").is_dir()
    assert (root / "run.sh").stat().st_mode & 0o100


def test_a_pax_path_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    data = hiding(pax(record(b"path", b"pkg/a\0b")), header(b"pkg/f", b"0", 0))
    with pytest.raises(PackageError, match="NUL byte"):
        extract_archive(data, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_empty_global_headers_each_count_a_block() -> None:
    # A re-attack: 500,000 empty 'g' headers (1.1 MB) cost 19 s of CPU and counted towards nothing.
    data = hiding(*[pax(b"", b"g")] * 200)
    with pytest.raises(PackageError, match="more than 64.0 KiB of pax extended headers"):
        check_archive(data, UnpackLimits(max_headers=64 * 1024))


def test_millions_of_tiny_pax_records_are_refused_before_they_are_parsed() -> None:
    # A re-attack: 16 MiB of "5 a=\n" records (3.3 million) took 10 s of CPU to parse.
    body = b"5 a=\n" * 12_000
    parts = [pax(body) + header(f"pkg/f{i}".encode(), b"0", 0) for i in range(3)]
    with pytest.raises(PackageError, match="more than 16000 pax records in all"):
        check_archive(hiding(*parts), UnpackLimits(max_files=1000))


@pytest.mark.parametrize("name", [b".", b"./.", b"./"])
def test_a_file_named_like_the_root_is_refused(name: bytes) -> None:
    # A re-attack: a file named "." mapped to the package root, so its (1 GiB) data was skipped
    # by every size limit.
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw_tar_header(b"pkg/scaleout.yaml", b"0", len(YAML)) + YAML + bytes(-len(YAML) % 512))
        gz.write(raw_tar_header(name, b"0", 1024) + bytes(1024) + bytes(1024))
    with pytest.raises(PackageError, match="is a file named like the package's root|is a directory with"):
        check_archive(out.getvalue())
