"""Models, packages and strategy states as PostgreSQL large objects (``serve --store postgresql://``).

The same interface as store/blobs.BlobStore (put/get/has/sweep/sweep_unnamed, ``root`` for
the data dir's scratch folders), content-addressed by sha256 as there: the table ``blobs``
names each (kind, sha256) and its large object. Bytes move in CHUNK pieces (``lo_put`` /
``lo_get``), never as one statement; a blob is checked against its name on every read.
Writing the object and its row is one transaction: a kill in between leaves nothing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from scaleout.core.errors import IntegrityError, NotFoundError, StorageError
from scaleout.store.blobs import SUFFIXES, buffers_of
from scaleout.store.pg import Outages, PgConnection

CHUNK = 1 << 20  # bytes per lo_put / lo_get
SCHEMA = "CREATE TABLE IF NOT EXISTS blobs (kind TEXT NOT NULL, id TEXT NOT NULL, oid OID NOT NULL, size BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL, PRIMARY KEY (kind, id))"


def _check(kind: str, digest: str) -> None:
    if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise NotFoundError(kind, digest)


class PgBlobStore:
    """Blobs in the PostgreSQL store at ``url``; ``root`` is the data dir (spill and uploads stay there)."""

    def __init__(self, url: str, root: Path, db: PgConnection | None = None, outages: Outages | None = None) -> None:
        self.root = root
        self.db = db or PgConnection(url, max_size=4, outages=outages)
        self.db.script(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- writing ---------------------------------------------------------------------------

    def put(self, kind: str, data: bytes | Any, suffix: str) -> str:
        """Store ``data`` (bytes-like, or pieces as `BlobStore.put` takes them) and return its
        sha256 (one already there, intact, is kept)."""
        parts = buffers_of(data)
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        size = sum(p.nbytes for p in parts)
        self._write(kind, digest.hexdigest(), size, (p[i:i + CHUNK] for p in parts for i in range(0, p.nbytes, CHUNK)))
        return digest.hexdigest()

    def put_file(self, kind: str, path: Path, digest: str | None = None) -> str:
        """Store the file at ``path``, read CHUNK at a time (hashed first, so nothing is
        written for a file whose bytes are not ``digest``): its sha256."""
        actual = _file_digest(path)
        if digest is not None and actual != digest:
            raise IntegrityError(digest, actual, what=f"{kind} file {path}")
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                while block := fh.read(CHUNK):
                    yield block

        self._write(kind, actual, size, chunks())
        return actual

    def _write(self, kind: str, digest: str, size: int, chunks: Iterator[Any]) -> None:
        if self._intact(kind, digest, size):
            return  # already stored (a corrupt copy is replaced: putting it again repairs it)
        with self.db.transaction("BEGIN DEFERRED") as db:  # read committed, no write lock: a large blob holds up nobody
            (oid,) = db.execute("SELECT lo_create(0)").fetchone()  # type: ignore[misc]
            offset = 0
            for block in chunks:
                db.execute("SELECT lo_put(?, ?, ?)", (oid, offset, bytes(block)))
                offset += len(block)
            old = db.execute("SELECT oid FROM blobs WHERE kind=? AND id=? FOR UPDATE", (kind, digest)).fetchone()
            db.execute(
                "INSERT INTO blobs(kind, id, oid, size, created) VALUES(?, ?, ?, ?, ?) "
                "ON CONFLICT (kind, id) DO UPDATE SET oid=EXCLUDED.oid, size=EXCLUDED.size, created=EXCLUDED.created",
                (kind, digest, oid, offset, time.time()),
            )
            if old is not None:
                db.execute("SELECT lo_unlink(?)", (old[0],))

    def _intact(self, kind: str, digest: str, size: int) -> bool:
        row = self.db.execute("SELECT size FROM blobs WHERE kind=? AND id=?", (kind, digest)).fetchone()
        if row is None or row[0] != size:
            return False
        try:
            for _ in self.chunks(kind, digest, ""):
                pass
        except IntegrityError:
            return False
        return True

    # -- reading ---------------------------------------------------------------------------

    def chunks(self, kind: str, digest: str, suffix: str) -> Iterator[bytes]:
        """The blob's bytes, CHUNK at a time, from one snapshot; IntegrityError at the end
        when they are not ``digest`` (nothing read before then is to be trusted)."""
        _check(kind, digest)
        with self.db.transaction("BEGIN") as db:  # repeatable read: a sweep or replacement meanwhile does not cut it
            row = db.execute("SELECT oid, size FROM blobs WHERE kind=? AND id=?", (kind, digest)).fetchone()
            if row is None:
                raise NotFoundError(kind, digest)
            oid, size = row
            h = hashlib.sha256()
            offset = 0
            while True:
                (block,) = db.execute("SELECT lo_get(?, ?, ?)", (oid, offset, CHUNK)).fetchone()  # type: ignore[misc]
                if not block:
                    break
                block = bytes(block)
                h.update(block)
                offset += len(block)
                yield block
                if len(block) < CHUNK:
                    break
        if h.hexdigest() != digest or offset != size:
            raise IntegrityError(digest, h.hexdigest(), what=f"stored {kind} large object {oid}")

    def get(self, kind: str, digest: str, suffix: str) -> bytes:
        """The whole blob (the callers want bytes), read in chunks and verified."""
        out = bytearray()
        for block in self.chunks(kind, digest, suffix):
            out += block
        return bytes(out)

    def copy_to(self, kind: str, digest: str, suffix: str, out: BinaryIO) -> int:
        """Stream the blob into ``out`` (a file a caller needs a path to); its size. A blob that
        fails its check raises IntegrityError after the bytes were written: discard ``out``."""
        n = 0
        for block in self.chunks(kind, digest, suffix):
            out.write(block)
            n += len(block)
        return n

    def has(self, kind: str, digest: str, suffix: str) -> bool:
        try:
            _check(kind, digest)
        except NotFoundError:
            return False
        return self.db.execute("SELECT 1 FROM blobs WHERE kind=? AND id=?", (kind, digest)).fetchone() is not None

    def ids(self, kind: str) -> list[tuple[str, int]]:
        return [(r[0], r[1]) for r in self.db.execute("SELECT id, size FROM blobs WHERE kind=? ORDER BY id", (kind,)).fetchall()]

    # -- sweeping --------------------------------------------------------------------------

    def sweep_unnamed(self, named: dict[str, set[str]]) -> dict[str, list[str]]:
        removed = {kind: self.sweep(kind, SUFFIXES[kind], keep) for kind, keep in named.items()}
        return {kind: names for kind, names in removed.items() if names}

    def sweep(self, kind: str, suffix: str, keep: set[str]) -> list[str]:
        """Remove the blobs of ``kind`` that no row names (``keep``): what a kill between
        storing a blob and committing the row that names it leaves."""
        removed: list[str] = []
        for digest, _ in self.ids(kind):
            if digest in keep:
                continue
            with self.db.transaction() as db:
                row = db.execute("DELETE FROM blobs WHERE kind=? AND id=? RETURNING oid", (kind, digest)).fetchone()
                if row is not None:
                    db.execute("SELECT lo_unlink(?)", (row[0],))
            removed.append(f"{digest}{suffix}")
        return removed


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
    except OSError as exc:
        raise StorageError(exc.strerror or str(exc), "reading", str(path), exc.errno) from None
    return h.hexdigest()
