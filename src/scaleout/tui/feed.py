"""One admin link to the controller, subscribed to its event stream (no Textual here).

``Feed.items()`` yields, in order, a ``Snapshot`` whenever the controller says to resync
(first thing after subscribing, and whenever this side fell behind) and the typed events
that follow it; events already contained in the last snapshot are skipped. ``request``
sends an admin operation on the same link.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from scaleout.commands.connection import Connection
from scaleout.core import messages as m
from scaleout.core.errors import AuthError, ProtocolError, RemoteError

log = logging.getLogger("scaleout.tui")


@dataclass
class Snapshot:
    """What the controller holds as of event ``seq`` (the events.snapshot result)."""

    seq: int
    data: dict[str, Any]


class Feed:
    def __init__(self, conn: Connection, buffer: int = 4096, session_id: str | None = None) -> None:
        self.conn = conn
        self.buffer = buffer
        self.session_id = session_id  # the session a snapshot details (default: the running or latest)
        self.link: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[m.Event | BaseException] = asyncio.Queue()
        self.resyncs = 0

    async def open(self) -> None:
        """Open the feed at the active controller of the connection's addresses (transport/dialer.py)."""
        from scaleout.transport.dialer import Controllers

        await Controllers(self.conn.url).dial(self._open_at)

    async def _open_at(self, url: str) -> None:
        from scaleout.core.errors import Standby
        from scaleout.security.tls import client_context
        from scaleout.transport.link import Incoming
        from scaleout.transport.net import connect

        ctx = None if self.conn.insecure else client_context(self.conn.ca)
        queue: asyncio.Queue[m.Event | BaseException] = asyncio.Queue()
        self._queue = queue  # nothing of an address tried before
        self.link = link = await connect(url, self.conn.token, ctx, max_payload=1 << 40)

        async def handle(inc: Incoming) -> None:
            if isinstance(inc.msg, m.Event):
                queue.put_nowait(inc.msg)

        async def read() -> None:
            from scaleout.transport.link import LinkClosed

            try:
                await link.run(on_message=handle)
            finally:
                queue.put_nowait(LinkClosed(link.peer, "the controller closed the link"))

        self._reader = asyncio.create_task(read())
        try:  # an admin operation first: a token of another role is refused here, in words
            status, _ = await self.request("status", timeout=30)
        except RemoteError as exc:
            await self.close()
            if exc.code == AuthError.code:
                raise AuthError(str(exc)) from None
            raise
        if status.get("role") == "standby":  # it would show nothing: the dialer goes to the active one
            await self.close()
            raise Standby(status.get("active"))
        await self.link.send(m.Subscribe(buffer=self.buffer))

    async def request(self, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None, timeout: float | None = 600) -> tuple[dict[str, Any], bytes | None]:
        return await self.link.request(op, args, blob, timeout=timeout)  # type: ignore[no-any-return]

    async def snapshot(self) -> Snapshot:
        result, _ = await self.request("events.snapshot", {"session_id": self.session_id} if self.session_id else {})
        return Snapshot(int(result.get("seq", 0)), result)

    async def items(self) -> AsyncIterator[Snapshot | m.FedEvent]:
        seen = 0
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            try:
                ev = m.decode_event(item)
            except ProtocolError as exc:  # a newer controller's event: skip it
                log.debug("skipping an event: %s", exc)
                continue
            if isinstance(ev, m.Resync):
                self.resyncs += 1
                snap = await self.snapshot()
                seen = snap.seq
                yield snap
                continue
            if ev.seq <= seen:
                continue  # the snapshot has it already
            yield ev

    async def close(self) -> None:
        if self.link is not None:
            with contextlib.suppress(Exception):  # the edge: closing a link already gone
                await self.link.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
