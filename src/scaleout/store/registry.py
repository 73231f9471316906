"""Registry writes in batches, off the event loop.

Clients join and leave by the thousand; writing each change to ``state.db`` on the event
loop made a fleet's worth of joins O(N^2) and stalled rounds. Changes are queued here
(the latest status of a node wins) and written by a worker thread in one transaction per
batch, on its own SQLite connection (WAL lets the controller's connection read meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from scaleout.core.errors import StorageError

if TYPE_CHECKING:
    from scaleout.store.state import State

log = logging.getLogger("scaleout.store")

FLUSH_S = 0.2  # how long a change may wait before it is written


class RegistryWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._clients: dict[str, tuple[str, str, float]] = {}  # name -> (status, combiner, when)
        self._combiners: dict[str, tuple[str, int | None, float]] = {}  # name -> (status, clients, when)
        self._offline: dict[str, float] = {}  # combiner -> when all its clients went offline
        self._db: State | None = None
        self._db_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def client(self, name: str, status: str, combiner: str) -> None:
        self._clients[name] = (status, combiner, time.time())
        self._wake.set()

    def combiner(self, name: str, status: str, clients: int | None = None) -> None:
        now = time.time()
        self._combiners[name] = (status, clients, now)
        if status == "offline":  # its clients are gone with it
            self._offline[name] = now
            self._clients = {k: v for k, v in self._clients.items() if v[1] != name}
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._clients) + len(self._combiners) + len(self._offline)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(FLUSH_S)  # a batching window, not a synchronisation
            await self.flush()

    async def flush(self) -> None:
        """Write what is queued now (in a thread); a full disk is logged, the batch dropped."""
        if not self.pending:
            return
        batch = (self._clients, self._combiners, self._offline)
        self._clients, self._combiners, self._offline = {}, {}, {}
        try:
            await asyncio.to_thread(self._write, *batch)
        except StorageError as exc:  # registry rows are refreshed by the next change or start
            log.error("could not record %d registry changes: %s", len(batch[0]) + len(batch[1]) + len(batch[2]), exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def read(self, table: str) -> list[dict[str, object]]:
        """All rows of ``clients`` or ``combiners`` (in a thread: a fleet's worth of rows)."""
        with self._db_lock:
            st = self._open()
            return st.clients() if table == "clients" else st.combiners()

    def _open(self) -> State:
        from scaleout.store.state import State

        if self._db is None:
            self._db = State(self.path)
        return self._db

    def _write(self, clients: dict[str, tuple[str, str, float]], combiners: dict[str, tuple[str, int | None, float]], offline: dict[str, float]) -> None:
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
            self.written += len(clients) + len(combiners) + len(offline)
