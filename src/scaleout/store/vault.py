"""The controller's secrets in a PostgreSQL store, sealed with a key file (AES-GCM), so every
controller on the store serves the same CA and checks the same tokens, packages and audit head.

The secrets are the files a lone controller keeps in its data directory: the CA (ca.pem,
ca.key), the token signing key (token.key), the package signing key (package.key) and the
audit key (audit.key). The first controller on a store creates them (as it does on its own)
and seals each into ``scaleout_secrets``; every other one unseals them into its data
directory before it loads them. An advisory lock on the store makes the first two starts
take turns. A key file that does not open them is a ConfigError, never a traceback.

Key file: one line ``scaleout-key-1:<base64 of 32 random bytes>``, mode 0600
(``scaleout store keygen --out PATH`` writes one).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scaleout.core.errors import ConfigError

log = logging.getLogger("scaleout.vault")

PREFIX = "scaleout-key-1:"
SHARED = ("ca.pem", "ca.key", "token.key", "package.key", "audit.key")  # the data dir's files every controller shares
PUBLIC = frozenset({"ca.pem"})
VAULT_LOCK = 0x5CA1E0A8  # held while one controller reads or creates the secrets
SCHEMA = "CREATE TABLE IF NOT EXISTS scaleout_secrets (name TEXT PRIMARY KEY, sealed BYTEA NOT NULL)"


def keygen(path: Path) -> None:
    """Write a new key file at ``path`` (mode 0600); refuse to replace one."""
    from scaleout.security.tls import write_private

    if path.exists():
        raise ConfigError("key file", f"{path} exists: a key file is never replaced (the secrets sealed with it would be lost); pick another path")
    write_private(path, (PREFIX + base64.b64encode(os.urandom(32)).decode("ascii") + "\n").encode())


def load_key(path: Path) -> bytes:
    """The 32-byte key in the key file at ``path``: it must exist, be this user's alone (0600) and well formed."""
    try:
        st = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("key file", f"{path} does not exist (create one with: scaleout store keygen --out {path}, or give the one the other controllers use)") from None
    except IsADirectoryError:
        raise ConfigError("key file", f"{path} is a directory: give the key file's path (as scaleout store keygen --out wrote it)") from None
    except OSError as exc:
        raise ConfigError("key file", f"cannot read {path}: {exc.strerror}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ConfigError("key file", f"{path} may be read by others (mode {stat.S_IMODE(st.st_mode):04o}): run chmod 600 {path}")
    body = text.strip()
    try:
        key = base64.b64decode(body[len(PREFIX):], validate=True) if body.startswith(PREFIX) else b""
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError("key file", f"{path} is not a scaleout key file (expected {PREFIX}<base64 of 32 bytes>, as scaleout store keygen writes)")
    return key


def seal(key: bytes, name: str, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, data, _aad(name))


def unseal(key: bytes, name: str, sealed: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(sealed[:12], sealed[12:], _aad(name))
    except (InvalidTag, ValueError):
        raise ConfigError(
            "key file", "it does not open the secrets in the store (they were sealed with another key file): give every controller on this store the same one",
        ) from None


def _aad(name: str) -> bytes:
    return b"scaleout-secret:" + name.encode()


def sync(url: str, key: bytes, data_dir: Path, load: Callable[[], None]) -> tuple[int, int]:
    """Unseal the store's secrets into ``data_dir``, call ``load`` (which reads them there,
    creating those still missing as a lone controller does), then seal into the store those
    it did not have. Returns (unsealed, sealed) counts. Blocking: call it in a worker thread."""
    from scaleout.security.tls import write_private, write_public
    from scaleout.store.lease import connect

    conn = connect(url, keepalive=False)
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (VAULT_LOCK,))  # released with the session below; before the
        conn.execute(SCHEMA)  # CREATE TABLE IF NOT EXISTS, which two first starts at once would race on (UniqueViolation)
        stored = {str(name): bytes(sealed) for name, sealed in conn.execute("SELECT name, sealed FROM scaleout_secrets").fetchall()}
        for name, sealed in stored.items():
            if name in SHARED:
                data = unseal(key, name, sealed)
                (write_public if name in PUBLIC else write_private)(data_dir / name, data)
        load()
        added = 0
        for name in SHARED:
            path = data_dir / name
            if name not in stored and path.exists():
                conn.execute("INSERT INTO scaleout_secrets (name, sealed) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING", (name, seal(key, name, path.read_bytes())))
                added += 1
        return len(stored), added
    finally:
        conn.close()


def opened(db: Any, key: bytes, name: str) -> bytes | None:
    """The secret ``name`` unsealed from the store ``db`` (a State's connection: `audit verify
    --store URL --key-file K` checks the store's signed audit head with its audit.key);
    None when no controller has sealed one there yet."""
    if db.execute("SELECT to_regclass('scaleout_secrets')").fetchone()[0] is None:
        return None
    row = db.execute("SELECT sealed FROM scaleout_secrets WHERE name=?", (name,)).fetchone()
    return unseal(key, name, bytes(row[0])) if row is not None else None


__all__ = ["keygen", "load_key", "opened", "seal", "sync", "unseal"]
