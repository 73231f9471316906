"""A round's fold queue: checked updates wait here and are folded several at a time.

Updates are checked in threads, several at once; the fold into the round's sums is
serialised. Whoever takes the round's lock folds every checked update waiting, up to
``FOLD_BATCH``, in one pass over the sums (`FedAvg.add_many`), so a burst of updates costs
one read and write of the sums per batch, not per update; with slow arrivals each update
is folded alone. The lock is the round's own (its partial is encoded under it), so the
partial never sees half a batch, and each folded update is counted (``on_update``) under it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scaleout.core.errors import UpdateRejected
from scaleout.transport.budget import ByteBudget

log = logging.getLogger(__name__)

FOLD_BATCH = 8  # updates folded in one pass at most: the sums read and written once for 8 (5 bytes a float32 parameter each, not 12)


@dataclass(eq=False)  # compared by identity: the line holds each entry once
class Waiting:
    checked: Any
    weight: float
    client: str
    outcome: asyncio.Future[bool]  # on_update's answer once folded, or why it was refused


class FoldQueue:
    """``fold`` puts a checked update in line and returns once it is in the sums (True when
    that completed the round, as ``on_update`` says), or raises why it was refused."""

    def __init__(
        self, lock: asyncio.Lock, add_many: Callable[[Sequence[tuple[Any, float, str]]], list[UpdateRejected | None]],
        on_update: Callable[[str], bool], current: Callable[[], bool], cap: int = FOLD_BATCH,
    ) -> None:
        self.lock, self.add_many, self.on_update, self.current, self.cap = lock, add_many, on_update, current, cap
        self.waiting: list[Waiting] = []

    async def fold(self, checked: Any, weight: float, client: str) -> bool:
        entry = Waiting(checked, weight, client, asyncio.get_running_loop().create_future())
        entry.outcome.add_done_callback(_seen)
        self.waiting.append(entry)
        try:
            async with self.lock:  # FIFO: when it is ours, every update before this one was taken
                if entry in self.waiting:
                    await self._fold_batch()
        finally:
            if entry in self.waiting:  # cancelled before a fold took it: it never reaches the sums
                self.waiting.remove(entry)
        return await entry.outcome  # settled by the fold that took it

    async def fold_out_of_budget(self, checked: Any, weight: float, client: str, size: int, give_back: Callable[[], None], waiting: ByteBudget) -> bool:
        """``fold`` for an update checked in full and kept in its own file: once ``waiting``
        (the bytes of such updates that may wait for the fold) has room for its ``size``, it
        gives its upload budget back (``give_back``) and waits there, so the next updates are
        pulled meanwhile and whatever waits when the fold is free is folded in one batch."""
        async with waiting.hold(size):
            give_back()
            return await self.fold(checked, weight, client)

    async def _fold_batch(self) -> None:
        batch, self.waiting = self.waiting[: self.cap], self.waiting[self.cap :]
        if not self.current():
            refused = UpdateRejected("the round closed while the update was being checked")
            for entry in batch:
                entry.outcome.set_exception(refused)
            return
        if len(batch) > 1:
            log.debug("folding %d checked updates in one pass", len(batch))
        fold = asyncio.ensure_future(asyncio.to_thread(self.add_many, [(e.checked, e.weight, e.client) for e in batch]))
        fold.add_done_callback(lambda done: self._settle(batch, done))  # each update counted as soon as it is in
        try:
            await asyncio.shield(fold)
        except asyncio.CancelledError:
            # A fold cannot stop half-way: the lock is held until it is whole, so the round's
            # partial is never encoded from half-added sums.
            await fold
            raise

    def _settle(self, batch: list[Waiting], fold: asyncio.Future[list[UpdateRejected | None]]) -> None:
        error = fold.exception() if not fold.cancelled() else asyncio.CancelledError()
        for entry, outcome in zip(batch, fold.result() if error is None else [error] * len(batch), strict=True):
            if outcome is None:
                entry.outcome.set_result(self.on_update(entry.client))
            else:
                entry.outcome.set_exception(outcome)


def _seen(outcome: asyncio.Future[bool]) -> None:
    """An outcome whose waiter was cancelled is not awaited: mark its error as read (no
    "exception was never retrieved" in the log)."""
    if not outcome.cancelled():
        outcome.exception()
