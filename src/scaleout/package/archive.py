"""Compute package archives: a deterministic .tgz of the package directory, and safe extraction.

`.scaleoutignore` follows a subset of gitignore: `#` comments, `dir/` (directories only),
`*`, `?`, `[abc]`, `**/`, a leading or inner `/` anchors to the package root, `!` re-includes.
As in git, a file inside an excluded directory cannot be re-included.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from scaleout.core.errors import PackageError
from scaleout.core.units import fmt_bytes
from scaleout.package.limits import UnpackLimits
from scaleout.package.project import PROJECT_FILE, load_project, project_file

IGNORE_FILE = ".scaleoutignore"
ALWAYS_IGNORED = ["__pycache__/", "*.pyc", ".git/"]
DEFAULT_LIMITS = UnpackLimits()

_Rule = tuple[re.Pattern[str], bool, bool]  # (regex, negated, directories only)


def read_ignore(root: Path) -> list[str]:
    """Patterns from `root/.scaleoutignore` (else FEDn's `.fednignore`), in order (empty if there is none)."""
    path = root / IGNORE_FILE
    if not path.is_file():
        path = root / ".fednignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _glob_to_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 1)) > i + 1:
            body = glob[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body[0] == "!" else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def _compile(patterns: list[str]) -> list[_Rule]:
    rules: list[_Rule] = []
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if not pattern:
            continue
        anchored = "/" in pattern  # gitignore: a slash anywhere but the end anchors to the root
        regex = _glob_to_regex(pattern.lstrip("/"))
        rules.append((re.compile(regex if anchored else "(?:.*/)?" + regex), negated, dir_only))
    return rules


def _ignored(rel: str, is_dir: bool, rules: list[_Rule]) -> bool:
    ignored = False
    for regex, negated, dir_only in rules:  # the last matching rule wins
        if (is_dir or not dir_only) and regex.fullmatch(rel):
            ignored = not negated
    return ignored


def _package_files(root: Path, skip: Path | None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of directories and files to pack, sorted, ignores applied."""
    rules = _compile(ALWAYS_IGNORED + read_ignore(root))
    entries: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel_base = base.relative_to(root).as_posix()
        prefix = "" if rel_base == "." else rel_base + "/"
        kept = []
        for name in sorted(dirnames):
            path = base / name
            if not path.is_symlink() and not _ignored(prefix + name, True, rules):
                kept.append(name)
                entries.append((prefix + name, path))
        dirnames[:] = kept
        for name in sorted(filenames):
            path = base / name
            # Symlinks are skipped: extraction refuses them, and they may point outside the package.
            if path.is_symlink() or path == skip or _ignored(prefix + name, False, rules):
                continue
            entries.append((prefix + name, path))
    return sorted(entries)


def create_archive(
    root: Path,
    out: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Pack `root` into `out` (default `<root.parent>/<root.name>.tgz`) under a `<root.name>/` dir.

    The archive is deterministic: the same tree gives the same bytes. `progress(done, total)`
    is called with bytes of file content packed so far.
    """
    load_project(root)  # refuse a directory that is not a valid package
    root = root.resolve()
    out = (out if out is not None else root.parent / f"{root.name}.tgz").resolve()
    entries = _package_files(root, skip=out)
    total = sum(path.stat().st_size for _, path in entries if path.is_file())
    done = 0
    part = out.with_name(out.name + ".part")
    try:
        with open(part, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel, path in entries:
                    info = tarfile.TarInfo(f"{root.name}/{rel}")
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    if path.is_dir():
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                        continue
                    info.size = path.stat().st_size
                    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                    done += info.size
                    if progress is not None:
                        progress(done, total)
        os.replace(part, out)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise PackageError(f"cannot write package archive {out}: {exc}") from exc
    return out


def _member_path(name: str) -> PurePosixPath | None:
    """The safe relative path of an archive member; None for the archive's own root."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise PackageError(f"package archive member {_shown(name)} has an absolute path")
    path = PurePosixPath(name.replace("\\", "/"))
    if ".." in path.parts:
        raise PackageError(f"package archive member {_shown(name)} escapes the package directory")
    parts = [p for p in path.parts if p != "."]
    return PurePosixPath(*parts) if parts else None


def _shown(name: str) -> str:
    """A member's name in a message: a hostile one may be thousands of characters long."""
    return repr(name) if len(name) <= 120 else repr(name[:100] + "...") + f" ({len(name)} characters)"


class _Budget:
    """Counts what an archive unpacks to, refusing it at the first limit it passes."""

    def __init__(self, limits: UnpackLimits, archive_size: int) -> None:
        self.limits = limits
        self.max_total = limits.max_total(archive_size)
        self.archive_size = archive_size
        self.files = 0
        self.total = 0

    def member(self, member: tarfile.TarInfo) -> PurePosixPath | None:
        """Check one member's path, kind and size; its safe relative path (None: the root)."""
        lim = self.limits
        if len(member.name) > lim.max_path:
            raise PackageError(f"package archive member {_shown(member.name)} has a path longer than {lim.max_path} characters")
        rel = _member_path(member.name)
        if rel is None:
            return None
        if len(rel.parts) > lim.max_depth:
            raise PackageError(
                f"package archive member {_shown(member.name)} is {len(rel.parts)} levels deep; the limit is {lim.max_depth}"
            )
        if not (member.isdir() or member.isreg()):
            raise PackageError(
                f"package archive member {_shown(member.name)} is a link or special file; only "
                "regular files and directories are allowed"
            )
        self.files += 1
        if self.files > lim.max_files:
            raise PackageError(f"package archive has more than {lim.max_files} files and directories (the limit)")
        if member.isreg():
            self.total += member.size
            if self.total > self.max_total:
                if self.max_total < lim.max_bytes:
                    raise PackageError(
                        f"package archive of {fmt_bytes(self.archive_size)} expands to more than {fmt_bytes(self.max_total)}: "
                        f"over {lim.max_ratio} times its size (a compression bomb?)"
                    )
                raise PackageError(f"package archive expands to more than {self.max_total} bytes ({fmt_bytes(self.max_total)}, the limit)")
        return rel


_BLOCK = 512
# pax extended/global headers (Solaris' 'X' too), GNU long name/link: tarfile reads them whole
_META_TYPES = (b"x", b"g", b"X", b"L", b"K")
_DATA_FREE_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: tarfile skips no data for them
_DATA_TYPES = (b"0", b"\0", b"7")  # regular files (contiguous ones too): their data is skipped


def _scan_headers(data: bytes, limits: UnpackLimits) -> None:
    """Walk the tar headers of a .tgz with bounded reads, before tarfile parses them.

    tarfile reads a pax header ('x', 'g') or a GNU long name ('L', 'K') whole into memory:
    a 3.6 MB .tgz declaring an 800 MB pax header took 3.25 GB to check. Here each is read
    only when it is at most ``limits.max_header`` bytes, and all of them together at most
    ``limits.max_headers`` (9,000 of 60 KB took 27 s of CPU to parse), sparse members (whose maps tarfile
    also gathers without bound) are refused, and every member counts towards
    ``limits.max_files``, the archive's own root entries included. Anything else that is
    malformed is left to tarfile, which refuses it (the walk simply stops).
    """
    gz = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
    members = 0
    headers = 0  # bytes of pax and long-name headers so far
    size_next: int | None = None  # a pax 'x' header's size for the member that follows
    size_all: int | None = None  # a pax 'g' header's, for every member after it
    with gz:
        while True:
            block = _read_up_to(gz, _BLOCK)
            if len(block) < _BLOCK or block == bytes(_BLOCK) or not _checksum_ok(block):
                return  # the end, or tarfile's to refuse
            kind, size = block[156:157], _octal(block[124:136])
            if size is None:
                return
            if kind in _META_TYPES:
                if size > limits.max_header:
                    what = "pax extended header" if kind in (b"x", b"g", b"X") else "GNU long name"
                    raise PackageError(
                        f"package archive has a {what} of {fmt_bytes(size)}; the limit is {fmt_bytes(limits.max_header)} (a header bomb?)"
                    )
                headers += size
                if headers > limits.max_headers:
                    raise PackageError(
                        f"package archive has more than {fmt_bytes(limits.max_headers)} of pax extended headers and GNU long names in all (the limit; a header bomb?)"
                    )
                body = _read_up_to(gz, -(-size // _BLOCK) * _BLOCK)[:size]
                if kind in (b"x", b"g", b"X"):
                    records = _pax_records(body)
                    if any(key.startswith(b"GNU.sparse") for key in records):
                        raise PackageError("package archive holds a sparse file; only regular files and directories are allowed")
                    size_text = records.get(b"size")
                    if size_text is not None and not re.fullmatch(rb"[0-9]{1,20}", size_text):
                        # tarfile reads "+0", "5_0" or " 5" with int(): this walk and tarfile would
                        # disagree on where the next header starts, so such a header is refused.
                        raise PackageError(f"package archive has a pax size that is not a plain number ({size_text[:20]!r})")
                    declared = _int_or_none(size_text)
                    if kind != b"g":
                        size_next = declared
                    elif declared is not None:
                        size_all = declared
                continue
            if kind == b"S":
                raise PackageError("package archive holds a sparse file; only regular files and directories are allowed")
            if kind not in _DATA_TYPES and kind not in _DATA_FREE_TYPES:
                # A type this walk does not know may be one tarfile reads whole (as it does 'X'): refused.
                raise PackageError(f"package archive holds a member of tar type {kind!r}; only regular files and directories are allowed")
            members += 1
            if members > limits.max_files:
                raise PackageError(f"package archive has more than {limits.max_files} files and directories (the limit)")
            if size_next is not None:
                size = size_next
            elif size_all is not None:
                size = size_all
            size_next = None
            if kind not in _DATA_FREE_TYPES:
                _skip(gz, -(-size // _BLOCK) * _BLOCK)


def _read_up_to(f: gzip.GzipFile, n: int) -> bytes:
    parts, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 16))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _skip(f: gzip.GzipFile, n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 16))
        if not chunk:
            return
        n -= len(chunk)


def _checksum_ok(block: bytes) -> bool:
    stored = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 32
    return stored is not None and stored in (unsigned, signed)


def _octal(field: bytes) -> int | None:
    """A tar number field: octal text, or base-256 (a leading 0x80 byte) as GNU writes big ones."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return None if field[:1] == b"\xff" else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _pax_records(body: bytes) -> dict[bytes, bytes]:
    """The "LEN key=value\\n" records of a pax header (stops at the first malformed one)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(body):
        space = body.find(b" ", pos)
        length = _int_or_none(body[pos:space]) if space > pos else None
        if length is None or length <= 0 or pos + length > len(body):
            break
        key, _, value = body[space + 1 : pos + length].partition(b"=")
        out[key] = value.rstrip(b"\n")
        pos += length
    return out


def _int_or_none(text: bytes | None) -> int | None:
    try:
        return int(text) if text is not None and text.strip().isdigit() else None
    except ValueError:
        return None


def _members(data: bytes, limits: UnpackLimits) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, PurePosixPath]]:
    """Each member of a .tgz with its safe path, within ``limits``; the archive is read to
    its end, so a truncated or corrupt one fails here."""
    budget = _Budget(limits, len(data))
    try:
        _scan_headers(data, limits)  # bounded: what tarfile would read whole is refused first
        gz = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
        with gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                rel = budget.member(member)
                if rel is not None:
                    yield tar, member, rel
                tar.members.clear()  # type: ignore[attr-defined]  # a stream keeps every TarInfo it read: memory would grow with the file count
            # Read to the end so gzip checks its CRC and length: a truncated archive fails here.
            padding = 0
            while chunk := gz.read(1 << 16):
                padding += len(chunk)
                if padding > 1 << 20:
                    raise PackageError("package archive has trailing data after the end of the tar")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise PackageError(f"package archive is corrupt or unreadable: {exc}") from exc
    except RecursionError:
        raise PackageError("package archive is nested too deeply to read") from None


def check_archive(data: bytes, limits: UnpackLimits = DEFAULT_LIMITS) -> None:
    """Refuse an archive a client would refuse to unpack (paths, links, size, file count,
    depth, compression ratio, corruption), without writing anything: ``package set-active``
    and every client run this same check."""
    for _ in _members(data, limits):
        pass


def _extract(data: bytes, dest: Path, limits: UnpackLimits) -> None:
    for tar, member, rel in _members(data, limits):
        target = dest.joinpath(rel)
        try:
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # regular files always have content
            with open(target, "wb") as f:
                shutil.copyfileobj(source, f)
            target.chmod(0o700 if member.mode & 0o100 else 0o600)
        except OSError as exc:
            raise PackageError(f"cannot unpack package member {_shown(member.name)}: {exc.strerror or exc}") from None


def extract_archive(data: bytes, dest: Path, max_bytes: int | None = None, limits: UnpackLimits = DEFAULT_LIMITS) -> Path:
    """Safely unpack a .tgz package into `dest` (which must be absent or empty).

    Refuses what check_archive() refuses (it runs first, so a refused archive writes
    nothing); on refusal nothing is left in `dest`. Returns the directory holding scaleout.yaml.
    """
    if max_bytes is not None:
        limits = dataclasses.replace(limits, max_bytes=max_bytes)
    created = not dest.exists()
    if not created and (not dest.is_dir() or any(dest.iterdir())):
        raise PackageError(f"cannot extract package into {dest}: it exists and is not an empty directory")
    check_archive(data, limits)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _extract(data, dest, limits)
        if project_file(dest) is not None:
            return dest
        candidates = [d for d in sorted(dest.iterdir()) if d.is_dir() and project_file(d) is not None]
        if len(candidates) != 1:
            raise PackageError(f"package archive has no {PROJECT_FILE} (nor fedn.yaml) at its top level")
        return candidates[0]
    except PackageError:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:  # it was empty before: empty it again (extraction never creates links)
            for path in dest.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise


def package_bytes(path: Path) -> tuple[bytes, str]:
    """A package's .tgz bytes and its name, to upload: the file itself, or a folder packed
    as `scaleout package create` packs it (honouring .scaleoutignore)."""
    import tempfile

    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="scaleout-pack-") as tmp:
            archive = create_archive(path, Path(tmp) / f"{path.resolve().name}.tgz")
            return archive.read_bytes(), archive.name
    return path.read_bytes(), path.name
