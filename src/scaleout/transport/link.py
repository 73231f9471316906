"""One websocket link: typed messages, request/reply, chunked payloads with sha256 checks.

A ``Link`` reads frames in one loop. Replies resolve pending requests; payload chunks are
assembled per transfer and verified; every other message is handed, with its payload, to
the role's handler. Requests run as their own tasks so a slow one never stalls the link.
A malformed frame gets an ``error`` message back; too many of them close the link.

Sending and requesting raise only ScaleoutErrors of their own, so callers need not know
about websockets or asyncio timeouts:

    ScaleoutError
     ├── LinkClosed       the connection closed before a send or a reply completed
     └── RequestTimeout   no reply within the request's timeout

Each link bounds what a peer can make it hold: at most ``max_in_flight`` payloads being
received plus as many received but not yet claimed, each at most ``max_payload`` bytes;
all of it is let go when the link closes. A peer that keeps sending malformed frames is
cut off at once (it gets the close frame, not the closing handshake's 10 s). Error texts
sent to a peer that is not an admin carry no absolute paths (``scrub``).

A peer that stops reading cannot pin memory or stall the role: it may have at most
``max_requests`` requests unanswered (one more closes the link), at most ``max_queued``
bytes may wait to be written to it, and a frame it does not take within ``send_timeout``
seconds drops the connection (the caller gets LinkClosed, never an endless wait).

Nothing here hashes or copies a whole payload on the event loop: received chunks are copied
into place and hashed in the loop's default executor (one job at a time per transfer, so in
order), and a payload to send is hashed there (when its digest is not given). Its frames are
written as views of it (a header, the transfer tag, the chunk): the first copy of a chunk is
the one TLS makes as it encrypts it. hashlib releases the GIL on large buffers, so hashing
runs beside the loop.

A payload can be passed on while it still arrives (``Tap``: a combiner relays the round's
model to its clients): sends read its file's mapping as it fills, and its last chunk only once
it matched its digest; a sender that cannot finish a payload says so (``blob.abort``) and the
receiver drops what it got.
"""

from __future__ import annotations

import asyncio
import json
import hashlib
import io
import logging
import mmap
import os
import re
import secrets
import struct
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from websockets.exceptions import ConnectionClosed
from websockets.frames import apply_mask
from websockets.protocol import CLIENT

from scaleout.core import messages as m
from scaleout.core.errors import PayloadError, ProtocolError, RemoteError, ScaleoutError
from scaleout.core.limits import clip_text
from scaleout.core.units import fmt_bytes
from scaleout.transport.budget import ByteBudget

log = logging.getLogger("scaleout.transport")

CHUNK_BYTES = 1 << 20
MAX_FRAME_BYTES = CHUNK_BYTES + 4096
DEFAULT_MAX_PAYLOAD = 4 << 30
MAX_BAD_FRAMES = 20
TRIM_AFTER_BYTES = 4 << 20  # a link that read this much returns freed memory to the system as it closes
ABORT_CLOSE_S = 0.1  # a peer we cut off gets this long to take the close frame, then TCP is dropped
CLOSE_POLICY = 1008  # websocket close code: policy violation
_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"]+/)*([^\s/'\"]+)")
MAX_IN_FLIGHT = 8
MAX_FAILED = 8  # refused transfers remembered, so their remaining chunks are dropped quietly
PROGRESS_MIN_BYTES = 16 << 20  # payloads this large log their progress
INLINE_BYTES = 256 << 10  # payloads up to this size are hashed on the loop: a thread hop costs more
LANDING_BYTES = 1 << 20  # a chunk written, hashed and checked this much at a time (Link.landing): in cache, with little Python per byte
QUEUED_CHUNKS = 2  # chunks of one transfer waiting for its worker before the reader waits for it
MAX_REQUESTS = 256  # requests from the peer unanswered at once; one more closes the link
MAX_QUEUED_BYTES = 64 << 20  # bytes waiting to be written to the peer; more closes the link
SEND_TIMEOUT_S = 30.0  # a frame the peer has not taken by then drops the connection
WRITE_CHECK_S = 1.0  # how often a link looks at what waits in its transport's write buffer

Progress = Callable[[int, int], None]
"""Told ``(bytes done, total bytes)`` as a payload moves: first ``(0, total)``, then per chunk."""


class LinkClosed(ScaleoutError):
    """The connection closed before a send or a reply completed."""

    code = "link_closed"

    def __init__(self, peer: str, reason: str = "") -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"connection to {peer} closed" + (f" ({reason})" if reason else ""))


class RequestTimeout(ScaleoutError):
    """The peer did not answer a request in time."""

    code = "timeout"

    def __init__(self, peer: str, op: str, timeout: float) -> None:
        self.peer = peer
        self.op = op
        self.timeout = timeout
        super().__init__(f"{peer} did not answer {op} within {timeout:g} s")


@dataclass
class Incoming:
    """A message with the payload it refers to (or why that payload was refused)."""

    msg: m.Message
    blob: bytes | None = None
    blob_error: str | None = None
    sha256: str | None = None  # the payload's digest, as the link checked it on receipt: no need to hash it again

    def take_blob(self) -> bytes | None:
        """Hand the payload over: this Incoming forgets it, so it is freed once the taker is done."""
        blob, self.blob = self.blob, None
        return blob


class Pieces:
    """A payload as the buffers it is made of, in order (a header, then views of arrays),
    sent as they are, never joined into one bytes object; ``len()`` is its size in bytes."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
        self.size = sum(v.nbytes for v in self.parts)

    def __len__(self) -> int:
        return self.size

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for part in self.parts:
            digest.update(part)
        return digest.hexdigest()


@dataclass(frozen=True)
class Hashed:
    """A reply payload whose sha256 the handler already knows (a model's id is its hash),
    so the link does not hash it again for every peer that asks."""

    data: bytes | Pieces
    sha256: str


class Tap:
    """A payload passed on while it still arrives (a combiner relays the round's model to its
    clients as it comes from the controller). ``Link.tap(tap)``: the next payload announced
    with digest ``sha256`` (larger than INLINE_BYTES) is written to a file mapped as ``data``
    from the start, and each stretch written is told here; ``chunks()`` yields views of it as
    they land, one mapping for every reader (no copy per peer). The last chunk comes only once
    the whole payload matched ``sha256``, so a peer it is relayed to never holds it whole
    unchecked. ``fail()`` ends it (the request for it failed): every reader stops with
    PayloadError. ``complete(data)`` hands over a payload that was not tapped (a small one)."""

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256
        self.size = 0
        self.data: Any = None  # the mapping of its file, once it started (or the payload, complete())
        self.ready = 0  # bytes written to it
        self.checked = False  # all of it arrived and matched sha256
        self.error: str | None = None
        self._change: asyncio.Future[None] | None = None  # set (and replaced) at each change

    def __len__(self) -> int:
        return self.size

    def _changed(self) -> None:
        if self._change is not None and not self._change.done():
            self._change.set_result(None)
        self._change = None

    def _open(self, size: int, data: Any) -> None:
        self.size, self.data = size, data
        self._changed()

    def _arrived(self, ready: int) -> None:
        self.ready = ready
        self._changed()

    def complete(self, data: Any) -> None:
        """All of it checked: ``data`` is the payload (when nothing was tapped, all of it now)."""
        if self.data is None:
            self.size, self.data = len(data), data
        if self.error is None:
            self.ready, self.checked = self.size, True
        self._changed()

    def fail(self, reason: str) -> None:
        if self.error is None and not self.checked:
            self.error = reason
        self._changed()

    async def _until(self, ready: Callable[[], bool]) -> None:
        while True:
            if self.error is not None:
                raise PayloadError(self.error)
            if ready():
                return
            if self._change is None:
                self._change = asyncio.get_running_loop().create_future()
            await asyncio.wait((self._change,))  # not awaited itself: a reader cancelled must not cancel the others' wait

    async def opened(self) -> None:
        """Wait until its size is known (it started arriving, or was completed)."""
        await self._until(lambda: self.data is not None)

    async def chunks(self) -> AsyncIterator[memoryview]:
        await self.opened()
        view = memoryview(self.data).cast("B")
        for offset in range(0, self.size, CHUNK_BYTES):
            end = min(offset + CHUNK_BYTES, self.size)
            await self._until(lambda: self.ready >= end and (end < self.size or self.checked))
            yield view[offset:end]


RequestHandler = Callable[[m.Request, bytes | None], Awaitable[tuple[dict[str, Any], "bytes | Hashed | None"]]]
MessageHandler = Callable[[Incoming], Awaitable[None]]


class _Transfer:
    """One payload being received, written in place into a buffer of its announced size.

    ``BytesIO(bytes(size))`` owns a zero-filled bytes object (calloc'd, so pages are only
    committed as chunks land); chunks are written into it through ``getbuffer()`` and, once
    that view is released, ``getvalue()`` hands that same object out, so the payload is
    never copied after its chunks arrive.

    Copying and hashing run in the loop's default executor, one batch of chunks at a time
    per transfer, so the digest sees them in order. ``pending`` counts chunks not yet
    absorbed; the reader waits while more than ``QUEUED_CHUNKS`` are, so a transfer holds
    its buffer plus a few frames. A payload of at most ``INLINE_BYTES`` is absorbed at once.
    With ``to_file``, a larger one goes to an unnamed temporary file instead (pwrite, in the
    worker: only the page cache holds it) and is handed over as a read-only mapping of it.
    """

    def __init__(self, start: m.BlobStart, writable: bool = False, to_file: bool = False, tap: Tap | None = None) -> None:
        self.start = start
        self.tap = tap  # told each stretch written to the file (mapped from the start), and the verdict
        self.inline = start.size <= INLINE_BYTES
        # A writable payload is a bytearray (an anonymous mapping when large) handed over as it is: its taker may use it in place.
        # One to a file is written there (pwrite, in the worker) and handed over mapped read-only.
        self.buffer: io.BytesIO | bytearray | mmap.mmap | None = None
        self.file: Any = None
        self.view: memoryview | int
        if to_file and not self.inline:
            self.file = tempfile.TemporaryFile(prefix="scaleout-payload-")  # noqa: SIM115  # unnamed: gone with its last mapping; closed by value()
            self.view = self.file.fileno()
            if tap is not None:  # mapped now, at its full size: readers see each stretch as it is written
                os.ftruncate(self.file.fileno(), start.size)
                tap._open(start.size, mmap.mmap(self.file.fileno(), start.size, access=mmap.ACCESS_READ))
        elif writable and not self.inline:
            # Anonymous pages, zero until written: ``bytearray(size)`` would zero-fill all of
            # it on the event loop first (~5% of the controller's CPU taking 100 MB partials).
            self.buffer = mmap.mmap(-1, start.size)
            self.view = memoryview(self.buffer)
        elif writable:
            self.buffer = bytearray(start.size)
            self.view = memoryview(self.buffer)
        else:
            self.buffer = io.BytesIO(bytes(start.size))
            self.view = self.buffer.getbuffer()
        self.digest = hashlib.sha256()
        self.received = 0  # bytes that arrived
        self.handed = 0  # bytes given to a worker (or absorbed inline): the next chunk goes here
        self.queue: list[memoryview] = []
        self.pending = 0  # chunks arrived and not yet absorbed
        self.worker: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.next_report = start.size // 4
        self.landing: Any = None  # fed each chunk after it is hashed (Link.landing)

    def add(self, chunk: memoryview) -> None:
        self.received += len(chunk)
        if self.inline:
            _absorb(self.view, self.digest, self.handed, [chunk])
            self.handed += len(chunk)
        elif self.error is None:  # after a failure the rest is only counted: it will be refused
            self.queue.append(chunk)
            self.pending += 1
            if self.worker is None:
                self._hand_over()

    def _hand_over(self) -> None:
        batch, self.queue = self.queue, []
        offset, self.handed = self.handed, self.handed + sum(len(c) for c in batch)
        count = len(batch)
        worker = asyncio.get_running_loop().run_in_executor(None, _absorb, self.view, self.digest, offset, batch, self.landing)
        worker.add_done_callback(lambda fut: self._absorbed(fut, count))
        self.worker = worker

    def _absorbed(self, worker: asyncio.Future[None], count: int) -> None:
        self.worker = None
        self.pending -= count
        self.error = asyncio.CancelledError() if worker.cancelled() else worker.exception()
        if self.error is not None:
            self.pending -= len(self.queue)
            self.queue.clear()
            return
        if self.tap is not None:  # every byte handed over before the queue is written now
            self.tap._arrived(self.handed)
        if self.queue:
            self._hand_over()

    async def settle(self, most: int) -> None:
        """Wait until at most ``most`` chunks are still to be absorbed (or the worker failed)."""
        while self.pending > most and self.worker is not None:
            await asyncio.wait({self.worker})

    def value(self) -> bytes:
        if self.file is not None:  # every chunk written (settle(0)): no worker holds its descriptor
            with self.file:
                if self.tap is not None:
                    return self.tap.data  # type: ignore[no-any-return]  # the mapping its readers read
                return mmap.mmap(self.file.fileno(), self.start.size, access=mmap.ACCESS_READ)  # type: ignore[return-value]  # bytes-like
        assert isinstance(self.view, memoryview) and self.buffer is not None
        self.view.release()
        if isinstance(self.buffer, bytearray | mmap.mmap):
            return self.buffer  # type: ignore[return-value]  # bytes-like to every taker; writable for one that asked
        data = self.buffer.getvalue()
        self.buffer.close()
        return data


def _absorb(view: memoryview | int, digest: Any, offset: int, chunks: list[memoryview], landing: Any = None) -> None:
    """Copy ``chunks`` into ``view`` (or write them to the file descriptor ``view``) from
    ``offset`` on and hash them, in order (in a worker thread); ``landing`` (a file's only)
    is fed each piece of LANDING_BYTES right after it is written and hashed, while in cache."""
    for chunk in chunks:
        end = offset + len(chunk)
        if isinstance(view, int):
            step = LANDING_BYTES if landing is not None else len(chunk) or 1
            for at in range(0, len(chunk), step):
                piece = chunk[at : at + step]
                done = 0
                while done < len(piece):  # a full disk raises OSError here: the payload is refused, not the process
                    done += os.pwrite(view, piece[done:], offset + at + done)
                digest.update(piece)
                if landing is not None:
                    landing.feed(offset + at, piece)
        else:
            view[offset:end] = chunk
            digest.update(chunk)
        offset = end


async def _chunks_of(data: bytes | Pieces | Tap) -> AsyncIterator[memoryview]:
    """_chunks of ``data``; of a Tap, as they arrive."""
    if isinstance(data, Tap):
        async for chunk in data.chunks():
            yield chunk
    else:
        for chunk in _chunks(data):
            yield chunk


def _sha256(data: bytes | Pieces) -> str:
    return data.sha256() if isinstance(data, Pieces) else hashlib.sha256(data).hexdigest()


def _binary_frame(parts: tuple[bytes, memoryview], masked: bool) -> list[bytes | memoryview]:
    """The pieces of one websocket binary frame carrying ``parts`` (a transfer tag, then a
    chunk), written as they are: the chunk is a view of the payload, never copied here (a
    client's frames are masked, which copies once; the tag's length is a multiple of 4, so
    tag and chunk are masked with the same key apart)."""
    length = sum(len(p) for p in parts)
    bit = 0x80 if masked else 0
    if length < 126:
        head = struct.pack("!BB", 0x82, bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x82, bit | 126, length)
    else:
        head = struct.pack("!BBQ", 0x82, bit | 127, length)
    if not masked:
        return [head, *[p for p in parts if len(p)]]
    key = secrets.token_bytes(4)
    return [head + key, *[apply_mask(p, key) for p in parts if len(p)]]


def _chunks(data: bytes | Pieces) -> Iterator[memoryview]:
    """Views of ``data`` of at most CHUNK_BYTES each, in order (a frame never spans two pieces)."""
    for part in data.parts if isinstance(data, Pieces) else [memoryview(data)]:
        for offset in range(0, len(part), CHUNK_BYTES):
            yield part[offset : offset + CHUNK_BYTES]


class Link:
    """Typed messaging over one websocket connection (either side)."""

    def __init__(
        self, ws: Any, peer: str, *, max_payload: int = DEFAULT_MAX_PAYLOAD, max_in_flight: int = MAX_IN_FLIGHT,
        send_timeout: float = SEND_TIMEOUT_S, max_requests: int = MAX_REQUESTS, max_queued: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.ws = ws
        self.peer = peer
        # Both limits may be changed while the link runs; they apply to the next payload.
        self.max_payload = max_payload
        self.max_in_flight = max_in_flight
        # What a peer that stops reading may cost us (see the module docstring).
        self.send_timeout = send_timeout
        self.max_requests = max_requests
        self.max_queued = max_queued
        self._queued = 0  # bytes of frames handed to the websocket and not yet taken by the peer
        self.cut_reason = ""  # why we dropped the connection ourselves, if we did
        self._over_requests = False
        self.claims: Any = None  # set by the server side after the token check
        # Raises (AuthError) for a request this peer may not make: checked before anything else.
        self.authorize: Callable[[m.Request], None] | None = None
        # Set: every payload is dropped unread, without a word (a standby's link): the request
        # that names it gets the answer, from authorize, and a refusal of the payload first
        # would only be a confusing warning at the caller.
        self.drop_payloads = False
        # Told the progress of every payload arriving on this link, instead of the log lines;
        # meant for a link that makes one request at a time (the CLI's), where that is its reply.
        self.receive_progress: Progress | None = None
        # Payloads that start arriving while this is set are handed over writable (a bytearray,
        # not bytes): a taker that keeps one may then work in it in place instead of copying it
        # (the controller folds a combiner's partial into the round's sums that way).
        self.writable_payloads = False
        # Payloads larger than INLINE_BYTES that start arriving while this is set are written to
        # an unnamed temporary file as they arrive and handed over as a read-only mapping of it
        # (bytes-like), so this process holds frames, not the payload (a combiner's updates).
        self.file_payloads = False
        # Given to the next payload written to a file whose size is this checker's ``size``
        # (then cleared): it is fed each chunk in order right after the chunk is hashed, while
        # it is in cache (a combiner checks an update's values as it lands: core/aggregators/landing.py).
        self.landing: Any = None
        self.received_bytes = 0  # payload bytes that arrived on this link: a pull's sign of life
        self.received_at = 0.0  # loop time payload bytes last arrived
        self.closed = False  # set when run() returns: no reply can arrive any more
        self._pending: dict[str, asyncio.Future[m.Reply]] = {}
        self._transfers: dict[str, _Transfer] = {}
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._digests: dict[str, str] = {}  # transfer -> the sha256 its payload in _blobs was checked against
        self._failed: OrderedDict[str, str] = OrderedDict()
        self._taps: dict[str, Tap] = {}  # sha256 -> a tap for the next payload announced with it
        self._tasks: set[asyncio.Task[None]] = set()
        self._bad_frames = 0
        self._counter = 0
        self.last_frame = 0.0  # loop time a frame last arrived: see watch()
        self._frame_bytes = 0  # binary frames read: memory to give back when the link closes
        self._write_last = 0  # the write buffer's size at the last look (_check_writes)
        self._write_since = 0.0  # loop time the peer last took bytes, or none waited

    # -- sending ---------------------------------------------------------------------

    def next_id(self) -> str:
        self._counter += 1
        return f"{self._counter:x}"

    async def _send_frame(self, frame: str | bytes | tuple[bytes, memoryview]) -> None:
        """Write one frame; a peer that does not take it within ``send_timeout``, or that lets
        more than ``max_queued`` bytes pile up, is dropped (LinkClosed, for every sender).
        A (tag, chunk) pair goes out as one binary frame without being joined (_write_parts)."""
        if self.cut_reason:
            raise LinkClosed(self.peer, self.cut_reason)
        size = sum(map(len, frame)) if isinstance(frame, tuple) else len(frame)
        self._queued += size
        try:
            if self._queued > self.max_queued:
                self.cut(f"{fmt_bytes(self._queued)} waiting for a peer that does not read (limit {fmt_bytes(self.max_queued)})")
                raise LinkClosed(self.peer, self.cut_reason)
            async with asyncio.timeout(self.send_timeout):
                if not isinstance(frame, tuple):
                    await self.ws.send(frame)
                elif not await self._write_parts(frame):
                    await self.ws.send(b"".join(frame))
        except TimeoutError:  # asyncio's, since 3.11 the builtin
            self.cut(f"the peer took nothing for {self.send_timeout:g} s")
            raise LinkClosed(self.peer, self.cut_reason) from None
        except ConnectionClosed as exc:
            raise LinkClosed(self.peer, self.cut_reason or str(exc)) from None
        finally:
            self._queued -= size

    async def _write_parts(self, parts: tuple[bytes, memoryview]) -> bool:
        """Write a binary frame straight to the transport, header then the parts as views:
        websockets' own ``send`` would join them and copy the frame twice more (a BytesIO and
        its value), 3 GB of copies on the loop for a 1 GB model sent to 10 clients. Its
        ``send_context`` still checks the state, writes and waits for the buffer to drain.
        False when the connection is not a websockets asyncio one, or (never, as the link
        sends whole messages) a fragmented message is under way: the caller lets websockets
        send them joined, which says what is wrong."""
        ws = self.ws
        protocol: Any = getattr(ws, "protocol", None)
        if not hasattr(ws, "send_context") or not isinstance(getattr(protocol, "writes", None), list) or protocol.expect_continuation_frame:
            return False
        async with ws.send_context():
            protocol.writes.extend(_binary_frame(parts, masked=protocol.side is CLIENT))
        return True

    def cut(self, reason: str) -> None:
        """Drop the connection now, without a closing handshake (a peer that does not read
        would never take the close frame): every send and pending request ends LinkClosed."""
        if self.cut_reason:
            return
        self.cut_reason = reason
        log.warning("dropping the link to %s: %s", self.peer, reason)
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def send(self, msg: m.Message) -> None:
        """Send one message; raises LinkClosed when the connection is gone."""
        if not msg.id:
            msg.id = self.next_id()
        await self._send_frame(m.serialize(msg))

    async def send_blob(
        self, data: bytes | Pieces | Tap, what: str = "payload", sha256: str | None = None, progress: Progress | None = None,
        budget: ByteBudget | None = None,
    ) -> str:
        """Stream ``data`` in chunks; returns the transfer id to name in a message.

        ``sha256`` is the hex digest of ``data`` when the caller knows it already (a model
        id is one), so sending the same model to many peers hashes it once, not per peer.
        ``progress`` is told the bytes sent so far; without it a large payload logs them.
        ``budget``, shared by the sends of one payload to many peers, bounds the bytes of
        frames being written to all of them at once: each frame holds its size from the
        moment it is written until the peer's socket has taken it, so a peer that stops
        reading holds one frame of it, never a slot the others wait for.

        A ``Tap`` is sent as it arrives (its digest announced); if it fails on the way, the
        peer is told to drop what it got (BlobAbort) and PayloadError is raised.
        """
        transfer = secrets.token_hex(m.TRANSFER_ID_BYTES // 2)
        if isinstance(data, Tap):
            await data.opened()
            sha256 = data.sha256
        size = len(data)
        inline = size <= INLINE_BYTES
        loop = asyncio.get_running_loop()
        if progress is not None:
            progress(0, size)
        if sha256 is None:
            assert not isinstance(data, Tap)
            sha256 = _sha256(data) if inline else await loop.run_in_executor(None, _sha256, data)
        await self.send(m.BlobStart(transfer=transfer, size=size, sha256=sha256))
        tag = transfer.encode("ascii")
        report = progress is None and size >= PROGRESS_MIN_BYTES
        sent = 0
        # Each frame is the tag and a view of ``data``: nothing is copied before TLS encrypts it.
        try:
            async for chunk in _chunks_of(data):
                if budget is None:
                    await self._send_frame((tag, chunk))
                else:
                    async with budget.hold(len(chunk)):
                        await self._send_frame((tag, chunk))
                sent += len(chunk)
                if progress is not None:
                    progress(sent, size)
                elif report and sent % (64 * CHUNK_BYTES) == 0 and sent < size:
                    log.info("sending %s to %s: %s of %s", what, self.peer, fmt_bytes(sent), fmt_bytes(size))
        except PayloadError as exc:  # a tap that failed on the way: the peer drops what it got
            await self.abort_blob(transfer, str(exc))
            raise
        return transfer

    async def abort_blob(self, transfer: str, reason: str) -> None:
        """Tell the peer to drop payload ``transfer``, sent in part or whole, that no message will name."""
        await self.send(m.BlobAbort(transfer=transfer, reason=clip_text(reason, 500)))

    def tap(self, tap: Tap) -> None:
        """Pass the next payload announced with ``tap.sha256`` to ``tap`` as it arrives (see Tap)."""
        self._taps[tap.sha256] = tap

    def untap(self, tap: Tap) -> None:
        if self._taps.get(tap.sha256) is tap:
            del self._taps[tap.sha256]

    async def send_with_blob(
        self, msg: m.Message, data: bytes | Pieces | None, what: str = "payload", sha256: str | None = None, progress: Progress | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        if data is not None:
            setattr(msg, "blob", await self.send_blob(data, what, sha256, progress, budget))
        await self.send(msg)

    async def request(
        self, op: str, args: dict[str, Any] | None = None, blob: bytes | Pieces | None = None, timeout: float | None = None,
        progress: Progress | None = None, on_sent: Callable[[], None] | None = None, sha256: str | None = None,
    ) -> tuple[dict[str, Any], bytes | None]:
        """Send a request and wait for its reply (request_checked without the digest)."""
        result, data, _ = await self.request_checked(op, args, blob, timeout, progress, on_sent, sha256)
        return result, data

    async def request_checked(
        self, op: str, args: dict[str, Any] | None = None, blob: bytes | Pieces | None = None, timeout: float | None = None,
        progress: Progress | None = None, on_sent: Callable[[], None] | None = None, sha256: str | None = None,
    ) -> tuple[dict[str, Any], bytes | None, str | None]:
        """Send a request and wait for its reply: its result, its payload, and the sha256 that
        payload was checked against as it arrived (so a caller comparing it with a model id
        need not hash it again). ``progress`` is told how much of ``blob`` is sent,
        ``on_sent`` is called once the request is written (it may first wait for the socket).
        ``sha256``: the digest of ``blob`` when the caller knows it (see send_blob), so the
        same bytes sent again are not hashed again.

        Raises RemoteError when the peer refuses, LinkClosed when the connection closes
        first, RequestTimeout when no reply comes within ``timeout`` seconds.
        """
        if self.closed:
            raise LinkClosed(self.peer, f"cannot send {op}")
        req = m.Request(op=op, args=args or {}, id=self.next_id())
        fut: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self._pending[req.id] = fut
        try:
            await self.send_with_blob(req, blob, sha256=sha256, progress=progress)
            if on_sent is not None:
                on_sent()
            try:
                reply = await asyncio.wait_for(fut, timeout)
            except TimeoutError:  # asyncio's, since 3.11 the builtin
                raise RequestTimeout(self.peer, op, timeout or 0.0) from None
        finally:
            self._pending.pop(req.id, None)
            # run() may have failed the future while the send was still under way, and the
            # send's own LinkClosed is what propagates: retrieve the future's exception so
            # asyncio does not log it as never retrieved.
            if fut.done() and not fut.cancelled():
                fut.exception()
            else:
                fut.cancel()
        if not reply.ok:
            err = reply.error or {}
            raise RemoteError(str(err.get("code", "error")), str(err.get("message", "request failed")))
        blob, blob_error, digest = self._take(reply.blob)
        if blob_error:
            raise ProtocolError(f"reply to {op} from {self.peer}: {blob_error}")
        if reply.result_blob:  # a listing too large for one frame came as the payload
            try:
                result = json.loads(blob or b"")
            except (ValueError, RecursionError) as exc:
                raise ProtocolError(f"reply to {op} from {self.peer}: its result is not JSON: {exc}") from None
            if not isinstance(result, dict):
                raise ProtocolError(f"reply to {op} from {self.peer}: its result must be a JSON object")
            return result, None, None
        return reply.result, blob, digest

    # -- receiving -------------------------------------------------------------------

    async def run(self, on_message: MessageHandler | None = None, on_request: RequestHandler | None = None) -> None:
        """Read frames until the connection closes."""
        loop = asyncio.get_running_loop()
        self.last_frame = loop.time()
        stop_watch = self._watch_writes()
        try:
            async for frame in self.ws:
                self.last_frame = loop.time()
                try:
                    if isinstance(frame, bytes):
                        self._frame_bytes += len(frame)
                        await self._on_chunk(frame)
                    else:
                        await self._on_text(frame, on_message, on_request)
                except ScaleoutError as exc:
                    await self._complain(exc, getattr(exc, "re", None))
                except Exception:  # the role edge: a bug in one handler must not drop the link
                    log.exception("could not handle a message from %s", self.peer)
                    await self._complain(ProtocolError("internal error while handling the message"))
        except ConnectionClosed:
            pass
        finally:
            if stop_watch is not None:
                stop_watch()
            self.closed = True
            reason = self.cut_reason or _close_reason(self.ws)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(LinkClosed(self.peer, reason))
            for task in list(self._tasks):
                task.cancel()
            # Nothing a closed link received is wanted any more: let it all go now.
            held = self._frame_bytes >= TRIM_AFTER_BYTES
            self._transfers.clear()
            self._blobs.clear()
            self._digests.clear()
            self._failed.clear()
            if held:
                schedule_release()

    def _watch_writes(self) -> Callable[[], None] | None:
        """websockets writes some frames itself (a PONG for each PING), past ``_send_frame``:
        a peer that pings and never reads would pile them up here without bound. Drop it when
        the transport's write buffer holds more than ``max_queued`` bytes, or holds bytes and
        takes none for ``send_timeout`` while no send of ours waits (those have their own bound).

        Every write of the connection goes through its ``send_data``: wrapped, it puts the link
        on its loop's write watch (_WriteWatch) whenever bytes stay in the buffer, and the watch
        looks at such links each WRITE_CHECK_S until their buffer is empty. An idle link costs
        no timer. A connection without ``send_data`` is watched all the time it runs.
        Returns what stops the watch, or None when the transport cannot tell its buffer."""
        transport = getattr(self.ws, "transport", None)
        if transport is None or not hasattr(transport, "get_write_buffer_size"):
            return None
        watch = _WriteWatch.of(asyncio.get_running_loop())
        original = getattr(self.ws, "send_data", None)
        if not callable(original):
            watch.add(self, transport, always=True)
            return lambda: watch.discard(self)

        def send_data() -> None:
            original()
            if not self.cut_reason and transport.get_write_buffer_size():
                watch.add(self, transport)

        self.ws.send_data = send_data
        if transport.get_write_buffer_size():
            watch.add(self, transport)

        def stop() -> None:
            watch.discard(self)
            self.ws.__dict__.pop("send_data", None)

        return stop

    def _check_writes(self, transport: Any, now: float) -> bool:
        """One look at the write buffer (see _watch_writes); False when there is nothing
        more to watch: the buffer is empty or the link was dropped."""
        size = transport.get_write_buffer_size()
        if size > self.max_queued:
            self.cut(f"{fmt_bytes(size)} waiting for a peer that does not read (limit {fmt_bytes(self.max_queued)})")
        elif size == 0 or size < self._write_last or self._queued:
            self._write_since = now
        elif now - self._write_since >= self.send_timeout:
            self.cut(f"the peer took nothing for {self.send_timeout:g} s")
        self._write_last = size
        return size > 0 and not self.cut_reason

    async def _complain(self, exc: ScaleoutError, re: str | None = None) -> None:
        self._bad_frames += 1
        log.warning("bad message from %s: %s", self.peer, exc)
        try:
            await self.send(m.Error(code=exc.code, message=self.scrub(str(exc)), re=re))
        except (LinkClosed, ConnectionClosed):
            return
        if self._bad_frames > MAX_BAD_FRAMES:
            await self.close_now(CLOSE_POLICY, "too many malformed messages")

    async def close_now(self, code: int, reason: str) -> None:
        """Cut the peer off: send the close frame, and drop the connection within
        ABORT_CLOSE_S whether or not the peer answers (a protocol breaker gets no more)."""
        log.warning("closing the link to %s: %s", self.peer, reason)
        self.ws.close_timeout = ABORT_CLOSE_S
        try:
            # Writing the close frame waits for room to write: a peer that does not read gets none.
            async with asyncio.timeout(2 * ABORT_CLOSE_S):
                await self.ws.close(code, reason)
        except TimeoutError:
            self.cut(reason)
        except Exception as exc:  # the role edge: the peer may be gone already
            log.debug("closing %s: %s", self.peer, exc)

    async def watch(self, *, greeted: Callable[[], bool] | None = None, hello_s: float = 0.0, idle_s: float = 0.0) -> None:
        """Close the link when its peer does not introduce itself (``greeted()`` still
        false after ``hello_s``) or sends nothing and waits for nothing for ``idle_s``
        (0: no limit). Run it beside run(); it ends when the link closes."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not self.closed and self.ws.close_code is None:
            now = loop.time()
            waits: list[float] = []
            if greeted is not None and hello_s > 0 and not greeted():
                if now - started >= hello_s:
                    await self.close_now(CLOSE_POLICY, f"no hello within {hello_s:g} s")
                    return
                waits.append(started + hello_s - now)
            if idle_s > 0:
                busy = bool(self._tasks or self._pending or self._transfers)
                quiet = now - max(self.last_frame, started)
                if not busy and quiet >= idle_s:
                    await self.close_now(1000, f"idle for {idle_s:g} s")
                    return
                waits.append(idle_s - quiet if not busy else idle_s)
            if not waits:
                return
            await asyncio.sleep(max(0.05, min(waits)))  # a timer: the next moment a limit could be reached

    def scrub(self, text: str) -> str:
        """``text`` as it may go to this link's peer: an absolute path (of our files, in a
        storage error say) becomes its last part, unless the peer is an admin of ours."""
        claims = self.claims
        if claims is not None and getattr(claims, "role", None) == "admin":
            return text
        return scrub_paths(text)

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
        if isinstance(msg, m.BlobAbort):
            self._on_blob_abort(msg)
            return
        if isinstance(msg, m.Error):
            fut = self._pending.get(msg.re) if msg.re is not None else None
            if fut is not None and not fut.done():  # our request was refused before it could be read: fail it now
                fut.set_exception(RemoteError(msg.code, msg.message))
                return
            log.warning("%s reported an error: %s", self.peer, msg.message)
            return
        # No local name for the payload: whoever takes it from the Incoming decides its lifetime.
        inc = Incoming(msg, *self._take(getattr(msg, "blob", None)))
        if isinstance(msg, m.Request):
            if len(self._tasks) >= self.max_requests:  # a peer that asks and does not read its replies
                inc.take_blob()
                if not self._over_requests:  # once: what it sent before the close is dropped quietly
                    self._over_requests = True
                    await self.close_now(CLOSE_POLICY, f"more than {self.max_requests} requests unanswered")
                return
            self._spawn(self._answer(msg, inc, on_request))
        elif on_message is not None:
            await on_message(inc)
        else:
            raise ProtocolError(f"{msg.type} is not accepted on this link")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, req: m.Request, inc: Incoming, on_request: RequestHandler | None) -> None:
        data: bytes | Hashed | None = None
        cut_off = False  # told why, then closed
        try:
            if self.authorize is not None:  # who may ask comes first, before what they sent with it
                try:
                    self.authorize(req)
                except ScaleoutError as exc:  # asking for what is not yours counts as abuse too
                    self._bad_frames += 1
                    log.warning("refused %s from %s: %s", req.op, self.peer, exc)
                    cut_off = self._bad_frames > MAX_BAD_FRAMES
                    raise
            if inc.blob_error:
                raise ProtocolError(inc.blob_error)
            if on_request is None:
                raise ProtocolError(f"{self.peer} does not take requests here")
            result, data = await on_request(req, inc.take_blob())
            # Encoded before anything is sent: a result JSON cannot carry (inf, NaN, an object)
            # becomes an error reply below, never a request left unanswered.
            encoded: bytes | None
            try:
                encoded = m.to_json(result).encode()
            except (ValueError, TypeError, RecursionError) as exc:
                log.error("reply to %s from %s could not be encoded: %s", req.op, self.peer, exc)
                encoded = None
            if encoded is None:
                data, reply = None, m.Reply(re=req.id, ok=False, error={"code": "internal", "message": "internal error: reply could not be encoded"})
            elif data is None and len(encoded) > m.MAX_INLINE_RESULT:  # a listing that grows with the fleet must not outgrow a frame
                reply, data = m.Reply(re=req.id, ok=True, result_blob=True), encoded
            else:
                reply = m.Reply(re=req.id, ok=True, result=result)
        except ScaleoutError as exc:
            reply = m.Reply(re=req.id, ok=False, error={"code": exc.code, "message": self.scrub(str(exc))})
        except asyncio.CancelledError:
            raise
        except Exception:  # the role edge: never let a bug take down the link
            log.exception("request %s from %s failed", req.op, self.peer)
            data, reply = None, m.Reply(re=req.id, ok=False, error={"code": "internal", "message": f"internal error while handling {req.op}"})
        try:
            if isinstance(data, Hashed):
                await self.send_with_blob(reply, data.data, sha256=data.sha256)
            else:
                await self.send_with_blob(reply, data)
        except LinkClosed:
            return
        if cut_off:
            await self.close_now(CLOSE_POLICY, "too many refused requests")

    def _on_blob_start(self, start: m.BlobStart) -> None:
        if self.drop_payloads:
            self._failed[start.transfer] = "payload dropped unread"
            self._trim()
            return
        if start.size < 0:
            self._refuse(start.transfer, f"payload size {start.size} is invalid")
        if start.size > self.max_payload:
            self._refuse(start.transfer, f"payload of {fmt_bytes(start.size)} exceeds the limit of {fmt_bytes(self.max_payload)}")
        if len(self._transfers) >= self.max_in_flight:
            self._refuse(start.transfer, f"too many payloads in flight (limit {self.max_in_flight})")
        tap = self._taps.pop(start.sha256, None) if start.size > INLINE_BYTES else None
        try:
            self._transfers[start.transfer] = t = _Transfer(start, self.writable_payloads, self.file_payloads or tap is not None, tap)
            if t.file is not None and self.landing is not None and self.landing.size == start.size:
                t.landing, self.landing = self.landing, None
        except OSError as exc:  # no room for a temporary file: not the peer's fault, and not fatal
            if tap is not None:
                tap.fail(f"payload could not be stored: {exc.strerror or exc}")
            log.error("could not keep a payload from %s in a temporary file: %s", self.peer, exc)
            self._failed[start.transfer] = f"payload could not be stored: {exc.strerror or exc}"
            self._trim()
            return
        if self.receive_progress is not None:
            self.receive_progress(0, start.size)
        if start.size == 0:
            self._finish(start.transfer)

    async def _on_chunk(self, frame: bytes) -> None:
        # Parse the tag alone: slicing the chunk off would copy it on the loop.
        transfer, _ = m.split_chunk(frame[: m.TRANSFER_ID_BYTES])
        chunk = memoryview(frame)[m.TRANSFER_ID_BYTES :]
        t = self._transfers.get(transfer)
        if t is None:
            if transfer in self._failed:
                return  # the rest of a payload we already refused
            raise ProtocolError(f"payload chunk for unknown transfer {transfer!r}")
        if t.received + len(chunk) > t.start.size:
            del self._transfers[transfer]
            self._refuse(transfer, f"payload is larger than the announced {t.start.size} bytes")
        t.add(chunk)
        self.received_bytes += len(chunk)
        self.received_at = self.last_frame
        size = t.start.size
        if self.receive_progress is not None:
            self.receive_progress(t.received, size)
        elif size >= PROGRESS_MIN_BYTES and t.received >= t.next_report and t.received < size:
            log.info("receiving payload from %s: %s of %s", self.peer, fmt_bytes(t.received), fmt_bytes(size))
            t.next_report += size // 4
        if t.received < size:
            await t.settle(QUEUED_CHUNKS)
            return
        # The last chunk: the payload is checked before any message can claim it.
        await t.settle(0)
        if self._transfers.get(transfer) is t:  # not dropped meanwhile (a message claimed it early)
            self._finish(transfer)

    def _on_blob_abort(self, msg: m.BlobAbort) -> None:
        """The peer will not finish a payload (see BlobAbort): what arrived of it is let go."""
        t = self._transfers.pop(msg.transfer, None)
        whole = self._blobs.pop(msg.transfer, None)
        if t is None and whole is None:
            return  # refused, claimed or let go already: nothing of it is held
        reason = " ".join(clip_text(msg.reason, 500).split())  # the peer's words, one line in our log
        if t is not None and t.tap is not None:
            t.tap.fail(f"{self.peer} stopped sending it: {reason}")
        self._failed[msg.transfer] = f"{self.peer} stopped sending the payload: {reason}"
        self._trim()
        got = f"{fmt_bytes(t.received)} of {fmt_bytes(t.start.size)}" if t is not None else f"all {fmt_bytes(len(whole or b''))}"
        log.warning("%s stopped sending a payload (%s arrived); dropped it: %s", self.peer, got, reason)

    def _refuse(self, transfer: str, reason: str) -> NoReturn:
        """Remember why, so its remaining chunks are dropped and a message naming it is told."""
        self._failed[transfer] = reason
        self._trim()
        raise ProtocolError(reason)

    def _finish(self, transfer: str) -> None:
        t = self._transfers.pop(transfer)
        actual = t.digest.hexdigest()
        if t.error is not None:  # not a peer's fault: say so, and keep the cause in our log
            log.error("could not check a payload from %s: %r", self.peer, t.error)
            # A full disk says so (to a client a relayed model is dropped by, too); other causes stay in our log.
            why = f"could not be stored: {t.error.strerror}" if isinstance(t.error, OSError) and t.error.strerror else f"could not be checked: {type(t.error).__name__}"
            self._failed[transfer] = f"payload {why}"
        elif actual != t.start.sha256:
            self._failed[transfer] = f"payload is corrupt: sha256 {actual[:12]} does not match the announced {t.start.sha256[:12]}"
        else:
            try:
                self._blobs[transfer] = t.value()
                self._digests[transfer] = actual
                if t.landing is not None:  # the verdict is of these bytes, and of no other payload
                    t.landing.payload = self._blobs[transfer]
            except OSError as exc:  # its file could not be mapped: refused, and the link goes on
                log.error("could not map a payload from %s: %s", self.peer, exc)
                self._failed[transfer] = f"payload could not be stored: {exc.strerror or exc}"
        if t.tap is not None:  # checked whole, its readers may take the last chunk; or they stop
            if transfer in self._blobs:
                t.tap.complete(self._blobs[transfer])
            else:
                t.tap.fail(self._failed.get(transfer, "payload was refused"))
        self._trim()

    def _trim(self) -> None:
        # Payloads nobody claimed (a peer that announces and never refers) must not pile up.
        while len(self._blobs) > self.max_in_flight:
            self._blobs.popitem(last=False)
        while len(self._failed) > MAX_FAILED:
            self._failed.popitem(last=False)
        for transfer in [k for k in self._digests if k not in self._blobs]:
            del self._digests[transfer]

    def _take(self, transfer: str | None) -> tuple[bytes | None, str | None, str | None]:
        """(payload, why it was refused, the sha256 it was checked against) for ``transfer``."""
        blob, error = self._take_blob(transfer)
        return blob, error, self._digests.pop(transfer, None) if blob is not None and transfer else None

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


_TRIM: list[Any] = []  # glibc's malloc_trim, once looked up ([None] where there is none)
_RELEASE = {"running": False, "again": False}  # one release at a time; links closing meanwhile ask for one more


class _WriteWatch:
    """One timer per event loop for the write buffers of all its links (Link._watch_writes):
    it runs only while some link has bytes waiting, and looks at those links alone."""

    _by_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _WriteWatch]" = weakref.WeakKeyDictionary()

    def __init__(self) -> None:  # it holds no reference to its loop, the key of _by_loop
        self.links: dict[Link, tuple[Any, bool]] = {}  # link -> (its transport, watched all the time)
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_WriteWatch":
        watch = cls._by_loop.get(loop)
        if watch is None:
            watch = cls._by_loop[loop] = cls()
        return watch

    def add(self, link: Link, transport: Any, always: bool = False) -> None:
        if link in self.links:
            return
        loop = asyncio.get_running_loop()  # a link's writes happen on its loop
        link._write_last, link._write_since = 0, loop.time()  # as the old per-link look saw it: empty until now
        self.links[link] = (transport, always)
        if self.timer is None:
            self.timer = loop.call_later(WRITE_CHECK_S, self._tick)

    def discard(self, link: Link) -> None:
        self.links.pop(link, None)

    def _tick(self) -> None:
        self.timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for link, (transport, always) in list(self.links.items()):
            try:
                busy = link._check_writes(transport, now)
            except Exception:  # the role edge: one link's transport must not stop the watch of the others
                log.exception("could not look at the write buffer of %s", link.peer)
                busy = False
            if not (busy or (always and not link.cut_reason)):
                del self.links[link]
        if self.links:
            self.timer = loop.call_later(WRITE_CHECK_S, self._tick)


def schedule_release() -> None:
    """release_memory() in a worker thread (it walks the heap): one at a time, and once more
    after it for the links that closed while it ran."""
    if _RELEASE["running"]:
        _RELEASE["again"] = True
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no running loop (shutting down): the process ends anyway
        return
    _RELEASE["running"], _RELEASE["again"] = True, False

    def done(fut: asyncio.Future[None]) -> None:
        _RELEASE["running"] = False
        if not fut.cancelled():
            fut.exception()  # looked at: a failure here is not worth a log line
        if _RELEASE["again"]:
            schedule_release()

    try:
        loop.run_in_executor(None, release_memory).add_done_callback(done)
    except RuntimeError:  # the loop is shutting down (its executor is gone): the process ends or moves on
        _RELEASE["running"] = False


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps 1 MiB buffers freed by a closed
    link in its heap otherwise, so a burst of abusive links would raise RSS for good)."""
    if not _TRIM:
        try:
            import ctypes

            _TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)


def scrub_paths(text: str) -> str:
    """Replace each absolute path in ``text`` by ``.../`` and its last part, so an error sent
    to a peer does not tell where our files are (``/var/lib/scaleout/models/ab.safetensors``
    -> ``.../ab.safetensors``); URLs are left alone."""
    return _PATH.sub(lambda mo: f".../{mo.group(1)}", text)


def _close_reason(ws: Any) -> str:
    """The close code and reason, e.g. "code 1008: too many malformed messages", once known."""
    code, reason = getattr(ws, "close_code", None), getattr(ws, "close_reason", "")
    if code is None:
        return ""
    return f"code {code}" + (f": {reason}" if reason else "")
