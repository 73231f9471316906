"""Content-addressed files: models and packages, named by their sha256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from scaleout.core.errors import IntegrityError, NotFoundError


class BlobStore:
    """Files under ``root/<kind>/<sha256><suffix>``, written atomically, verified on read."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, kind: str, digest: str, suffix: str) -> Path:
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise NotFoundError(kind, digest)
        return self.root / kind / f"{digest}{suffix}"

    def put(self, kind: str, data: bytes, suffix: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(kind, digest, suffix)
        if not path.exists() or path.stat().st_size != len(data):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        return digest

    def get(self, kind: str, digest: str, suffix: str) -> bytes:
        path = self._path(kind, digest, suffix)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(kind, digest) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise IntegrityError(digest, actual, what=f"stored {kind} file {path}")
        return data

    def has(self, kind: str, digest: str, suffix: str) -> bool:
        try:
            return self._path(kind, digest, suffix).exists()
        except NotFoundError:
            return False
