"""Commands, predictions and what clients log about themselves, in ``state.db``.

Tables (created beside the others, never reshaping them):

- ``commands``: one row per job (a custom command or a prediction): what ran, on which
  model, its timeout, status (``running``, ``finished``) and times;
- ``command_results``: one row per client of a job: ``pending``, ``ok`` with its result,
  or ``error`` with a code (core/commands.py REASONS), the error line and the time taken;
- ``clients`` gains ``attributes`` (what ``log_attributes`` sent, merged), ``package``
  (the package the client runs) and ``package_error`` (why it could not load one);
- telemetry goes to ``reports`` as its own kind, ``telemetry``, beside the metrics;
- so does each change of a client's attributes (kind ``attributes``: the keys whose value
  changed, with their new values), its attribute trail; sent again unchanged (a reconnect)
  it adds nothing.

Writes run in a worker thread on this store's own connection (WAL lets the controller's
connection read meanwhile); callers batch them (roles/command_service.py).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from scaleout.core.errors import NotFoundError
from scaleout.store.command_schema import CLIENT_COLUMNS, SCHEMA, ensure_schema  # noqa: F401 (read from here too)
from scaleout.store.state import State

MAX_ATTRIBUTES_BYTES = 64 << 10  # a client's attributes, all of them, as JSON
log = logging.getLogger("scaleout.store")


def _job(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["params"] = json.loads(out["params"])
    return out


def _result(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["data"] = json.loads(out["data"]) if out["data"] is not None else None
    out.pop("command_id", None)
    return out


class CommandStore:
    """Synchronous access on its own connection; call from a worker thread."""

    def __init__(self, path: Path | str) -> None:
        self._state = State(path)  # its connection turns a full disk into StorageError
        self.db = self._state.db
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            self._state.close()

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, job: dict[str, Any], clients: Mapping[str, str | None], failed: dict[str, tuple[str, str]]) -> None:
        """A new job with a pending row per client (``clients``: name -> combiner), and the
        outcome of those that could not be asked (``failed``: name -> (code, error))."""
        from scaleout.core.messages import to_json

        now = time.time()
        with self.lock, self._state.transaction():
            self.db.execute(
                "INSERT INTO commands(id, kind, name, params, model_id, timeout, status, created) VALUES(?, ?, ?, ?, ?, ?, 'running', ?)",
                (job["id"], job["kind"], job["name"], to_json(job["params"]), job["model_id"], job["timeout"], job["created"]),
            )
            self.db.executemany(
                "INSERT INTO command_results(command_id, client, combiner, status) VALUES(?, ?, ?, 'pending')",
                [(job["id"], client, combiner) for client, combiner in clients.items()],
            )
            self.db.executemany(
                "INSERT INTO command_results(command_id, client, status, error, code, finished) VALUES(?, ?, 'error', ?, ?, ?)",
                [(job["id"], client, error, code, now) for client, (code, error) in failed.items()],
            )

    def record(self, job_id: str, outcomes: list[dict[str, Any]], finished: float | None = None) -> None:
        """Store clients' outcomes (only over a pending row: the first outcome stands), and
        end the job when ``finished`` is given."""
        from scaleout.core.messages import to_json

        with self.lock, self._state.transaction():
            self.db.executemany(
                "UPDATE command_results SET status=?, data=?, error=?, code=?, duration_s=?, finished=? "
                "WHERE command_id=? AND client=? AND status='pending'",
                [
                    ("ok" if o["ok"] else "error", to_json(o["data"]) if o["ok"] else None, o.get("error"), o.get("code"),
                     o.get("duration_s"), o.get("finished") or time.time(), job_id, o["client"])
                    for o in outcomes
                ],
            )
            if finished is not None:
                self.db.execute("UPDATE commands SET status='finished', finished=? WHERE id=?", (finished, job_id))

    def interrupt_running(self, reason: str) -> int:
        """Jobs left running by a controller that stopped: their pending clients are lost."""
        now = time.time()
        with self.lock, self._state.transaction():
            ids = [r[0] for r in self.db.execute("SELECT id FROM commands WHERE status='running'")]
            for job_id in ids:
                self.db.execute(
                    "UPDATE command_results SET status='error', code='lost', error=?, finished=? WHERE command_id=? AND status='pending'",
                    (reason, now, job_id),
                )
                self.db.execute("UPDATE commands SET status='finished', finished=?, reason=? WHERE id=?", (now, reason, job_id))
        return len(ids)

    def job(self, kind: str, key: str) -> dict[str, Any]:
        """A job of ``kind`` by id or unique prefix (or ``latest``), with its results."""
        with self.lock:
            if key in ("", "latest"):
                row = self.db.execute("SELECT * FROM commands WHERE kind=? ORDER BY created DESC LIMIT 1", (kind,)).fetchone()
            else:
                rows = self.db.execute("SELECT * FROM commands WHERE kind=? AND substr(id, 1, ?) = ?", (kind, len(key), key)).fetchall()
                row = rows[0] if len(rows) == 1 else None
                if len(rows) > 1:
                    raise NotFoundError(kind, key, f"{len(rows)} {kind} ids start with it; give more of it")
            if row is None:
                hint = f"list them with: scaleout {kind} ls"
                raise NotFoundError(kind, key or "latest", hint)
            out = _job(row)
            results = self.db.execute("SELECT * FROM command_results WHERE command_id=? ORDER BY client", (out["id"],)).fetchall()
        out["results"] = [_result(r) for r in results]
        return out

    def jobs(self, kind: str, limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` jobs of ``kind``, oldest first, with counts by status."""
        with self.lock:
            rows = self.db.execute(
                "SELECT c.*, "  # counted per status in SQL both SQLite and PostgreSQL take
                + ", ".join(f"(SELECT COUNT(*) FROM command_results r WHERE r.command_id = c.id AND r.status='{s}') AS {s}" for s in ("ok", "error", "pending"))
                + " FROM (SELECT * FROM commands WHERE kind=? ORDER BY created DESC LIMIT ?) c ORDER BY c.created",
                (kind, limit),
            ).fetchall()
        out = []
        for row in rows:
            job = _job(row)
            for key in ("ok", "error", "pending"):
                job[key] = job[key] or 0
            out.append(job)
        return out

    # -- what clients say about themselves -----------------------------------------------

    def client_info(
        self, attributes: dict[str, dict[str, Any]], status: dict[str, tuple[str | None, str | None]], telemetry: list[tuple[str, str | None, str, float]]
    ) -> set[str]:
        """Merge attributes into clients' rows, set their package and its error, add telemetry
        rows. Returns the clients whose row is not there yet (their join is not recorded):
        the caller tries those again."""
        from scaleout.core.messages import to_json

        missing: set[str] = set()
        now = time.time()
        with self.lock, self._state.transaction():
            for client, attrs in attributes.items():
                row = self.db.execute("SELECT attributes FROM clients WHERE name=?", (client,)).fetchone()
                if row is None:
                    missing.add(client)
                    continue
                old = json.loads(row[0]) if row[0] else {}
                merged = {**old, **attrs}
                if len(to_json(merged).encode()) > MAX_ATTRIBUTES_BYTES:  # new keys, call after call: bounded all the same
                    log.warning("client %s: its attributes would grow beyond %d bytes: this update is not stored", client, MAX_ATTRIBUTES_BYTES)
                    continue
                self.db.execute("UPDATE clients SET attributes=? WHERE name=?", (to_json(merged), client))
                changed = {k: v for k, v in attrs.items() if k not in old or old[k] != v}
                if changed:
                    self.db.execute(
                        "INSERT INTO reports(kind, session_id, round_index, client, data, error, created) VALUES('attributes', NULL, NULL, ?, ?, NULL, ?)",
                        (client, to_json(changed), now),
                    )
            for client, (package, error) in status.items():
                if self.db.execute("UPDATE clients SET package=?, package_error=? WHERE name=?", (package, error, client)).rowcount == 0:
                    missing.add(client)
            self.db.executemany(
                "INSERT INTO reports(kind, session_id, round_index, client, data, error, created) VALUES('telemetry', ?, NULL, ?, ?, NULL, ?)",
                [(session_id, client, data, when) for client, session_id, data, when in telemetry],
            )
        return missing

    def client(self, name: str) -> dict[str, Any]:
        with self.lock:
            row = self.db.execute("SELECT * FROM clients WHERE name=?", (name,)).fetchone()
            if row is None:
                raise NotFoundError("client", name, "list them with: scaleout client ls")
            out = dict(row)
            out["attributes"] = json.loads(out["attributes"]) if out.get("attributes") else {}
            out["recent"] = [
                dict(r)
                for r in self.db.execute(
                    "SELECT c.id, c.kind, c.name, c.created, r.status, r.code, r.error FROM command_results r "
                    "JOIN commands c ON c.id = r.command_id WHERE r.client=? ORDER BY c.created DESC LIMIT 5",
                    (name,),
                )
            ]
        return out

    def telemetry(self, client: str | None, key: str | None, limit: int) -> list[dict[str, Any]]:
        return self.telemetry_page(client, key, limit)[0]

    def telemetry_page(self, client: str | None, key: str | None, limit: int) -> tuple[list[dict[str, Any]], int]:
        """The latest ``limit`` telemetry records matching, oldest first, and how many match in all."""
        sql = "SELECT client, session_id, data, created FROM reports WHERE kind='telemetry'"
        args: list[Any] = []
        if client:
            sql, args = sql + " AND client=?", [*args, client]
        with self.lock:
            rows = self.db.execute(sql + " ORDER BY id DESC", args).fetchall()
        out: list[dict[str, Any]] = []
        total = 0
        for row in rows:
            data = json.loads(row["data"])
            if key and data.get("key") != key:
                continue
            total += 1
            if len(out) < limit:
                out.append({"client": row["client"], "session_id": row["session_id"], "key": data.get("key"), "payload": data.get("payload"), "created": row["created"]})
        return out[::-1], total


def attribute_trail(st: State, client: str, limit: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Client ``client``'s attribute changes, one row per key and change, oldest first: (the
    latest ``limit`` of them, or all with 0; how many there are). NotFoundError for a client
    the registry does not know."""
    if st.db.execute("SELECT 1 FROM clients WHERE name=?", (client,)).fetchone() is None:
        raise NotFoundError("client", client, "list them with: scaleout client ls")
    rows = st.db.execute("SELECT data, created FROM reports WHERE kind = 'attributes' AND client=? ORDER BY id", (client,)).fetchall()
    trail = [{"client": client, "key": key, "value": value, "created": row["created"]} for row in rows for key, value in json.loads(row["data"]).items()]
    return (trail[-limit:] if limit > 0 else trail), len(trail)
