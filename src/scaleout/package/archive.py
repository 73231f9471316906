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
from scaleout.package.tarstream import Member, TarStream, shown

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
        raise PackageError(f"package archive member {shown(name)} has an absolute path")
    path = PurePosixPath(name.replace("\\", "/"))
    if ".." in path.parts:
        raise PackageError(f"package archive member {shown(name)} escapes the package directory")
    parts = [p for p in path.parts if p != "."]
    return PurePosixPath(*parts) if parts else None


class _Budget:
    """Counts what an archive unpacks to, refusing it at the first limit it passes."""

    def __init__(self, limits: UnpackLimits, archive_size: int) -> None:
        self.limits = limits
        self.max_total = limits.max_total(archive_size)
        self.archive_size = archive_size
        self.entries = 0
        self.files = 0  # files and folders unpacking creates
        self.total = 0
        self.dirs: set[str] = set()  # every folder unpacking creates, listed in the archive or not

    def member(self, member: Member) -> PurePosixPath | None:
        """Check one member's path and size; its safe relative path (None: the root)."""
        lim = self.limits
        self.entries += 1  # every entry, the archive's own root ones too: 100,000 "./" are refused
        if self.entries > lim.max_files:
            raise PackageError(f"package archive has more than {lim.max_files} files and directories (the limit)")
        if len(member.name) > lim.max_path:
            raise PackageError(f"package archive member {shown(member.name)} has a path longer than {lim.max_path} characters")
        rel = _member_path(member.name)
        if rel is None:
            if not member.is_dir:  # its data would be skipped, counted by no size limit
                raise PackageError(f"package archive member {shown(member.name)} is a file named like the package's root")
            return None
        if len(rel.parts) > lim.max_depth:
            raise PackageError(
                f"package archive member {shown(member.name)} is {len(rel.parts)} levels deep; the limit is {lim.max_depth}"
            )
        # What unpacking creates counts too: each file, and each folder whether the archive
        # lists it or only implies it (9,997 files each 32 folders deep made 310,000 folders).
        if not member.is_dir:
            self._made()
        folder = str(rel) if member.is_dir else str(rel.parent)
        while folder not in ("", ".") and folder not in self.dirs:  # a known folder's parents are known too
            self.dirs.add(folder)
            self._made()
            folder = folder.rpartition("/")[0]
        if not member.is_dir:
            self.total += member.size
            if self.total > self.max_total:
                if self.max_total < lim.max_bytes:
                    raise PackageError(
                        f"package archive of {fmt_bytes(self.archive_size)} expands to more than {fmt_bytes(self.max_total)}: "
                        f"over {lim.max_ratio} times its size (a compression bomb?)"
                    )
                raise PackageError(f"package archive expands to more than {self.max_total} bytes ({fmt_bytes(self.max_total)}, the limit)")
        return rel

    def _made(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise PackageError(f"package archive has more than {self.limits.max_files} files and directories (the limit, the folders it implies included)")


def _members(data: bytes, limits: UnpackLimits) -> Iterator[tuple[TarStream, Member, PurePosixPath]]:
    """Each member of a .tgz with its safe path, within ``limits``; the archive is read to
    its end, so a truncated or corrupt one fails here."""
    budget = _Budget(limits, len(data))
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as gz:
            tar = TarStream(gz, limits)  # type: ignore[arg-type]  # a GzipFile reads like any binary file
            for member in tar:
                rel = budget.member(member)
                if rel is not None:
                    yield tar, member, rel
    except (EOFError, zlib.error, OSError) as exc:
        raise PackageError(f"package archive is corrupt or unreadable: {exc}") from exc


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
            if member.is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                tar.copy_to(f)
            target.chmod(0o700 if member.mode & 0o100 else 0o600)
        except OSError as exc:
            raise PackageError(f"cannot unpack package member {shown(member.name)}: {exc.strerror or exc}") from None


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
