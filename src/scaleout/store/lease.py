"""Which controller on a PostgreSQL store is active: the one holding a session-level
advisory lock (pg_try_advisory_lock) on a connection of its own, never one from a pool.

The lock lives as long as that connection's session. A controller SIGKILLed closes its
socket and the server ends the session at once; a machine that vanishes is noticed by the
server's TCP keepalives (a few seconds, set for this session below), so a standby's next
poll takes the lock. The holder polls its connection too (a short statement timeout, the
client's keepalives): when it has lost the lock it takes it again if it can, and stops acting
as active at once (the controller exits) if another controller holds it, so there are never
two actives for longer than a poll. A store cut off from everyone (a network outage) leaves
the holder waiting for it, as a lone controller would.

The holder also records the address nodes should dial (``active``), which standbys read
to name it. Blocking calls: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from scaleout.core.errors import StorageError, StoreUnreachable
from scaleout.store.pg import is_url as is_postgres
from scaleout.store.pg import link_failure, redact

log = logging.getLogger("scaleout.lease")

LOCK_KEY = 0x5CA1E0A7  # the advisory lock key of "the active controller" on a store
AWAY_LOG_S = 10.0  # while the store cannot be reached, how often a poller says so again
POLL_S = 1.0  # how often a standby tries the lock and the holder checks it (SCALEOUT_LEASE_POLL_S)
# A lock session idle this long is ended by the server, and the lock with it: the holder uses
# it every poll, so only a frozen holder (SIGSTOP, a hung process on a machine whose kernel
# still answers TCP keepalives) lets it idle; its standby then takes over, and the frozen one,
# resumed, finds the lock taken and stops (fencing refuses what it would write meanwhile).
IDLE_S = 15.0  # SCALEOUT_LEASE_IDLE_S
KEEPALIVE: dict[str, Any] = {  # the client's keepalives: the holder notices a dead network within ~4 s
    "keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1, "keepalives_count": 2, "tcp_user_timeout": 5000, "connect_timeout": 5,
}
# The server's side of the same: it ends the session (and the lock) of a vanished holder.
SESSION_OPTIONS = "-c statement_timeout=5000 -c tcp_keepalives_idle=2 -c tcp_keepalives_interval=1 -c tcp_keepalives_count=2 -c tcp_user_timeout=5000"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS scaleout_active (id INTEGER PRIMARY KEY CHECK (id = 1), url TEXT NOT NULL, since DOUBLE PRECISION NOT NULL);"
    "CREATE TABLE IF NOT EXISTS scaleout_controllers (url TEXT PRIMARY KEY, seen DOUBLE PRECISION NOT NULL)"
)
PEER_TTL_S = 60.0  # a controller not seen for this long is left out of new join tokens


def connect(url: str, *, keepalive: bool = True, idle_s: float | None = None) -> Any:
    """A dedicated autocommit connection to the store (not from a pool); StorageError, as the
    store's own pool says it (store/pg.py), when it cannot be opened. ``idle_s``: the server
    ends the session after that long idle (None: never)."""
    import psycopg

    options = SESSION_OPTIONS + (f" -c idle_session_timeout={max(1, int(idle_s * 1000))}" if idle_s else "")
    try:
        return psycopg.connect(url, autocommit=True, application_name=f"scaleout-lease-{os.getpid()}", options=options, **(KEEPALIVE if keepalive else {}))
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise (StoreUnreachable if link_failure(exc) else StorageError)(reason, "connecting to", f"the PostgreSQL store {redact(url)}") from None


class Lease:
    """The advisory lock of one store, tried and held on a dedicated connection."""

    def __init__(self, url: str, key: int = LOCK_KEY, idle_s: float | None = IDLE_S) -> None:
        self.url = url
        self.key = key
        self.idle_s = idle_s  # see IDLE_S: the poller must use the connection more often than this
        self.held = False
        self._conn: Any = None
        self._away_since: float | None = None  # when trying the lock began to fail (a standby logs that, not every poll)
        self._away_logged = 0.0

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, idle_s=self.idle_s)
            self._conn.execute(SCHEMA)
        return self._conn

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True once held. A connection error is False (retry later)."""
        import psycopg

        if self.held:
            return self.check()
        try:
            (got,) = self._connection().execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except (psycopg.Error, StorageError) as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            now = time.monotonic()
            if self._away_since is None:
                self._away_since = self._away_logged = now
                log.warning("cannot try the store's lock: %s", why)
            elif now - self._away_logged >= AWAY_LOG_S:  # a standby polls every second: a line every 10 s, not each poll
                self._away_logged = now
                log.warning("still cannot try the store's lock after %.0f s: %s", now - self._away_since, why)
            self._drop()
            return False
        if self._away_since is not None:
            log.info("the store answers again after %.1f s: trying its lock", time.monotonic() - self._away_since)
            self._away_since = None
        self.held = bool(got)
        return self.held

    def check(self) -> bool:
        """Whether this holder still holds the lock (its session is alive and has it)."""
        import psycopg

        if not self.held or self._conn is None:
            return False
        try:
            (n,) = self._conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted AND objid = %s",
                (self.key & 0xFFFFFFFF,),
            ).fetchone()
        except psycopg.Error:
            n = 0
        if not n:
            self.held = False
            self._drop()
        return bool(n)

    def retake(self) -> str:
        """After losing the lock: take it again on a new connection. "taken"; "held" (another
        controller has it: this one must stop acting as active); "unreachable" (the store
        cannot be reached: nobody can be sure yet)."""
        import psycopg

        self.held = False
        self._drop()
        try:
            (got,) = self._connection().execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
        except (psycopg.Error, StorageError):
            self._drop()
            return "unreachable"
        self.held = bool(got)
        return "taken" if got else "held"

    def set_active(self, url: str) -> None:
        """Record ``url`` as the active controller's address (the holder does)."""
        import psycopg

        try:
            self._connection().execute(
                "INSERT INTO scaleout_active (id, url, since) VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE SET url = EXCLUDED.url, since = EXCLUDED.since",
                (url, time.time()),
            )
        except psycopg.Error as exc:
            raise StorageError((str(exc).strip().splitlines() or [type(exc).__name__])[0][:300], "recording the active address in", redact(self.url)) from None

    def active(self) -> str | None:
        """The address the holder recorded, or None (none yet, or the store cannot be read)."""
        import psycopg

        try:
            row = self._connection().execute("SELECT url FROM scaleout_active WHERE id = 1").fetchone()
        except (psycopg.Error, StorageError):
            self._drop()
            return None
        return str(row[0]) if row else None

    def peers(self, url: str) -> list[str]:
        """Say that a controller at ``url`` is up, and return the others seen lately (the
        addresses a join token names beside this one's). Empty when the store cannot be read."""
        import psycopg

        now = time.time()
        try:
            conn = self._connection()
            conn.execute(
                "INSERT INTO scaleout_controllers (url, seen) VALUES (%s, %s) ON CONFLICT (url) DO UPDATE SET seen = EXCLUDED.seen", (url, now),
            )
            rows = conn.execute("SELECT url FROM scaleout_controllers WHERE seen > %s AND url <> %s ORDER BY url", (now - PEER_TTL_S, url)).fetchall()
        except (psycopg.Error, StorageError):
            return []
        return [str(r[0]) for r in rows]

    def _drop(self) -> None:
        import psycopg

        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):  # closing a broken connection: nothing to do about it
                self._conn.close()
        self._conn = None

    def close(self) -> None:
        """Let the lock go: unlocked first, as closing the session releases it only once the
        server has noticed (a standby's try right after could still find it held)."""
        import psycopg

        if self.held and self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):  # a broken session: closing it releases the lock
                self._conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        self.held = False
        self._drop()


__all__ = ["IDLE_S", "LOCK_KEY", "POLL_S", "Lease", "connect", "is_postgres"]
