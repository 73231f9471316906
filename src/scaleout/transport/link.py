"""One websocket link: typed messages, request/reply, chunked payloads with sha256 checks.

A ``Link`` reads frames in one loop. Replies resolve pending requests; payload chunks are
assembled per transfer and verified; every other message is handed, with its payload, to
the role's handler. Requests run as their own tasks so a slow one never stalls the link.
A malformed frame gets an ``error`` message back; too many of them close the link.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.exceptions import ConnectionClosed

from scaleout.core import messages as m
from scaleout.core.errors import ProtocolError, RemoteError, ScaleoutError

log = logging.getLogger("scaleout.transport")

CHUNK_BYTES = 1 << 20
MAX_FRAME_BYTES = CHUNK_BYTES + 4096
DEFAULT_MAX_PAYLOAD = 4 << 30
MAX_BAD_FRAMES = 20
MAX_IN_FLIGHT = 8
PROGRESS_MIN_BYTES = 16 << 20


@dataclass
class Incoming:
    """A message with the payload it refers to (or why that payload was refused)."""

    msg: m.Message
    blob: bytes | None = None
    blob_error: str | None = None


RequestHandler = Callable[[m.Request, bytes | None], Awaitable[tuple[dict[str, Any], bytes | None]]]
MessageHandler = Callable[[Incoming], Awaitable[None]]


class _Transfer:
    def __init__(self, start: m.BlobStart) -> None:
        self.start = start
        self.data = bytearray()
        self.digest = hashlib.sha256()
        self.next_report = start.size // 4


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


class Link:
    """Typed messaging over one websocket connection (either side)."""

    def __init__(self, ws: Any, peer: str, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.ws = ws
        self.peer = peer
        self.max_payload = max_payload
        self.claims: Any = None  # set by the server side after the token check
        self._pending: dict[str, asyncio.Future[m.Reply]] = {}
        self._transfers: dict[str, _Transfer] = {}
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._failed: OrderedDict[str, str] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._bad_frames = 0
        self._counter = 0

    # -- sending ---------------------------------------------------------------------

    def next_id(self) -> str:
        self._counter += 1
        return f"{self._counter:x}"

    async def send(self, msg: m.Message) -> None:
        if not msg.id:
            msg.id = self.next_id()
        await self.ws.send(m.serialize(msg))

    async def send_blob(self, data: bytes, what: str = "payload") -> str:
        """Stream ``data`` in chunks; returns the transfer id to name in a message."""
        transfer = secrets.token_hex(m.TRANSFER_ID_BYTES // 2)
        await self.send(m.BlobStart(transfer=transfer, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
        tag = transfer.encode("ascii")
        view = memoryview(data)
        report = len(data) >= PROGRESS_MIN_BYTES
        for offset in range(0, len(data), CHUNK_BYTES):
            await self.ws.send(tag + view[offset : offset + CHUNK_BYTES])
            if report and (offset // CHUNK_BYTES) % 64 == 63:
                log.info("sending %s to %s: %s of %s", what, self.peer, fmt_bytes(offset + CHUNK_BYTES), fmt_bytes(len(data)))
        return transfer

    async def send_with_blob(self, msg: m.Message, data: bytes | None, what: str = "payload") -> None:
        if data is not None:
            setattr(msg, "blob", await self.send_blob(data, what))
        await self.send(msg)

    async def request(
        self, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None, timeout: float | None = None
    ) -> tuple[dict[str, Any], bytes | None]:
        """Send a request and wait for its reply; raises RemoteError when refused."""
        req = m.Request(op=op, args=args or {}, id=self.next_id())
        fut: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = fut
        try:
            await self.send_with_blob(req, blob)
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(req.id, None)
        if not reply.ok:
            err = reply.error or {}
            raise RemoteError(str(err.get("code", "error")), str(err.get("message", "request failed")))
        blob, blob_error = self._take_blob(reply.blob)
        if blob_error:
            raise ProtocolError(f"reply to {op} from {self.peer}: {blob_error}")
        return reply.result, blob

    # -- receiving -------------------------------------------------------------------

    async def run(self, on_message: MessageHandler | None = None, on_request: RequestHandler | None = None) -> None:
        """Read frames until the connection closes."""
        try:
            async for frame in self.ws:
                try:
                    if isinstance(frame, bytes):
                        self._on_chunk(frame)
                    else:
                        await self._on_text(frame, on_message, on_request)
                except ScaleoutError as exc:
                    await self._complain(exc)
                except Exception:  # the role edge: a bug in one handler must not drop the link
                    log.exception("could not handle a message from %s", self.peer)
                    await self._complain(ProtocolError("internal error while handling the message"))
        except ConnectionClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection to {self.peer} closed"))
            for task in list(self._tasks):
                task.cancel()

    async def _complain(self, exc: ScaleoutError, re: str | None = None) -> None:
        self._bad_frames += 1
        log.warning("bad message from %s: %s", self.peer, exc)
        try:
            await self.send(m.Error(code=exc.code, message=str(exc), re=re))
            if self._bad_frames > MAX_BAD_FRAMES:
                await self.ws.close(1008, "too many malformed messages")
        except ConnectionClosed:
            pass

    async def _on_text(self, text: str, on_message: MessageHandler | None, on_request: RequestHandler | None) -> None:
        msg = m.parse(text)
        if isinstance(msg, m.Reply):
            fut = self._pending.get(msg.re)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if isinstance(msg, m.BlobStart):
            self._on_blob_start(msg)
            return
        if isinstance(msg, m.Error):
            log.warning("%s reported an error: %s", self.peer, msg.message)
            return
        blob, blob_error = self._take_blob(getattr(msg, "blob", None))
        if isinstance(msg, m.Request):
            self._spawn(self._answer(msg, blob, blob_error, on_request))
        elif on_message is not None:
            await on_message(Incoming(msg, blob, blob_error))
        else:
            raise ProtocolError(f"{msg.type} is not accepted on this link")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, req: m.Request, blob: bytes | None, blob_error: str | None, on_request: RequestHandler | None) -> None:
        data: bytes | None = None
        try:
            if blob_error:
                raise ProtocolError(blob_error)
            if on_request is None:
                raise ProtocolError(f"{self.peer} does not take requests here")
            result, data = await on_request(req, blob)
            reply = m.Reply(re=req.id, ok=True, result=result)
        except ScaleoutError as exc:
            reply = m.Reply(re=req.id, ok=False, error={"code": exc.code, "message": str(exc)})
        except asyncio.CancelledError:
            raise
        except Exception:  # the role edge: never let a bug take down the link
            log.exception("request %s from %s failed", req.op, self.peer)
            reply = m.Reply(re=req.id, ok=False, error={"code": "internal", "message": f"internal error while handling {req.op}"})
        try:
            await self.send_with_blob(reply, data)
        except ConnectionClosed:
            pass

    def _on_blob_start(self, start: m.BlobStart) -> None:
        if start.size < 0:
            self._failed[start.transfer] = f"payload size {start.size} is invalid"
            self._trim()
            raise ProtocolError(self._failed[start.transfer])
        if start.size > self.max_payload:
            self._failed[start.transfer] = f"payload of {fmt_bytes(start.size)} exceeds the limit of {fmt_bytes(self.max_payload)}"
            self._trim()
            raise ProtocolError(self._failed[start.transfer])
        if len(self._transfers) >= MAX_IN_FLIGHT:
            raise ProtocolError(f"too many payloads in flight (limit {MAX_IN_FLIGHT})")
        self._transfers[start.transfer] = _Transfer(start)
        if start.size == 0:
            self._finish(start.transfer)

    def _on_chunk(self, frame: bytes) -> None:
        transfer, chunk = m.split_chunk(frame)
        t = self._transfers.get(transfer)
        if t is None:
            if transfer in self._failed:
                return  # the rest of a payload we already refused
            raise ProtocolError(f"payload chunk for unknown transfer {transfer!r}")
        if len(t.data) + len(chunk) > t.start.size:
            del self._transfers[transfer]
            self._failed[transfer] = f"payload is larger than the announced {t.start.size} bytes"
            raise ProtocolError(self._failed[transfer])
        t.data += chunk
        t.digest.update(chunk)
        if t.start.size >= PROGRESS_MIN_BYTES and len(t.data) >= t.next_report and len(t.data) < t.start.size:
            log.info("receiving payload from %s: %s of %s", self.peer, fmt_bytes(len(t.data)), fmt_bytes(t.start.size))
            t.next_report += t.start.size // 4
        if len(t.data) == t.start.size:
            self._finish(transfer)

    def _finish(self, transfer: str) -> None:
        t = self._transfers.pop(transfer)
        actual = t.digest.hexdigest()
        if actual != t.start.sha256:
            self._failed[transfer] = f"payload is corrupt: sha256 {actual[:12]} does not match the announced {t.start.sha256[:12]}"
        else:
            self._blobs[transfer] = bytes(t.data)
        self._trim()

    def _trim(self) -> None:
        # Payloads nobody claimed (a peer that announces and never refers) must not pile up.
        for store in (self._blobs, self._failed):
            while len(store) > MAX_IN_FLIGHT:
                store.popitem(last=False)

    def _take_blob(self, transfer: str | None) -> tuple[bytes | None, str | None]:
        if transfer is None:
            return None, None
        if transfer in self._blobs:
            return self._blobs.pop(transfer), None
        if transfer in self._failed:
            return None, self._failed.pop(transfer)
        if transfer in self._transfers:
            del self._transfers[transfer]
            return None, "payload was referred to before all of it arrived"
        return None, f"message refers to unknown payload {transfer!r}"
