"""A byte budget: at most ``limit`` bytes of payloads held at once, admitted in FIFO order.

A combiner pulls client updates through one, so its memory is bounded by the budget and
not by how many clients finish together; waiting pulls hold nothing (the update stays on
its client) and no link stops reading while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable


class ByteBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[Callable[[], None]]:
        """Hold ``size`` bytes for the block. One request larger than the whole budget is
        admitted alone (when nothing else is held), so it is slow, never stuck. The block
        gets a function that gives the bytes back before it ends (once; the end then does not)."""
        await self._acquire(size)
        held = [size]

        def give_back() -> None:
            if held:
                self._release(held.pop())

        try:
            yield give_back
        finally:
            give_back()

    def _fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    async def _acquire(self, size: int) -> None:
        if not self._waiters and self._fits(size):
            self.used += size
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted just as we were cancelled: give it back
                self._release(size)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def _release(self, size: int) -> None:
        self.used -= size
        self._wake()

    def _wake(self) -> None:
        # FIFO: the head waits until it fits; those behind it wait their turn.
        while self._waiters and self._fits(self._waiters[0][0]):
            size, fut = self._waiters.popleft()
            if not fut.done():
                self.used += size
                fut.set_result(None)
