"""PostgreSQL behind State's sqlite3-shaped connection (``scaleout serve --store postgresql://...``).

The driver is psycopg 3 with a bounded ``psycopg_pool.ConnectionPool``, not asyncpg: the
store is synchronous (State, the registry writer, the command store) and is called from
worker threads (``asyncio.to_thread``) and at start-up; asyncpg is asyncio-only and would
need an event loop per thread. psycopg 3 connections are thread-safe and synchronous.

``PgConnection`` offers what State and its neighbours use of ``sqlite3.Connection``:
``execute``/``executemany``/``executescript`` returning a cursor whose rows are addressable
by name and index, ``in_transaction``, ``rollback``, ``close``. A statement outside a
transaction runs in autocommit on a pooled connection; ``BEGIN`` holds one connection for
the calling thread until ``COMMIT``/``ROLLBACK``. ``BEGIN IMMEDIATE`` (SQLite's one writer at
a time) becomes a transaction that first takes a transaction-scoped advisory lock, so the
read-then-append of the audit chain (and every other read-then-write State groups) is
serialised across connections and controllers as it is in SQLite.

The SQL stays written once, in SQLite's dialect; ``translate`` turns it into PostgreSQL's
here and only here (placeholders, INSERT OR IGNORE/REPLACE, two-argument MAX/MIN, the DDL's
types, PRAGMA table_info). The schema is therefore the same tables, columns and ``meta`` rows
(schema version included) on both; only the audit log's append-only triggers are written
for PostgreSQL (plpgsql) in ``AUDIT_TRIGGERS``.

A lost connection, a server that refuses or a full disk on the server raise StorageError
naming the store (its password left out), never a driver traceback: StoreUnreachable for the
link (lost, refused, no connection in time), which waiting may cure, as the session runner
does. An outage is told in one line when the server is lost, at most one every SAY_EVERY_S
while it stays away and one when it is back (``_Outage``), not in a warning per attempt of
each pool (psycopg_pool's are silenced: ``_PoolNoise``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from scaleout.core.errors import StorageError, StoreUnreachable

SCHEMES = ("postgresql://", "postgres://")
POOL_MAX = 8  # connections per State (the controller holds three States: its own, the registry writer's, the command store's)
CONNECT_TIMEOUT_S = 10
# How long a statement waits for a connection (a server restarting, a network cut): a short
# outage passes unnoticed; a longer one fails the write with StorageError (the round says why).
WAIT_S = 5.0
RETRY_MAX_S = 1.0  # a lost server is tried again at least this often
WRITE_LOCK = 0x5CA1E0  # the advisory lock BEGIN IMMEDIATE takes (transaction-scoped)
SAY_EVERY_S = 10.0  # while the server stays away, one line this often at most

log = logging.getLogger("scaleout.store")

AUDIT_TRIGGERS = """
CREATE OR REPLACE FUNCTION scaleout_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
DROP TRIGGER IF EXISTS audit_no_update ON audit;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit FOR EACH ROW EXECUTE FUNCTION scaleout_audit_append_only();
DROP TRIGGER IF EXISTS audit_no_truncate ON audit;
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit FOR EACH STATEMENT EXECUTE FUNCTION scaleout_audit_append_only();
"""


# What each BEGIN is here: IMMEDIATE (and EXCLUSIVE) serialises with every other such transaction
# (SQLite's one writer); a plain BEGIN reads one snapshot (State's deferred transactions are
# for consistent reads); DEFERRED is PostgreSQL's own READ COMMITTED, serialising nothing
# (a large blob's write must not hold up the audit log).
_BEGIN = {"BEGIN IMMEDIATE": "serial", "BEGIN EXCLUSIVE": "serial", "BEGIN": "snapshot", "BEGIN DEFERRED": "plain"}


def is_url(target: object) -> bool:
    """Whether a store target names PostgreSQL (rather than a SQLite file)."""
    return isinstance(target, str) and target.startswith(SCHEMES)


def redact(url: str) -> str:
    """The URL as a message may show it: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _where(url: str) -> str:
    """HOST:PORT/DB, as the outage lines name the server (no user, no password)."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


class _Outage:
    """Whether the server at one address answers, as every pool of this process on it sees
    it (each State and the blob store have their own): one line when it is lost, at most one
    every SAY_EVERY_S while it stays away, one when it is back."""

    def __init__(self, where: str, password: str | None) -> None:
        self.where = where
        self.password = password
        self.lock = threading.Lock()
        self.since: float | None = None  # monotonic time it was lost; None: it answers
        self.said = 0.0

    def lost(self, reason: str) -> None:
        if self.password:
            reason = reason.replace(self.password, "***")
        now = time.monotonic()
        with self.lock:
            if self.since is None:
                self.since = self.said = now
                log.warning("lost the PostgreSQL store at %s (%s); retrying", self.where, reason)
            elif now - self.said >= SAY_EVERY_S:
                self.said = now
                log.warning("the PostgreSQL store at %s is still unreachable after %.0f s (%s); retrying", self.where, now - self.since, reason)

    def back(self) -> None:
        if self.since is None:  # read without the lock: the usual case costs nothing
            return
        with self.lock:
            if self.since is not None:
                log.warning("PostgreSQL store back after %.1f s", time.monotonic() - self.since)
                self.since = None


class Outages:
    """The outage records of one owner's pools (a controller's State, registry and blob store),
    one per server address, so its pools on one server say an outage once between them. Made
    by the owner and passed to each PgConnection; one made alone serves that connection alone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_where: dict[str, _Outage] = {}

    def of(self, url: str) -> _Outage:
        with self._lock:
            return self._by_where.setdefault(_where(url), _Outage(_where(url), urlsplit(url).password))


class _PoolNoise(logging.Filter):
    """psycopg_pool's warnings for each failed (re)connection attempt and each dropped
    connection (several a second, multi-line, per pool): _Outage says it once instead."""

    NOISE = ("error connecting in", "discarding broken connection", "discarding closed connection", "reconnection attempt in pool", "task run ")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and str(record.msg).startswith(self.NOISE))


def _quiet_pool() -> None:
    pool_log = logging.getLogger("psycopg.pool")
    if not any(isinstance(f, _PoolNoise) for f in pool_log.filters):
        pool_log.addFilter(_PoolNoise())


def link_failure(exc: BaseException) -> bool:
    """A failure of the link to the server (lost, refused, closed, shutting down), not of
    what it was asked (a full disk there, a constraint, bad SQL)."""
    import psycopg

    if isinstance(exc, psycopg.InterfaceError):  # "the connection is closed"
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, psycopg.OperationalError) and (not state or state[:2] == "08" or state in ("57P01", "57P02", "57P03"))


# -- the dialect ----------------------------------------------------------------------------

_TABLE_INFO = re.compile(r"^\s*PRAGMA\s+table_info\((\w+)\)\s*$", re.IGNORECASE)
_PRAGMA = re.compile(r"^\s*PRAGMA\b", re.IGNORECASE)
_OR_IGNORE = re.compile(r"\bINSERT\s+OR\s+IGNORE\s+INTO\b", re.IGNORECASE)
_OR_REPLACE = re.compile(r"\bINSERT\s+OR\s+REPLACE\s+INTO\s+(\w+)\s*\(([^)]*)\)", re.IGNORECASE)
_UPSERT = re.compile(r"\bINSERT\s+INTO\s+(\w+)\b.*?\bDO\s+UPDATE\s+SET\b", re.IGNORECASE | re.DOTALL)
_DDL = re.compile(r"^\s*(CREATE\s+TABLE|ALTER\s+TABLE)\b", re.IGNORECASE)


def _scalar_minmax(sql: str) -> str:
    """SQLite's two-argument MAX(a, b)/MIN(a, b) -> GREATEST/LEAST (the aggregates stay)."""
    out: list[str] = []
    i = 0
    pattern = re.compile(r"\b(MAX|MIN)\(", re.IGNORECASE)
    while True:
        m = pattern.search(sql, i)
        if m is None:
            out.append(sql[i:])
            return "".join(out)
        depth, j, comma = 1, m.end(), False
        while j < len(sql) and depth:
            c = sql[j]
            depth += c == "("
            depth -= c == ")"
            comma = comma or (c == "," and depth == 1)
            j += 1
        out.append(sql[i:m.start()])
        out.append(("GREATEST(" if m.group(1).upper() == "MAX" else "LEAST(") if comma else sql[m.start():m.end()])
        i = m.end()


def translate(sql: str, params: bool) -> str:
    """One statement of State's SQLite dialect in PostgreSQL's (``params``: it has placeholders)."""
    if _DDL.match(sql):
        sql = re.sub(r"\bINTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql, flags=re.IGNORECASE)
        sql = re.sub(r"\bINTEGER\b", "BIGINT", sql, flags=re.IGNORECASE)
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql, flags=re.IGNORECASE)
    if _OR_IGNORE.search(sql):
        sql = _OR_IGNORE.sub("INSERT INTO", sql) + " ON CONFLICT DO NOTHING"
    sql = _scalar_minmax(sql)
    upsert = _UPSERT.search(sql)
    if upsert:  # the row there, bare in SQLite's DO UPDATE, is ambiguous in PostgreSQL's: named by its table
        head, tail = sql[:upsert.end()], sql[upsert.end():]
        sql = head + re.sub(r"COALESCE\(([^,()]+),\s*(\w+)\)", lambda x: f"COALESCE({x.group(1)}, {upsert.group(1)}.{x.group(2)})", tail)
    if params:
        sql = sql.replace("%", "%%").replace("?", "%s")
    return sql


class Row(tuple):  # type: ignore[type-arg]
    """A result row by index (``row[0]``, unpacking) and by name (``row["id"]``, ``dict(row)``)."""

    _names: tuple[str, ...] = ()

    def __new__(cls, values: Any, names: tuple[str, ...]) -> Row:  # noqa: PYI034
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, self._names.index(key))
            except ValueError:
                raise IndexError(f"no such column: {key}") from None
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _value(v: Any) -> Any:
    # SUM and friends come back as numeric: the ints and floats SQLite gives.
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    return v


class Cursor:
    """A statement's whole result, read at once (so its connection goes back to the pool)."""

    def __init__(self, rows: list[Row], rowcount: int, lastrowid: int | None = None) -> None:
        self._rows = rows
        self._i = 0
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Row | None:
        if self._i >= len(self._rows):
            return None
        self._i += 1
        return self._rows[self._i - 1]

    def fetchall(self) -> list[Row]:
        rest, self._i = self._rows[self._i:], len(self._rows)
        return rest

    def __iter__(self) -> Any:
        return iter(self.fetchall())


def _params(args: Any) -> Any:
    # SQLite stores a bool as 0/1 in an INTEGER column; PostgreSQL would refuse a boolean there.
    return [int(a) if isinstance(a, bool) else a for a in args]


def _pool_class() -> Any:
    """ConnectionPool, retrying a lost server at least every RETRY_MAX_S.

    psycopg_pool's own retries back off without a cap (1, 2, 4, 8 s ...): after a 10 s outage
    its next attempt could come 16 s later, and every write until then fails after WAIT_S.
    Here the delay stops growing at RETRY_MAX_S. (Through its ``_add_connection`` hook; a
    psycopg_pool without it keeps its own backoff.)"""
    from psycopg_pool import ConnectionPool
    from psycopg_pool.base import AttemptWithBackoff

    class _Capped(AttemptWithBackoff):
        def update_delay(self, now: float) -> None:
            super().update_delay(now)
            self.delay = min(self.delay, RETRY_MAX_S)

    class Pool(ConnectionPool):  # type: ignore[misc]
        outage: _Outage | None = None

        def _connect(self, timeout: float | None = None) -> Any:
            try:
                conn = super()._connect(timeout)
            except Exception as exc:  # what the pool's own handling catches, told once (_Outage)
                if self.outage is not None:
                    self.outage.lost(_reason(exc))
                raise
            if self.outage is not None:
                self.outage.back()
            return conn

        def _add_connection(self, attempt: Any, growing: bool = False) -> None:
            if attempt is None:
                attempt = _Capped(timeout=self.reconnect_timeout)
            super()._add_connection(attempt, growing=growing)

    return Pool if hasattr(ConnectionPool, "_add_connection") else ConnectionPool


class PgConnection:
    """The sqlite3.Connection surface State uses, on a bounded pool of PostgreSQL connections."""

    dialect = "postgresql"

    def __init__(self, url: str, max_size: int = POOL_MAX, outages: Outages | None = None) -> None:
        """``outages``: shared with the owner's other connections (see Outages)."""
        import psycopg
        self.url = url
        self.path = f"the PostgreSQL store {redact(url)}"  # what StorageError names
        try:  # one direct attempt first: its error says why (refused, no such database, auth)
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S).close()
        except psycopg.Error as exc:
            raise (StoreUnreachable if link_failure(exc) else StorageError)(_reason(exc), "connecting to", self.path) from None
        pool = _pool_class()
        self._outage = (outages or Outages()).of(url)
        _quiet_pool()
        self._pool = pool(
            url, min_size=1, max_size=max_size, kwargs={"autocommit": True}, open=False, timeout=WAIT_S,
            check=pool.check_connection, name="scaleout-store",
        )
        self._pool.outage = self._outage
        self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        self._local = threading.local()
        self._columns: dict[str, list[tuple[str, bool]]] = {}  # table -> (column, has a default), for INSERT OR REPLACE
        self._keys: dict[str, list[str]] = {}

    # -- transactions (per thread, as a sqlite3 connection's is per connection) --------------

    @property
    def in_transaction(self) -> bool:
        return getattr(self._local, "conn", None) is not None

    def _begin(self, mode: str) -> None:
        conn = self._getconn()
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ" if mode == "snapshot" else "BEGIN")
            if mode == "serial":
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        except Exception as exc:
            self._putconn(conn, broken=True)
            self._raise(exc, "using")
            raise
        self._local.conn = conn

    def _end(self, commit: bool) -> None:
        conn = self._local.conn
        self._local.conn = None
        try:
            if commit:
                conn.execute("COMMIT")
            else:
                conn.execute("ROLLBACK")
        except Exception as exc:
            self._putconn(conn, broken=True)
            if commit:
                self._raise(exc, "writing to")
                raise
            return
        self._putconn(conn)

    @contextlib.contextmanager
    def transaction(self, begin: str = "BEGIN DEFERRED") -> Iterator[PgConnection]:
        """``begin`` (a key of _BEGIN: what it serialises with) to COMMIT, rolled back on any exception."""
        self.execute(begin)
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.execute("COMMIT")

    def rollback(self) -> None:
        if self.in_transaction:
            self._end(commit=False)

    def _getconn(self) -> Any:
        from psycopg_pool import PoolTimeout

        try:
            return self._pool.getconn()
        except PoolTimeout:
            self._outage.lost(f"no connection within {WAIT_S:g} s")
            raise StoreUnreachable(f"no connection to PostgreSQL within {WAIT_S:g} s", "using", self.path) from None

    def _putconn(self, conn: Any, broken: bool = False) -> None:
        with contextlib.suppress(Exception):
            if broken and not conn.closed and conn.info.transaction_status != 0:  # not idle: its state is unknown
                conn.close()
            self._pool.putconn(conn)

    def _raise(self, exc: BaseException, action: str) -> None:
        """StorageError for the server or the link (not a bug in the SQL, not a constraint)."""
        import psycopg

        if isinstance(exc, StorageError):
            raise exc
        if link_failure(exc):
            self._outage.lost(_reason(exc))
            raise StoreUnreachable(_reason(exc), action, self.path) from None
        if isinstance(exc, psycopg.OperationalError) or (isinstance(exc, psycopg.Error) and (getattr(exc, "sqlstate", None) or "")[:2] in ("08", "53", "57", "58", "XX")):
            raise StorageError(_reason(exc), action, self.path) from None

    # -- statements --------------------------------------------------------------------------

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        word = sql.strip().upper()
        if word in ("BEGIN", "BEGIN IMMEDIATE", "BEGIN DEFERRED", "BEGIN EXCLUSIVE"):
            self._begin(_BEGIN[word])
            return Cursor([], -1)
        if word in ("COMMIT", "END", "ROLLBACK"):
            if self.in_transaction:
                self._end(commit=word != "ROLLBACK")
            return Cursor([], -1)
        m = _TABLE_INFO.match(sql)
        if m:
            return self._run(
                "SELECT ordinal_position - 1 AS cid, column_name AS name, data_type AS type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position", [m.group(1).lower()],
            )
        if _PRAGMA.match(sql):
            return Cursor([], -1)  # journal_mode, synchronous: SQLite's own
        replace = _OR_REPLACE.search(sql)
        if replace:
            sql = self._replace(sql, replace)
        has = bool(parameters)
        return self._run(translate(sql, has), _params(parameters) if has else None)

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> Cursor:
        rows = [_params(p) for p in seq_of_parameters]
        if not rows:
            return Cursor([], 0)
        replace = _OR_REPLACE.search(sql)
        if replace:
            sql = self._replace(sql, replace)
        return self._run(translate(sql, True), rows, many=True)

    def executescript(self, sql_script: str, /) -> Cursor:
        for statement in sql_script.split(";"):
            if statement.strip():
                self.execute(statement)
        return Cursor([], -1)

    def script(self, text: str) -> None:
        """Run PostgreSQL's own DDL as it is (plpgsql bodies hold semicolons)."""
        self._run(text, None)

    def _run(self, sql: str, params: Any, many: bool = False) -> Cursor:
        own = not self.in_transaction
        conn = self._getconn() if own else self._local.conn
        try:
            with conn.cursor() as cur:
                if many:
                    cur.executemany(sql, params)
                else:
                    cur.execute(sql, params)
                rows: list[Row] = []
                if cur.description is not None:
                    names = tuple(d.name for d in cur.description)
                    rows = [Row([_value(v) for v in r], names) for r in cur.fetchall()]
                out = Cursor(rows, cur.rowcount)
        except Exception as exc:
            if own:
                self._putconn(conn, broken=True)
            self._raise(exc, "using")
            raise
        if own:
            self._putconn(conn)
        self._outage.back()
        return out

    def _replace(self, sql: str, m: re.Match[str]) -> str:
        """SQLite's INSERT OR REPLACE (delete the old row, insert the new: columns not given take
        their defaults) as INSERT ... ON CONFLICT (key) DO UPDATE."""
        table = m.group(1).lower()
        given = [c.strip().lower() for c in m.group(2).split(",")]
        if table not in self._keys:
            self._keys[table] = [r[0] for r in self._run(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)", [table],
            ).fetchall()]
            self._columns[table] = [(r[0], r[1] is not None) for r in self._run(
                "SELECT column_name, column_default FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = %s ORDER BY ordinal_position", [table],
            ).fetchall()]
        keys = self._keys[table]
        sets = [f"{c}=EXCLUDED.{c}" for c in given if c not in keys]
        sets += [f"{c}=DEFAULT" if has_default else f"{c}=NULL" for c, has_default in self._columns[table] if c not in given and c not in keys]
        sql = _OR_REPLACE.sub(lambda x: f"INSERT INTO {x.group(1)}({x.group(2)})", sql, count=1)
        return f"{sql} ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {', '.join(sets)}"

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            self._putconn(conn, broken=True)
        with contextlib.suppress(Exception):
            self._pool.close(timeout=2)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
