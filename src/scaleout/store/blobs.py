"""Content-addressed files: models and packages, named by their sha256."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import secrets
from pathlib import Path
from typing import Any

from scaleout.core.errors import ConfigError, IntegrityError, NotFoundError, StorageError

SUFFIXES = {"models": ".safetensors", "packages": ".tgz", "state": ".safetensors"}  # kind -> its files' suffix
WRITE_STRETCH = 4 << 20  # put() hashes and writes a blob this many bytes at a time


class BlobStore:
    """Files under ``root/<kind>/<sha256><suffix>``, written atomically, verified on read."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, kind: str, digest: str, suffix: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise NotFoundError(kind, digest)
        return self.root / kind / f"{digest}{suffix}"

    def put(self, kind: str, data: bytes | Any, suffix: str) -> str:
        """Store ``data`` and return its sha256; a failed write (a full disk) raises
        StorageError and leaves no temporary file behind. ``data`` may also be pieces (an
        object with ``parts``, buffers in order: a header and views of arrays), written one
        after the other and never joined, so a model is not copied on its way to its file.
        Each stretch is hashed as it is written (one pass over the bytes, not a hash first and
        a write after): the file is named by that digest once it is whole."""
        parts = buffers_of(data)
        size = sum(p.nbytes for p in parts)
        folder = self.root / kind
        path: Path | None = None
        tmp: str | None = None
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = str(folder / f".{os.getpid()}.{secrets.token_hex(8)}{suffix}.tmp")
            h = hashlib.sha256()
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:  # 0600 whatever the umask
                for part in parts:
                    for at in range(0, part.nbytes, WRITE_STRETCH):
                        stretch = part[at : at + WRITE_STRETCH]
                        h.update(stretch)  # hashed while it is in the cache, then written
                        fh.write(stretch)
                fh.flush()
                os.fsync(fh.fileno())
            digest = h.hexdigest()
            path = self._path(kind, digest, suffix)
            if path.exists() and path.stat().st_size == size and _file_digest(path) == digest:
                return digest  # already stored, intact (a corrupt copy is replaced: putting it again repairs it)
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            if path is None:  # failed while written (a full disk): the error names the file it was to be
                path = self._path(kind, _digest(parts), suffix)
            raise StorageError(exc.strerror or str(exc), f"writing {_noun(kind)}", str(path), exc.errno) from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return digest

    def get(self, kind: str, digest: str, suffix: str) -> bytes:
        path = self._path(kind, digest, suffix)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(kind, digest) from None
        except OSError as exc:
            raise StorageError(exc.strerror or str(exc), f"reading {_noun(kind)}", str(path), exc.errno) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise IntegrityError(digest, actual, what=f"stored {kind} file {path}")
        return data

    def map(self, kind: str, digest: str, suffix: str, *, check: bool = True) -> mmap.mmap:
        """The stored file mapped read-only: bytes-like, its pages read from the file as they
        are touched and not part of the heap. With ``check`` its sha256 is verified first
        (IntegrityError), and the pages that pass touched are let go again (``release``), so
        a model kept this way costs memory only while something reads it. A file is never
        rewritten in place (``put`` replaces it), so a mapping keeps the bytes it was opened on."""
        path = self._path(kind, digest, suffix)
        try:
            with open(path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    raise IntegrityError(digest, hashlib.sha256(b"").hexdigest(), what=f"stored {kind} file {path}")
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise NotFoundError(kind, digest) from None
        except OSError as exc:
            raise StorageError(exc.strerror or str(exc), f"reading {_noun(kind)}", str(path), exc.errno) from None
        if check:
            actual = hashlib.sha256(mapped).hexdigest()
            release(mapped)
            if actual != digest:
                mapped.close()
                raise IntegrityError(digest, actual, what=f"stored {kind} file {path}")
        return mapped

    def sweep_unnamed(self, named: dict[str, set[str]]) -> dict[str, list[str]]:
        """``sweep`` each kind of ``named`` (kind -> the ids its rows name): the files removed, by kind."""
        removed = {kind: self.sweep(kind, SUFFIXES[kind], keep) for kind, keep in named.items()}
        return {kind: names for kind, names in removed.items() if names}

    def sweep(self, kind: str, suffix: str, keep: set[str]) -> list[str]:
        """Remove the files of ``kind`` that no row names (``keep``) and half-written ones:
        what a kill between writing a file and committing its row leaves. Returns their names."""
        folder = self.root / kind
        removed: list[str] = []
        if not folder.is_dir():
            return removed
        for entry in os.scandir(folder):
            name = entry.name
            digest = name.removesuffix(suffix)
            orphan = name.endswith(suffix) and len(digest) == 64 and digest not in keep
            if entry.is_file(follow_symlinks=False) and (orphan or (name.startswith(".") and name.endswith(".tmp"))):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed.append(name)
        return removed

    def has(self, kind: str, digest: str, suffix: str) -> bool:
        try:
            return self._path(kind, digest, suffix).exists()
        except NotFoundError:
            return False


def buffers_of(data: Any) -> list[memoryview]:
    """``data`` (bytes-like, or pieces: an object whose ``parts`` are buffers) as byte views, in order."""
    parts = getattr(data, "parts", None)
    return [memoryview(p).cast("B") for p in (parts if parts is not None else [data])]


def _digest(parts: list[memoryview]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def release(mapped: mmap.mmap, start: int = 0, length: int | None = None) -> None:
    """Let go of the pages of ``mapped`` this process has touched (they stay in the page
    cache, read back from the file if touched again): a mapping read once, to hash or send
    it, otherwise counts the whole file in this process's resident memory for its life.
    With ``start`` and ``length``, the pages of that stretch of bytes only."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or mapped.closed:
        return
    if length is None:
        mapped.madvise(advice)
        return
    begin = start - start % mmap.PAGESIZE  # madvise takes whole pages
    end = min(len(mapped), start + length)
    if end > begin:
        mapped.madvise(advice, begin, end - begin)


def _noun(kind: str) -> str:
    """``models`` -> ``model``: the word a message uses for one blob of that kind."""
    return kind.removesuffix("s")


PRIVATE_FILES = ("state.db", "state.db-wal", "state.db-shm", ".lock")
BLOB_DIRS = ("models", "packages", "state")


def secure_data_dir(root: Path) -> None:
    """Make a controller's data dir private to its user, as it would be when created now:
    the dir and its blob dirs 0700; state.db, its WAL files and every model and package
    0600 (a data dir from an older version may have been 0755 with files 0644)."""
    def tighten(path: Path, mode: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o777 != mode:
                os.chmod(path, mode)

    tighten(root, 0o700)
    if not (root / "state.db").exists():  # SQLite creates -wal and -shm with the database's mode
        os.close(os.open(root / "state.db", os.O_WRONLY | os.O_CREAT, 0o600))
    for name in PRIVATE_FILES:
        tighten(root / name, 0o600)
    for kind in BLOB_DIRS:
        folder = root / kind
        if folder.is_dir():
            tighten(folder, 0o700)
            for entry in os.scandir(folder):
                if entry.is_file(follow_symlinks=False):
                    tighten(Path(entry.path), 0o600)


def lock_data_dir(path: Path, hint: str = "stop it or use another --data-dir") -> Any:
    """Hold an exclusive lock on the data dir for this process's life: two controllers on
    one state.db would undo each other's sessions. ``hint``: what to do, in the refusal."""
    import fcntl

    fh = open(path / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise ConfigError("data_dir", f"{path} is in use by another running controller (pid {holder}); {hint}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh
