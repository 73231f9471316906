"""Registry and report writes in batches, off the event loop.

Clients join and leave by the thousand, and each sends reports every round; writing each
to ``state.db`` on the event loop made a fleet's worth of joins O(N^2) and stalled rounds.
They are queued here (for nodes, the latest status wins) and written by a worker thread in
one transaction per batch, on its own SQLite connection (WAL lets the controller's
connection read meanwhile). Readers call `flush()` first to see everything queued.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from scaleout.core.errors import StorageError

if TYPE_CHECKING:
    from scaleout.store.state import State

log = logging.getLogger("scaleout.store")
T = TypeVar("T")

FLUSH_S = 0.2  # how long a change may wait before it is written


class RegistryWriter:
    def __init__(self, path: Path | str, outages: Any = None) -> None:
        self.path = path
        self.outages = outages  # a pg.Outages shared with its owner's other connections (store/pg.py)
        self._clients: dict[str, tuple[str, str, float]] = {}  # name -> (status, combiner, when)
        self._combiners: dict[str, tuple[str, int | None, float]] = {}  # name -> (status, clients, when)
        self._offline: dict[str, float] = {}  # combiner -> when all its clients went offline
        self._reports: list[tuple[str, str, int, str, str, str | None, float]] = []
        # A client's last activity (its reports: results, metrics), for LAST SEEN: one row
        # update per client per batch, however often it reports.
        self._seen: dict[str, float] = {}
        self._db: State | None = None
        self._db_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.quarantined = 0  # rows left out because they could not be stored (see _write_each)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def client(self, name: str, status: str, combiner: str) -> None:
        self._clients[name] = (status, combiner, time.time())
        self._wake.set()

    def combiner(self, name: str, status: str, clients: int | None = None) -> None:
        now = time.time()
        self._combiners[name] = (status, clients, now)
        if status == "offline":  # its clients are gone with it (queued joins there become leaves)
            self._offline[name] = now
            self._clients = {k: (("offline", *v[1:]) if v[1] == name else v) for k, v in self._clients.items()}
        self._wake.set()

    def report(self, kind: str, session_id: str, round_index: int, client: str, data: dict[str, object], error: str | None) -> None:
        from scaleout.core.messages import to_json

        now = time.time()
        self._reports.append((kind, session_id, round_index, client, to_json(data), error, now))  # UTF-8, as measured by its limit
        self._seen[client] = now
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._clients) + len(self._combiners) + len(self._offline) + len(self._reports) + len(self._seen)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_S)  # a batching window, not a synchronisation
            try:
                await self.flush()
            except Exception:  # the writer's edge: one failed batch must not stop every later write
                log.exception("could not record registry changes and reports")

    async def flush(self) -> None:
        """Write what is queued now (in a thread) and wait for a write already under way, so
        a read after it sees everything queued before; a full disk is logged, the batch dropped."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        if not self.pending:
            return
        batch = (self._clients, self._combiners, self._offline, self._reports, self._seen)
        self._clients, self._combiners, self._offline, self._reports, self._seen = {}, {}, {}, [], {}
        try:
            try:
                await asyncio.to_thread(self._write, *batch)
            except StorageError:
                raise
            except Exception as exc:  # a row SQLite cannot hold (the batch was rolled back): keep the others
                log.warning("a batch of %d registry changes and reports failed (%s): writing them one by one", sum(len(b) for b in batch), exc)
                await asyncio.to_thread(self._write_each, *batch)
        except StorageError as exc:  # registry rows are refreshed by the next change or start
            log.error("could not record %d registry changes and reports: %s", sum(len(b) for b in batch), exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def read(self, table: str) -> list[dict[str, Any]]:
        """All rows of ``clients`` or ``combiners`` (in a thread: a fleet's worth of rows)."""
        with self._db_lock:
            st = self._open()
            return st.clients() if table == "clients" else st.combiners()

    def reports(self, session_id: str, round_index: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        """A session's reports (in a thread: a round's worth for a fleet is many rows)."""
        with self._db_lock:
            return self._open().reports(session_id, round_index, kind)

    def query(self, read: Callable[[State], T]) -> T:
        """Run ``read`` on this writer's connection (in a thread: a fleet's worth of rows)."""
        with self._db_lock:
            return read(self._open())

    def _open(self) -> State:
        from scaleout.store.state import State

        if self._db is None:
            self._db = State(self.path, outages=self.outages)
        return self._db

    def _write(
        self, clients: dict[str, tuple[str, str, float]], combiners: dict[str, tuple[str, int | None, float]], offline: dict[str, float],
        reports: list[tuple[str, str, int, str, str, str | None, float]], seen: dict[str, float] | None = None,
    ) -> None:
        with self._db_lock:
            st = self._open()
            with st.transaction():
                for name, when in offline.items():
                    st.db.execute("UPDATE clients SET status='offline', last_seen=? WHERE combiner=? AND status='online'", (when, name))
                st.db.executemany(
                    "INSERT INTO clients(name, combiner, status, first_seen, last_seen) VALUES(?, ?, ?, ?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET status=excluded.status, last_seen=excluded.last_seen, combiner=excluded.combiner",
                    [(name, combiner, status, when, when) for name, (status, combiner, when) in clients.items()],
                )
                for name, (status, count, when) in combiners.items():
                    st.db.execute(
                        "INSERT INTO combiners(name, status, clients, first_seen, last_seen) VALUES(?, ?, ?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET status=excluded.status, last_seen=excluded.last_seen, clients=COALESCE(?, clients)",
                        (name, status, count or 0, when, when, count),
                    )
                st.db.executemany(
                    "INSERT INTO reports(kind, session_id, round_index, client, data, error, created) VALUES(?, ?, ?, ?, ?, ?, ?)", reports
                )
                st.db.executemany("UPDATE clients SET last_seen=MAX(last_seen, ?) WHERE name=?", [(when, name) for name, when in (seen or {}).items()])
            self.written += len(clients) + len(combiners) + len(offline) + len(reports)

    def _write_each(
        self, clients: dict[str, tuple[str, str, float]], combiners: dict[str, tuple[str, int | None, float]], offline: dict[str, float],
        reports: list[tuple[str, str, int, str, str, str | None, float]], seen: dict[str, float] | None = None,
    ) -> None:
        """Write a failed batch one row at a time: a row that fails again is quarantined (left
        out, with a log line saying which and why) and every other row is written."""
        rows: list[tuple[str, tuple[Any, ...]]] = [(f"combiner {k} going offline", ({}, {}, {k: v}, [])) for k, v in offline.items()]
        rows += [(f"client {k} {v[0]}", ({k: v}, {}, {}, [])) for k, v in clients.items()]
        rows += [(f"combiner {k} {v[0]}", ({}, {k: v}, {}, [])) for k, v in combiners.items()]
        rows += [(f"{r[0]} report of client {r[3]} (session {r[1]}, round {r[2]!r:.30})", ({}, {}, {}, [r])) for r in reports]
        rows += [(f"last activity of client {k}", ({}, {}, {}, [], {k: v})) for k, v in (seen or {}).items()]
        for what, one in rows:
            try:
                self._write(*one)
            except StorageError:
                raise
            except Exception as exc:
                self.quarantined += 1
                log.error("quarantined the %s: it cannot be stored (%s: %.200s); the other changes are kept", what, type(exc).__name__, exc)
