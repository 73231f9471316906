"""Tokens the controller issued and the node identities enrolled with them (in state.db).

A token row is what ``token ls`` shows (never the secret: the controller keeps none); an
identity row binds a node's name to the one credential it enrolled for. Revoking either
sets ``revoked``; a revoked identity frees its name for a new enrolment.
"""

from __future__ import annotations

import json
import time
from typing import Any

from scaleout.core.errors import AuthError, ConflictError, NotFoundError
from scaleout.store.state import State

SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
  id TEXT PRIMARY KEY, role TEXT NOT NULL, name TEXT, created REAL NOT NULL, expires REAL NOT NULL,
  max_uses INTEGER, uses INTEGER NOT NULL DEFAULT 0, last_used REAL, revoked REAL,
  sans TEXT NOT NULL DEFAULT '[]', creator TEXT);
CREATE TABLE IF NOT EXISTS identities (
  id TEXT PRIMARY KEY, role TEXT NOT NULL, name TEXT NOT NULL, token_id TEXT, created REAL NOT NULL,
  last_seen REAL, revoked REAL, sans TEXT NOT NULL DEFAULT '[]');
CREATE UNIQUE INDEX IF NOT EXISTS identities_live_name ON identities(role, name) WHERE revoked IS NULL;
CREATE INDEX IF NOT EXISTS identities_by_token ON identities(token_id);
"""


def _decode(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is not None and isinstance(row.get("sans"), str):
        row["sans"] = json.loads(row["sans"])
    return row


def used_up(row: dict[str, Any] | None) -> bool:
    return row is not None and row["max_uses"] is not None and row["uses"] >= row["max_uses"]


RECENT = 3  # enrolments token ls names per token, newest first


class Identities:
    """Synchronous access on the controller's State connection (small rows, one at a time)."""

    def __init__(self, state: State) -> None:
        self.state = state
        state.db.executescript(SCHEMA)
        columns = {r[1] for r in state.db.execute("PRAGMA table_info(identities)")}
        if "enrol_key" not in columns:  # the hash of the key a node enrolled with: it may finish that enrolment
            state.db.execute("ALTER TABLE identities ADD COLUMN enrol_key TEXT")

    def add_token(self, jti: str, role: str, name: str | None, expires: float, max_uses: int | None, sans: list[str], creator: str) -> None:
        self.state.db.execute(
            "INSERT INTO tokens(id, role, name, created, expires, max_uses, sans, creator) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
            (jti, role, name, time.time(), expires, max_uses, json.dumps(sans), creator),
        )

    def token(self, jti: str) -> dict[str, Any] | None:
        return _decode(self.state._one("SELECT * FROM tokens WHERE id=?", jti))

    def tokens(self) -> list[dict[str, Any]]:
        rows = self.state._all("SELECT * FROM tokens ORDER BY created")
        nodes = {r["token_id"]: r["n"] for r in self.state._all("SELECT token_id, COUNT(*) AS n FROM identities WHERE revoked IS NULL GROUP BY token_id")}
        recent: dict[str, list[dict[str, Any]]] = {}
        for n in self.state._all("SELECT token_id, name, role, created FROM identities ORDER BY created DESC"):
            names = recent.setdefault(n["token_id"], [])
            if len(names) < RECENT:
                names.append(n)
        for r in rows:
            _decode(r)
            r["nodes"] = nodes.get(r["id"], 0)
            last = recent.get(r["id"], [])
            r["last_enrolled"] = last[0]["created"] if last else None
            r["recent"] = [n["name"] for n in last]  # the latest enrolments, newest first
        return rows

    def identities(self) -> list[dict[str, Any]]:
        """Every node identity (each is a credential that works until it is revoked or expires)."""
        rows = self.state._all("SELECT id, role, name, token_id, created, last_seen, revoked FROM identities ORDER BY created")
        return rows

    def find_token(self, key: str) -> dict[str, Any]:
        """A token by id or a unique prefix of it (at least 4 characters)."""
        row = self.token(key)
        if row is None:
            matches = self.state._all("SELECT * FROM tokens WHERE substr(id, 1, ?) = ?", len(key), key)
            if len(matches) > 1:
                raise ConflictError(f"token id prefix {key!r} is ambiguous: {len(matches)} tokens start with it; give more of the id (see scaleout token ls)")
            if matches and len(key) < 4:
                raise ConflictError(f"token id prefix {key!r} is too short: give at least 4 characters of the id (see scaleout token ls)")
            row = _decode(matches[0]) if matches else None
        if row is None:
            raise NotFoundError("token", key, "list them with: scaleout token ls")
        return row

    def revoked_ids(self) -> set[str]:
        """Ids of revoked tokens and identities: refused at every handshake."""
        rows = self.state.db.execute("SELECT id FROM tokens WHERE revoked IS NOT NULL UNION SELECT id FROM identities WHERE revoked IS NOT NULL")
        return {r[0] for r in rows}

    def enrol(self, nid: str, role: str, name: str, jti: str, sans: list[str], now: float, key: str | None = None) -> str:
        """Bind ``name`` to a new identity enrolled with token ``jti``, counting one use of it,
        and return its id. The same token and enrolment ``key`` (a hash of the node's secret)
        as an earlier enrolment of ``name`` finish that one instead: its id, no use counted."""
        with self.state.transaction():
            row = self.token(jti)
            held = self.live(role, name)
            if held is not None and key is not None and held["token_id"] == jti and held.get("enrol_key") == key:
                return str(held["id"])  # the node did not keep its credential (a full disk): it gets it again
            if row is not None:
                if row["revoked"] is not None:
                    raise AuthError("token was revoked")
                if used_up(row):
                    raise AuthError(f"this join token was used up ({row['uses']} of {row['max_uses']} uses); create another with: scaleout token create --role {role}")
            if held is not None:
                raise ConflictError(
                    f"the {role} name {name!r} belongs to an enrolled node; choose another --name, "
                    f"or remove that node first: scaleout {role} rm {name}"
                )
            self.state.db.execute(
                "INSERT INTO identities(id, role, name, token_id, created, last_seen, sans, enrol_key) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                (nid, role, name, jti, now, now, json.dumps(sans), key),
            )
            self.state.db.execute("UPDATE tokens SET uses = uses + 1, last_used = ? WHERE id = ?", (now, jti))
        return nid

    def live(self, role: str, name: str) -> dict[str, Any] | None:
        return _decode(self.state._one("SELECT * FROM identities WHERE role=? AND name=? AND revoked IS NULL", role, name))

    def identity(self, nid: str) -> dict[str, Any] | None:
        return _decode(self.state._one("SELECT * FROM identities WHERE id=?", nid))

    def remove(self, role: str, name: str, now: float) -> dict[str, Any]:
        row = self.live(role, name)
        if row is None:
            raise NotFoundError(role, name, f"no enrolled {role} has that name (see scaleout {role} ls)")
        self.state.db.execute("UPDATE identities SET revoked=? WHERE id=?", (now, row["id"]))
        return row

    def revoke_identity(self, nid: str, now: float) -> dict[str, Any]:
        row = self.identity(nid)
        if row is None:
            raise NotFoundError("identity", nid, "list them with: scaleout token ls")
        self.state.db.execute("UPDATE identities SET revoked=COALESCE(revoked, ?) WHERE id=?", (now, nid))
        return row

    def revoke_token(self, jti: str, with_nodes: bool, now: float) -> list[dict[str, Any]]:
        """Revoke a token (and, ``with_nodes``, the identities enrolled with it); returns those identities."""
        with self.state.transaction():
            self.state.db.execute("UPDATE tokens SET revoked=COALESCE(revoked, ?) WHERE id=?", (now, jti))
            nodes = self.state._all("SELECT * FROM identities WHERE token_id=? AND revoked IS NULL", jti) if with_nodes else []
            for n in nodes:
                self.state.db.execute("UPDATE identities SET revoked=? WHERE id=?", (now, n["id"]))
        return nodes

    def touch_token(self, jti: str, now: float) -> None:
        self.state.db.execute("UPDATE tokens SET last_used=? WHERE id=?", (now, jti))
