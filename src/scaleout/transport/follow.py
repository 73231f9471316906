"""Following a session to its end over links that may be lost: the one follower behind
`session start --wait` / `session watch` (commands/admin.py) and the Python API's
``wait_for_session`` (api.py). Each door gives it how to read the session and how to wait
on it; the follower hands on each round once, in order, and dials again when the
controller is lost (stopped, SIGKILLed, a standby taking over)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from scaleout.core.errors import ScaleoutError
from scaleout.transport.dialer import reconnect_s
from scaleout.transport.net import ConnectError, backoff

Session = dict[str, Any]


def ended(r: dict[str, Any]) -> bool:
    """Whether round ``r``'s record is complete: it has ended and its end was recorded (a
    round's model is committed before its validation: until ``finished`` is set, its
    duration, timing and validation are still to come)."""
    return r["status"] != "running" and r.get("finished") is not None


class SessionFollower:
    """Follow session ``key`` (None: the latest) to its end; ``follow()`` returns it.

    ``show(key)``: the session as stored now. ``wait(key, wake)``: the controller's
    session.wait, calling ``wake()`` as each round ends; it returns the session once it ends
    (a session still running: the controller answered as it stopped). Each wake (and the
    start and end) reads the session again, so rounds that ended before we attached come
    first and none is missed or told twice, whenever we attached. ``on_round(round)`` gets
    each round once it has ended, in order, with "session_id".

    A ScaleoutError that ``is_loss`` calls a lost controller is dialled again for up to
    ``reconnect_s(urls())``: ``on_lost(error, seconds)`` once a loss (a loss soon after the
    last, with no round ended in between, is the same one: a controller that answers and
    drops us again is not waited on for ever), ``reset()`` before each try, and
    ``give_up(first error)`` raised when the time is up."""

    def __init__(
        self, key: str | None, *, show: Callable[[str | None], Awaitable[Session]],
        wait: Callable[[str | None, Callable[[], None]], Awaitable[Session]], on_round: Callable[[dict[str, Any]], object],
        urls: Callable[[], tuple[str, ...]], is_loss: Callable[[ScaleoutError], bool],
        on_lost: Callable[[ScaleoutError, float], None], give_up: Callable[[ScaleoutError], BaseException],
        reset: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.key = key
        self.show, self.wait, self.on_round = show, wait, on_round
        self.urls, self.is_loss, self.on_lost, self.give_up, self.reset = urls, is_loss, on_lost, give_up, reset
        self.done = 0  # rounds handed on so far; they are numbered from 1
        self.lost: tuple[ScaleoutError, float, int, Iterator[float]] | None = None  # the loss, when, the rounds done by then, retry delays
        self.attached = 0.0  # when reattach last found the session again

    async def first(self) -> Session:
        """The session as it is, its ended rounds handed on (then ``follow()`` goes on)."""
        session = await self.catch_up()
        self.key = session["id"]
        return session

    async def follow(self, session: Session | None = None, *, patient_start: bool = False) -> Session:
        """Follow the session to its end (from ``first()``'s answer, if given) and return it.
        ``patient_start``: a controller lost at the first read is dialled again as later."""
        if session is None:
            try:
                session = await self.first()
            except ScaleoutError as exc:
                if not (patient_start and self.key is not None and self.is_loss(exc)):
                    raise
                session = await self._reattach(exc)
        while session["status"] == "running":
            try:
                session = await self._until_end()
            except ScaleoutError as exc:
                if not self.is_loss(exc):
                    raise
                session = await self._reattach(exc)
        return session

    async def catch_up(self, session: Session | None = None) -> Session:
        """Hand on the rounds of ``session`` (default: read now) that ended since the last."""
        if session is None:
            session = await self.show(self.key)
        for r in session["rounds"]:
            if not ended(r):
                break
            if r["idx"] > self.done:
                self.on_round({"session_id": session["id"], **r})
                self.done = r["idx"]
        return session

    async def _until_end(self) -> Session:
        """Follow the running session on one wait until it ends."""
        woke = asyncio.Event()
        waiting = asyncio.ensure_future(self.wait(self.key, woke.set))
        try:
            while not waiting.done():
                woken = asyncio.ensure_future(woke.wait())
                await asyncio.wait({waiting, woken}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if woke.is_set():
                    woke.clear()
                    await self.catch_up()
            final = waiting.result()
            if final["status"] == "running":  # answered as the controller stopped: the session goes on after it
                raise ConnectError("the controller answered before the session ended")
            try:
                return await self.catch_up()
            except ScaleoutError as exc:  # the controller ended as the session did: what it told us will do
                if not self.is_loss(exc):
                    raise
                return await self.catch_up(final)
        finally:
            waiting.cancel()

    async def _reattach(self, exc: ScaleoutError) -> Session:
        """The session again, from whichever controller is active now, within reconnect_s of losing it."""
        loop = asyncio.get_running_loop()
        patience = reconnect_s(self.urls())
        retry = self.lost is not None and self.lost[2] == self.done and loop.time() - self.attached < patience
        if not retry:
            self.lost = (exc, loop.time(), self.done, backoff(0.1, 1.0))
            self.on_lost(exc, patience)
        assert self.lost is not None
        first, since, _, delays = self.lost
        while True:
            if retry:
                left = since + patience - loop.time()
                if left <= 0:
                    raise self.give_up(first)
                await asyncio.sleep(min(next(delays), left))  # a controller starting or taking over: nothing to wait on
            retry = True
            if self.reset is not None:
                await self.reset()
            try:  # within what is left: a controller that is stopping may take a link and never answer
                session = await asyncio.wait_for(self.catch_up(), max(since + patience - loop.time(), 1.0))
                self.attached = loop.time()
                return session
            except TimeoutError:
                pass
            except ScaleoutError as again:
                if not self.is_loss(again):
                    raise
