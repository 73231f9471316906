"""Client updates spilled to disk for a strategy that needs each one on its own
(``needs_updates``): the controller writes each update to a file as it is pulled (one in
memory at a time), then hands them all to ``Strategy.aggregate`` memory-mapped read-only,
so its memory stays near one model however many clients take part.

Files live under ``<data dir>/spill/<session>/<round>-<try>/``; a round's folder is
removed when the round commits or fails, and the whole ``spill`` folder at the
controller's start (what a kill mid-round leaves). Every method here does file I/O: call
them in a thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scaleout.core import payload
from scaleout.core.aggregators.strategy import ClientUpdate
from scaleout.core.errors import PayloadError, StorageError, UpdateRejected

SPILL = "spill"


@dataclass
class Spilled:
    combiner: str
    client: str
    path: Path
    num_examples: int
    metadata: dict[str, Any]


@dataclass
class Spill:
    """One round's spilled updates."""

    folder: Path
    template: Mapping[str, payload.TensorSpec]
    entries: dict[str, Spilled] = field(default_factory=dict)  # client -> its file

    def clients_of(self, combiner: str) -> list[str]:
        return sorted(e.client for e in self.entries.values() if e.combiner == combiner)

    def add(self, combiner: str, client: str, num_examples: int, metadata: dict[str, Any], data: bytes) -> None:
        """Check an update against the round's model (tensors, dtypes, shapes exactly; values
        finite and in range) and write it to its file; refused, nothing is written."""
        if client in self.entries:
            raise UpdateRejected(f"a second update from {client} in this round")
        if payload.describe(data) != dict(self.template):
            raise PayloadError("the forwarded update does not have the model's tensors, dtypes and shapes")
        payload.check_values(dict(self.template), payload.views(data))
        path = self.folder / f"{len(self.entries):06d}.safetensors"
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
                fh.write(data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise StorageError(exc.strerror or str(exc), "spilling a client's update", str(path), exc.errno) from None
        self.entries[client] = Spilled(combiner, client, path, num_examples, metadata)

    @contextlib.contextmanager
    def updates(self, clients: set[str] | None = None) -> Iterator[list[ClientUpdate]]:
        """The spilled updates (of ``clients``, or all), memory-mapped read-only (one mapping
        per file), in the order they arrived; the mappings go when the caller drops the arrays."""
        maps: list[mmap.mmap] = []
        out: list[ClientUpdate] = []
        last: list[mmap.mmap] = []  # the mapping read last, shared by the updates' _Mapped
        try:
            for e in self.entries.values():
                if clients is not None and e.client not in clients:
                    continue
                with open(e.path, "rb") as fh:
                    mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                maps.append(mm)
                views = payload.views(memoryview(mm))  # type: ignore[arg-type]  # read-only, no copy
                mm.madvise(mmap.MADV_DONTNEED)  # the header's pages: read, not needed any more
                out.append(ClientUpdate(e.client, _Mapped(mm, views, last), e.num_examples, e.metadata))
            yield out
        finally:
            out.clear()
            last.clear()
            for mm in maps:
                with contextlib.suppress(BufferError):  # an array still points into it: it goes with that array
                    mm.close()

    def remove(self) -> None:
        sweep(self.folder)


class _Mapped(Mapping[str, np.ndarray]):
    """An update's tensors, memory-mapped. A lookup in another update than the one looked up
    last drops the pages that one had mapped (MADV_DONTNEED: clean file pages, read again
    from the page cache if touched again), so the file pages in the controller's RSS stay
    about one update's, not one per update: an aggregator reading a block of each update in
    turn would otherwise keep a page folio (up to 2 MiB) of every file mapped. Dropping is
    always safe; an aggregator that reads two updates at once only reads some pages twice."""

    def __init__(self, mm: mmap.mmap, views: dict[str, np.ndarray], last: list[mmap.mmap]) -> None:
        self._mm = mm
        self._views = views
        self._last = last

    def __getitem__(self, name: str) -> np.ndarray:
        if self._last and self._last[0] is not self._mm:
            self._last[0].madvise(mmap.MADV_DONTNEED)
        self._last[:] = [self._mm]
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


def sweep(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
