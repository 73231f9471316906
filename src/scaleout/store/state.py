"""Controller state in SQLite (WAL), or PostgreSQL (store/pg.py): registry, packages, the model
trail, sessions, rounds."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scaleout.core.audit import GENESIS, Broken, entry_hash, verify_chain
from scaleout.core.errors import NotFoundError, StorageError
from scaleout.core.messages import to_json
from scaleout.store.command_schema import ensure_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS combiners (
  name TEXT PRIMARY KEY, url TEXT, status TEXT NOT NULL, clients INTEGER NOT NULL DEFAULT 0,
  first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
  name TEXT PRIMARY KEY, combiner TEXT, status TEXT NOT NULL,
  first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS packages (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS models (
  id TEXT PRIMARY KEY, parent TEXT, session_id TEXT, round_index INTEGER, aggregator TEXT,
  contributors TEXT NOT NULL DEFAULT '[]', size INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY, status TEXT NOT NULL, config TEXT NOT NULL, created REAL NOT NULL,
  finished REAL, start_model TEXT, end_model TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS rounds (
  session_id TEXT NOT NULL, idx INTEGER NOT NULL, status TEXT NOT NULL, model_id TEXT,
  parent TEXT, participants TEXT NOT NULL DEFAULT '[]', started REAL NOT NULL, finished REAL,
  duration_s REAL, reason TEXT, validation TEXT NOT NULL DEFAULT '{}', server_state TEXT, timing TEXT, aggregation TEXT,
  server_functions TEXT,
  PRIMARY KEY (session_id, idx));
CREATE TABLE IF NOT EXISTS reports (
  id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, session_id TEXT, round_index INTEGER,
  client TEXT NOT NULL, data TEXT NOT NULL, error TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS clients_by_combiner ON clients(combiner, status);
CREATE INDEX IF NOT EXISTS reports_by_round ON reports(session_id, round_index, kind);
CREATE INDEX IF NOT EXISTS models_by_session ON models(session_id);
CREATE TABLE IF NOT EXISTS session_steps (
  session_id TEXT NOT NULL, seq INTEGER NOT NULL, step TEXT NOT NULL, PRIMARY KEY (session_id, seq));
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, actor TEXT NOT NULL,
  action TEXT NOT NULL, detail TEXT NOT NULL);
"""

# The audit log is append-only: SQLite refuses to change or remove an entry (the hash
# chain catches whoever drops these triggers first; see core/audit.py).
AUDIT_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""
AUDIT_HEAD = "audit_head"
# meta key on a PostgreSQL store: the signed audit head (store/audithead.py), written in the
# transaction of the entry it names, so every controller on the store shares it
AUDIT_ANCHOR = "audit_anchor"
TERM = "active_term"  # meta key: how many times a controller became active on this (shared) store  # meta key: "<id> <hash>" of the newest audit entry

_JSON_COLUMNS = {"server_functions", "retried", "contributors", "config", "participants", "validation", "data", "detail", "timing", "attributes", "selection", "aggregation"}


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_COLUMNS & out.keys():
        out[key] = json.loads(out[key], parse_int=_int64_or_none, parse_float=_finite_or_none, parse_constant=_none) if out[key] is not None else None
    return out


def _finite_or_none(text: str) -> float | None:
    """A stored float as read back; one beyond the float range (stored before numbers were
    bounded on arrival) is read as null, so whatever lists it is still JSON."""
    value = float(text)
    return value if abs(value) <= sys.float_info.max else None


def _int64_or_none(text: str) -> int | None:
    """A stored integer as read back; one beyond 64 bits (stored before they were refused) is
    read as null: no peer would take it."""
    return int(text) if len(text.lstrip("-")) <= 19 and -(1 << 63) <= int(text) < (1 << 63) else None


def _none(name: str) -> None:
    return None


# SQLite's result codes for a database it cannot write or read: the disk, not a bug.
# How long a statement waits for another connection's write (the registry writer, the command
# store, a second controller process reading) before "database is locked". sqlite3's default
# is 5 s, which 10,000 clients enrolling on a loaded 2-core box outwaited (enrolments failed
# with that error); these waits run in worker threads, never on the event loop.
BUSY_WAIT_S = 30.0

_STORAGE_CODES = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_CORRUPT", "SQLITE_NOTADB")


class _Connection(sqlite3.Connection):
    """A connection whose failed statements on a full or broken disk raise StorageError.

    Its statements take ``lock``, which State's transactions hold from BEGIN to COMMIT: the
    connection is shared by threads (the event loop, the session runner's store thread),
    and SQLite's transaction is the connection's, so another thread's statement must wait
    for it to end rather than land in it."""

    path = ""
    lock: Any = contextlib.nullcontext()

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            with self.lock:
                return super().execute(sql, parameters)
        except sqlite3.DatabaseError as exc:
            _raise_storage_error(exc, self.path)
            raise

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> sqlite3.Cursor:
        try:
            with self.lock:
                return super().executemany(sql, seq_of_parameters)
        except sqlite3.DatabaseError as exc:
            _raise_storage_error(exc, self.path)
            raise

    def executescript(self, sql_script: str, /) -> sqlite3.Cursor:
        try:
            with self.lock:
                return super().executescript(sql_script)
        except sqlite3.DatabaseError as exc:
            _raise_storage_error(exc, self.path)
            raise


def _raise_storage_error(exc: sqlite3.DatabaseError, path: str) -> None:
    """Raise StorageError for a disk problem; return for a bug (bad SQL, a constraint)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name == "SQLITE_FULL":
        raise StorageError("no space left on device", "writing", path) from exc
    if name.startswith(_STORAGE_CODES):
        raise StorageError(str(exc), "using", path) from exc


class State:
    """Thin, synchronous access to ``state.db``; every write is its own transaction.

    A write that fails because the disk is full (or broken) raises StorageError and
    changes nothing; the connection stays usable once space is freed."""

    def __init__(self, path: Path | str, migrate: bool = True, outages: Any = None, busy_wait: float = BUSY_WAIT_S) -> None:
        """``path``: state.db, or a ``postgresql://`` URL (store/pg.py: the same tables there);
        ``outages``: a pg.Outages its owner shares between its connections to that server;
        ``busy_wait``: seconds a SQLite statement waits for another connection's write lock."""
        from scaleout.store import pg

        self.db: Any
        # Held by a transaction from BEGIN to COMMIT: one thread's transaction at a time, so
        # another thread's writes never join it (SQLite's shared connection) and the audit
        # head pending in this object is the committing transaction's own.
        self._lock = threading.RLock()
        if pg.is_url(path):
            self.db = pg.PgConnection(str(path), outages=outages)
        else:
            try:
                db = sqlite3.connect(path, timeout=busy_wait, isolation_level=None, check_same_thread=False, factory=_Connection)
            except sqlite3.DatabaseError as exc:
                _raise_storage_error(exc, str(path))
                raise
            assert isinstance(db, _Connection)
            db.path = str(path)
            db.lock = self._lock
            self.db = db
        self._head_file: Any = None  # store/audithead.HeadFile, once `anchor_audit` is called
        self._head_in_store = False  # a PostgreSQL store's head is its AUDIT_ANCHOR row, not a file
        self._pending_head: tuple[int, str] | None = None
        self._pending_entries = 0  # audit entries the pending head adds to the count (several in one transaction)
        self._audit_count = 0
        self.fence: int | None = None  # the active controller's term on a shared store (take_term)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if migrate and self.postgres:  # one controller at a time reshapes the schema (its DDL is transactional)
            with self.transaction():
                self.db.executescript(SCHEMA)
                self._migrate()
                ensure_schema(self.db)
        elif migrate:  # a second connection of the same process only reads
            self.db.executescript(SCHEMA)
            self._migrate()
            ensure_schema(self.db)  # commands, predictions, clients' attributes and package

    @property
    def postgres(self) -> bool:
        return getattr(self.db, "dialect", "sqlite") == "postgresql"

    def _migrate(self) -> None:
        """Columns added since the first release, added to an older state.db in place."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(rounds)")}
        for column in ("server_state", "timing", "retried", "aggregation", "server_functions"):
            if column not in columns:
                self.db.execute(f"ALTER TABLE rounds ADD COLUMN {column} TEXT")
        if "attempt" not in columns:
            self.db.execute("ALTER TABLE rounds ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1")
        if "selection" not in columns:  # who a round selected and why the others not (client sampling)
            self.db.execute("ALTER TABLE rounds ADD COLUMN selection TEXT")
        if "signature" not in {row[1] for row in self.db.execute("PRAGMA table_info(packages)")}:
            self.db.execute("ALTER TABLE packages ADD COLUMN signature TEXT")  # the controller's, see security/packages.py
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(audit)")}
        if "hash" not in columns:  # entries from before the chain: chained now, in their order
            with self.transaction():
                self.db.execute("ALTER TABLE audit ADD COLUMN address TEXT")
                self.db.execute("ALTER TABLE audit ADD COLUMN hash TEXT")
                prev = GENESIS
                head = None
                for row in self.db.execute("SELECT id, time, actor, action, address, detail FROM audit ORDER BY id").fetchall():
                    prev = entry_hash(prev, dict(row))
                    self.db.execute("UPDATE audit SET hash=? WHERE id=?", (prev, row["id"]))
                    head = f"{row['id']} {prev}"
                if head is not None:
                    self.set_meta(AUDIT_HEAD, head)
        if self.postgres:
            from scaleout.store.pg import AUDIT_TRIGGERS as PG_AUDIT_TRIGGERS

            self.db.script(PG_AUDIT_TRIGGERS)
        else:
            self.db.executescript(AUDIT_TRIGGERS)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self, immediate: bool = True) -> Iterator[None]:
        """Group writes; a failure (a full disk at COMMIT included) rolls them all back.
        Inside another transaction, the writes simply join it. It takes the write lock at
        once (BEGIN IMMEDIATE, waiting for another connection's write to end): a deferred
        transaction that reads before it writes fails at once in WAL mode, "database is
        locked", when another connection (the registry writer, the command store) wrote in
        between."""
        with self._lock:
            if self.db.in_transaction:
                yield
                return
            self.db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                if immediate and self.fence is not None:
                    self._check_fence()
                yield
                self.db.execute("COMMIT")
            except BaseException:
                self._pending_head = None
                self._pending_entries = 0
                if self.db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.rollback()
                raise
            if self._pending_head is not None:  # committed: the head outside state.db follows
                self._write_head()

    def take_term(self) -> int:
        """Become the active controller's store: count one more term in ``meta`` and fence
        every later write transaction of this State to it (see ``_check_fence``)."""
        self.fence = None
        with self.transaction():  # serialised with every other controller's write transactions
            term = int(self.get_meta(TERM) or 0) + 1
            self.set_meta(TERM, str(term))
        self.fence = term
        return term

    def _check_fence(self) -> None:
        """Refuse this write if another controller has taken the store over since this one
        became active: a controller that lost its lock must not write one more step after the
        new active one has begun (its transactions are serialised with this one, and the new
        one counts its term before it loads the state)."""
        term = self.get_meta(TERM)
        if term != str(self.fence):
            raise StorageError(
                f"another controller took this store over (term {term}; this controller's was {self.fence}): nothing written",
                "writing to", getattr(self.db, "path", "the store"),
            )

    def _one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        return _row(self.db.execute(sql, args).fetchone())

    def _all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [r for r in map(_row, self.db.execute(sql, args).fetchall()) if r is not None]

    # -- meta -----------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    # -- registry -------------------------------------------------------------------

    def upsert_combiner(self, name: str, status: str, url: str | None = None, clients: int | None = None) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO combiners(name, url, status, clients, first_seen, last_seen) VALUES(?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET status=excluded.status, last_seen=excluded.last_seen, "
            "url=COALESCE(?, url), clients=COALESCE(?, clients)",
            (name, url, status, clients or 0, now, now, url, clients),
        )

    def combiners(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM combiners ORDER BY name")

    def upsert_client(self, name: str, status: str, combiner: str | None = None) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO clients(name, combiner, status, first_seen, last_seen) VALUES(?, ?, ?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET status=excluded.status, last_seen=excluded.last_seen, "
            "combiner=COALESCE(excluded.combiner, combiner)",
            (name, combiner, status, now, now),
        )

    def set_clients_offline(self, combiner: str, keep: set[str]) -> None:
        rows = self.db.execute("SELECT name FROM clients WHERE combiner=? AND status='online'", (combiner,)).fetchall()
        for (name,) in rows:
            if name not in keep:
                self.upsert_client(name, "offline")

    def clients(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM clients ORDER BY name")
        for row in rows:  # none logged yet: an empty dict, as client show gives
            if "attributes" in row and row["attributes"] is None:
                row["attributes"] = {}
        return rows

    # -- packages and models ----------------------------------------------------------

    def add_package(self, digest: str, name: str, size: int, signature: str | None = None) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO packages(id, name, size, created, signature) VALUES(?, ?, ?, ?, ?)",
            (digest, name, size, time.time(), signature),
        )
        if signature is not None:  # a package set again is signed again (by this controller's key)
            self.db.execute("UPDATE packages SET signature=? WHERE id=?", (signature, digest))

    def package(self, digest: str) -> dict[str, Any]:
        row = self._one("SELECT * FROM packages WHERE id=?", digest)
        if row is None:
            raise NotFoundError("package", digest)
        return row

    def add_model(
        self,
        digest: str,
        size: int,
        *,
        parent: str | None = None,
        session_id: str | None = None,
        round_index: int | None = None,
        aggregator: str | None = None,
        contributors: list[str] | None = None,
    ) -> None:
        """Append a model to the trail (a model already there keeps its first record)."""
        self.db.execute(
            "INSERT OR IGNORE INTO models(id, parent, session_id, round_index, aggregator, contributors, size, created) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
            (digest, parent, session_id, round_index, aggregator, json.dumps(contributors or []), size, time.time()),
        )

    def model(self, digest: str) -> dict[str, Any]:
        row = self._one("SELECT * FROM models WHERE id=?", digest)
        if row is None:
            is_prefix = len(digest) >= 6 and all(c in "0123456789abcdef" for c in digest)
            matches = self._all("SELECT * FROM models WHERE substr(id, 1, ?) = ?", len(digest), digest) if is_prefix else []
            if len(matches) != 1:
                raise NotFoundError("model", digest)
            row = matches[0]
        return row

    def models(self, session_id: str | None = None) -> list[dict[str, Any]]:
        if session_id:
            return self._all("SELECT * FROM models WHERE session_id=? ORDER BY created", session_id)
        return self._all("SELECT * FROM models ORDER BY created")

    def commit_model(self, digest: str, size: int, **trail: Any) -> None:
        """Record a model and make it the global model, in one transaction."""
        with self.transaction():
            self.add_model(digest, size, **trail)
            self.set_meta("active_model", digest)

    def commit_round(
        self, session_id: str, index: int, digest: str, size: int, *, parent: str, aggregator: str, contributors: list[str],
        server_state: str | None = None,
    ) -> None:
        """A round's new global model: trail entry, active model and round outcome at once.

        The round's record is final only once ``finish_round`` set ``finished`` (its
        validation, duration and timing come then): readers wait for that.
        ``server_state`` names the stored state a strategy keeps across rounds (FedAdam's
        moments), committed with the model it belongs to."""
        with self.transaction():
            self.add_model(
                digest, size, parent=parent, session_id=session_id, round_index=index, aggregator=aggregator, contributors=contributors
            )
            self.set_meta("active_model", digest)
            self.db.execute(
                "UPDATE rounds SET status='succeeded', model_id=?, participants=?, server_state=? WHERE session_id=? AND idx=?",
                (digest, json.dumps(contributors), server_state, session_id, index),
            )
            self.audit(
                "controller", "model.commit", id=digest, parent=parent, session=session_id, round=index, aggregator=aggregator,
                contributors=contributors,
            )

    # -- sessions and rounds ------------------------------------------------------------

    def add_session(self, session_id: str, config: dict[str, Any], start_model: str) -> None:
        self.db.execute(
            "INSERT INTO sessions(id, status, config, created, start_model) VALUES(?, 'running', ?, ?, ?)",
            (session_id, json.dumps(config), time.time(), start_model),
        )

    def finish_session(
        self, session_id: str, status: str, end_model: str | None, reason: str | None = None, finished: float | None = None
    ) -> None:
        self.db.execute(
            "UPDATE sessions SET status=?, finished=?, end_model=?, reason=? WHERE id=?",
            (status, finished or time.time(), end_model, reason, session_id),
        )

    def end_session(
        self, session_id: str, status: str, end_model: str | None, reason: str | None,
        finished: float | None = None, round_reason: str | None = None,
    ) -> None:
        """Record a session's outcome and fail its unfinished rounds (with ``round_reason``,
        by default the session's), in one transaction."""
        finished = finished or time.time()
        with self.transaction():
            for row in self.rounds(session_id):
                if row["status"] == "running":
                    self.finish_round(session_id, row["idx"], status="failed", reason=round_reason or reason or status, finished=finished)
            self.finish_session(session_id, status, end_model, reason, finished)

    def blob_ids(self) -> dict[str, set[str]]:
        """The blobs rows name, by kind: models, packages and strategy states."""
        one = lambda sql: {r[0] for r in self.db.execute(sql).fetchall() if r[0]}  # noqa: E731
        return {
            "models": one("SELECT id FROM models"),
            "packages": one("SELECT id FROM packages"),
            "state": one("SELECT server_state FROM rounds WHERE server_state IS NOT NULL"),
        }

    def reopen_session(self, session_id: str, config: dict[str, Any]) -> None:
        """A session that ended runs again (session continue) with ``config``."""
        self.db.execute(
            "UPDATE sessions SET status='running', finished=NULL, reason=NULL, config=? WHERE id=?", (json.dumps(config), session_id),
        )

    def session(self, session_id: str) -> dict[str, Any]:
        row = self._one("SELECT * FROM sessions WHERE id=?", session_id)
        if row is None:
            raise NotFoundError("session", session_id)
        row["rounds"] = self.rounds(session_id)
        return row

    def has_session(self, session_id: str) -> bool:
        """Whether a session of this id was ever started on this store."""
        return self._one("SELECT id FROM sessions WHERE id=?", session_id) is not None

    def sessions(self) -> list[dict[str, Any]]:
        """Every session, oldest first, with ``rounds_done``: how many of its rounds ended."""
        return self._all(
            "SELECT *, (SELECT COUNT(*) FROM rounds WHERE rounds.session_id = sessions.id AND rounds.finished IS NOT NULL) AS rounds_done"
            " FROM sessions ORDER BY created"
        )

    def start_round(
        self, session_id: str, index: int, parent: str, participants: list[str], started: float | None = None,
        attempt: int = 1, retried: list[str] | None = None, selection: dict[str, Any] | None = None,
    ) -> None:
        """Record a running round; ``started`` (wall clock, now if None) is when it began,
        which may be before this row is written (e.g. while it waited for clients). A round
        run again after a restart keeps its index: ``attempt`` counts the tries and
        ``retried`` says why each earlier one was given up. ``selection``: who the round
        selected and why each other client was not (core/selection.py)."""
        self.db.execute(
            "INSERT OR REPLACE INTO rounds(session_id, idx, status, parent, participants, started, attempt, retried, selection) "
            "VALUES(?, ?, 'running', ?, ?, ?, ?, ?, ?)",
            (session_id, index, parent, json.dumps(participants), time.time() if started is None else started, attempt,
             json.dumps(retried) if retried else None, json.dumps(selection) if selection is not None else None),
        )

    def finish_round(self, session_id: str, index: int, **fields: Any) -> None:
        fields.setdefault("finished", time.time())
        for key in ("participants", "validation", "timing", "aggregation", "server_functions"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        sets = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE rounds SET {sets} WHERE session_id=? AND idx=?", (*fields.values(), session_id, index))

    def add_step(self, session_id: str, step: dict[str, Any]) -> None:
        """Append one transition of a session's state machine (core/sessions.py): written in
        the transaction of the rows it implies, before the controller acts on it."""
        self.db.execute(
            "INSERT INTO session_steps(session_id, seq, step) "
            "VALUES(?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM session_steps WHERE session_id=?), ?)",
            (session_id, session_id, json.dumps(step, separators=(",", ":"))),
        )

    def steps(self, session_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT step FROM session_steps WHERE session_id=? ORDER BY seq", (session_id,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def rounds(self, session_id: str) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM rounds WHERE session_id=? ORDER BY idx", session_id)

    def add_report(self, kind: str, session_id: str, round_index: int, client: str, data: dict[str, Any], error: str | None) -> None:
        self.db.execute(
            "INSERT INTO reports(kind, session_id, round_index, client, data, error, created) VALUES(?, ?, ?, ?, ?, ?, ?)",
            (kind, session_id, round_index, client, to_json(data), error, time.time()),  # UTF-8, as measured by its limit
        )

    def reports(self, session_id: str, round_index: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM reports WHERE session_id=?"
        args: list[Any] = [session_id]
        if round_index is not None:
            sql, args = sql + " AND round_index=?", [*args, round_index]
        if kind is not None:
            sql, args = sql + " AND kind=?", [*args, kind]
        return self._all(sql + " ORDER BY id", *args)

    # -- audit --------------------------------------------------------------------------

    def audit(self, actor: str, action: str, *, address: str | None = None, **detail: Any) -> None:
        """Append an entry to the audit log, chained to the one before (core/audit.py):
        ``actor`` is who (role and token id or node name), ``address`` where from."""
        with self.transaction(immediate=True):  # reads the head, then appends after it
            head = self.get_meta(AUDIT_HEAD)
            prev = head.split(" ", 1)[1] if head else GENESIS
            (next_id,) = self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM audit").fetchone()
            entry = {"id": next_id, "time": time.time(), "actor": actor, "action": action, "address": address, "detail": to_json(detail)}
            digest = entry_hash(prev, entry)
            self.db.execute(
                "INSERT INTO audit(id, time, actor, action, address, detail, hash) VALUES(?, ?, ?, ?, ?, ?, ?)",
                (next_id, entry["time"], actor, action, address, entry["detail"], digest),
            )
            self.set_meta(AUDIT_HEAD, f"{next_id} {digest}")
            if self._head_in_store:  # in this transaction: it commits (or not) with the entry it names
                self._sign_in_store(next_id, digest, head)
            else:
                self._pending_head = (next_id, digest)
                self._pending_entries += 1

    def audit_many(self, entries: list[tuple[str, str, str | None, dict[str, Any]]]) -> None:
        """Append several entries (actor, action, address, detail) in one transaction, the
        head outside state.db rewritten once: a burst of enrolments costs one write, not one each."""
        with self.transaction(immediate=True):
            for actor, action, address, detail in entries:
                self.audit(actor, action, address=address, **detail)

    def anchor_audit(self, head_file: Any) -> str | None:
        """Keep the audit head in ``head_file`` (store/audithead.py) too, rewritten after each
        append; written now when missing, not signed with this key or not naming the log's
        end (why, then: the first start with it, or someone removed or replaced it, which
        nothing here can tell apart; the controller records it in the log)."""
        from scaleout.core.errors import ConfigError

        self._head_file = head_file
        if self.postgres:
            return self._anchor_in_store()
        (self._audit_count,) = self.db.execute("SELECT COUNT(*) FROM audit").fetchone()
        head = self.get_meta(AUDIT_HEAD)
        eid, _, digest = (head or "0 ").partition(" ")
        if not head_file.exists():
            why = "missing"
        else:
            try:
                anchor = head_file.read()
                why = "" if (anchor.id, anchor.hash, anchor.count) == (int(eid) if eid.isdigit() else 0, digest, self._audit_count) else "not the log's end"
            except ConfigError:
                why = "not signed with this controller's audit.key"
        if not why:
            return None
        self._pending_head = (int(eid) if eid.isdigit() else 0, digest) if head else (0, "")
        self._pending_entries = 0
        self._audit_count -= 1  # _write_head counts the pending entry
        self._write_head()
        return why

    @property
    def audit_head_where(self) -> str:
        """Where the signed audit head is kept (for messages)."""
        from scaleout.store.audithead import STORE_WHERE

        return STORE_WHERE if self._head_in_store else str(getattr(self._head_file, "path", "-"))

    def _anchor_in_store(self) -> str | None:
        """``anchor_audit`` on a PostgreSQL store: its head is the AUDIT_ANCHOR row, shared by every
        controller on it (a takeover finds it naming the log's end); written now, in one
        transaction with what it is checked against, when missing, not signed with the store's
        audit key or not naming the log's end (and why is returned, as for the file)."""
        from scaleout.core.audit import Anchor
        from scaleout.core.errors import ConfigError
        from scaleout.store.audithead import STORE_WHERE

        with self.transaction():  # serialised with every append, on every controller
            head = self.get_meta(AUDIT_HEAD)
            eid, _, digest = (head or "0 ").partition(" ")
            (count,) = self.db.execute("SELECT COUNT(*) FROM audit").fetchone()
            end = Anchor(int(eid) if eid.isdigit() else 0, digest, count)
            text = self.get_meta(AUDIT_ANCHOR)
            if text is None:
                why = "missing"
            else:
                try:
                    why = "" if self._head_file.check(text, STORE_WHERE) == end else "not the log's end"
                except ConfigError:
                    why = "not signed with the store's audit.key"
            if why:
                self.set_meta(AUDIT_ANCHOR, self._head_file.signed(end))
        self._head_in_store = True
        return why or None

    def _sign_in_store(self, eid: int, digest: str, before: str | None) -> None:
        """Write the store's signed head for the entry just appended (``before``: the head it follows)."""
        from scaleout.core.audit import Anchor
        from scaleout.core.errors import ConfigError

        count: int | None = None
        text = self.get_meta(AUDIT_ANCHOR)
        if text is not None and before:
            try:  # the count goes on from the head before, which named the entry before this one
                last = self._head_file.check(text, AUDIT_ANCHOR)
                count = last.count + 1 if f"{last.id} {last.hash}" == before else None
            except ConfigError:
                count = None
        if count is None:
            (count,) = self.db.execute("SELECT COUNT(*) FROM audit").fetchone()
        self.set_meta(AUDIT_ANCHOR, self._head_file.signed(Anchor(eid, digest, int(count))))

    def _write_head(self) -> None:
        from scaleout.core.audit import Anchor

        pending, self._pending_head = self._pending_head, None
        if self._head_file is None or pending is None:
            return
        self._audit_count += self._pending_entries or 1
        self._pending_entries = 0
        self._head_file.write(Anchor(pending[0], pending[1], self._audit_count))  # replaced whole, no disk flush (see audithead.py)

    def audit_log(self, limit: int = 100, since: float | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (from ``since`` on, if given), newest first."""
        return self._all(
            "SELECT id, time, actor, action, address, detail, hash FROM audit WHERE time >= ? ORDER BY id DESC LIMIT ?",
            since if since is not None else float("-inf"), limit if limit >= 0 else 1 << 62,  # SQLite's LIMIT -1, in SQL both take
        )

    def audit_verify(self, anchor: Any = None, exact: bool = True) -> tuple[int, Broken | None]:
        """Check the whole chain and its head, and against ``anchor`` (core/audit.Anchor: the
        signed head file, ``exact``, or an operator's copy): (entries checked, the first break or None)."""
        from scaleout.core.audit import verify_log

        cur = self.db.execute("SELECT id, time, actor, action, address, detail, hash FROM audit ORDER BY id")
        head = self.get_meta(AUDIT_HEAD)
        parsed: tuple[int, str] | None = None
        if head:
            eid, _, digest = head.partition(" ")
            parsed = (int(eid), digest) if eid.isdigit() else (0, "")
        if anchor is None:
            return verify_chain((dict(row) for row in cur), parsed)
        return verify_log((dict(row) for row in cur), parsed, anchor, exact=exact)
