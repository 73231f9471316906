"""The controller's typed event stream to subscribed admin links (the TUI, other tools).

Publishing never waits: each event is numbered and appended to every subscriber's bounded
buffer, which that subscriber's own task writes to its link. A subscriber that falls more
than its buffer behind (a slow link, a paused terminal) loses what is buffered and gets a
``resync`` event instead, so rounds never wait for a reader; it then re-reads the snapshot
(``events.snapshot``) and goes on from there. Events are idempotent upserts of state, so
one that is both in a snapshot and after it does no harm.

The hub also keeps the running round's progress (updates in, refused, bytes), which it
publishes at most every PROGRESS_S while reports arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from scaleout.core import messages as m
from scaleout.core.errors import ProtocolError

if TYPE_CHECKING:
    from scaleout.transport.link import Link

log = logging.getLogger("scaleout.events")

MIN_BUFFER, MAX_BUFFER = 1, 65536
PROGRESS_S = 0.25  # the running round's progress is published at most this often
SNAPSHOT_MODELS = 1000  # the latest models of the trail in a snapshot
SNAPSHOT_SESSIONS = 200
SNAPSHOT_METRICS = 20000  # the latest log_metric reports of the session in a snapshot
# A subscribed link's kernel send buffer: otherwise Linux grows it to 4 MiB, which hides a
# stalled reader (and holds that much) for thousands of events before the buffer here sees it.
SUBSCRIBER_SNDBUF = 64 << 10


class Subscriber:
    def __init__(self, link: Link, kinds: frozenset[str], limit: int) -> None:
        self.link = link
        self.kinds = kinds
        self.limit = limit
        self.queue: deque[m.FedEvent] = deque()
        self.wake = asyncio.Event()
        self.dropped = 0  # events lost to overflow since the subscription began
        self.resyncs = 0
        self.task: asyncio.Task[None] | None = None

    def offer(self, ev: m.FedEvent) -> None:
        if self.kinds and ev.kind not in self.kinds and ev.kind != m.Resync.kind:
            return
        if len(self.queue) >= self.limit:
            lost = len(self.queue) + 1
            self.queue.clear()
            self.dropped += lost
            self.resyncs += 1
            ev = m.Resync(seq=ev.seq, time=ev.time, reason=f"fell behind by more than {self.limit} events", dropped=lost)
            log.info("event subscriber %s fell behind: %d events dropped, told to resync", self.link.peer, lost)
        self.queue.append(ev)
        self.wake.set()

    async def run(self) -> None:
        from scaleout.transport.link import LinkClosed

        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                while self.queue:
                    await self.link.send(m.encode_event(self.queue.popleft()))
        except LinkClosed:
            pass


class EventHub:
    def __init__(self) -> None:
        self.seq = 0
        self.subscribers: dict[Link, Subscriber] = {}
        self.round: dict[str, Any] | None = None  # the running round's progress, as last published
        self.packages: dict[str, str] = {}  # client -> the package it said it runs (client.assign)
        self._progress_due: asyncio.TimerHandle | None = None

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, link: Link, msg: m.Subscribe) -> None:
        unknown = sorted(set(msg.kinds) - m.EVENT_KINDS)
        if unknown:
            raise ProtocolError(f"subscribe: unknown event kind(s) {', '.join(unknown)[:200]}; known: {', '.join(sorted(m.EVENT_KINDS))}")
        if not MIN_BUFFER <= msg.buffer <= MAX_BUFFER:
            raise ProtocolError(f"subscribe: buffer must be {MIN_BUFFER} to {MAX_BUFFER} events, got {msg.buffer}")
        self.unsubscribe(link)
        _limit_send_buffer(link)
        sub = Subscriber(link, frozenset(msg.kinds), msg.buffer)
        sub.task = asyncio.get_running_loop().create_task(sub.run())
        self.subscribers[link] = sub
        log.info("%s subscribed to events (buffer %d%s)", link.peer, msg.buffer, f", kinds {', '.join(msg.kinds)}" if msg.kinds else "")
        sub.offer(self._stamp(m.Resync(reason="subscribed")))

    def unsubscribe(self, link: Link) -> None:
        sub = self.subscribers.pop(link, None)
        if sub is not None and sub.task is not None:
            sub.task.cancel()

    async def close(self) -> None:
        for link in list(self.subscribers):
            self.unsubscribe(link)
        if self._progress_due is not None:
            self._progress_due.cancel()

    # -- publishing ----------------------------------------------------------------------

    def _stamp(self, ev: m.FedEvent) -> m.FedEvent:
        self.seq += 1
        ev.seq, ev.time = self.seq, time.time()
        return ev

    def publish(self, ev: m.FedEvent) -> None:
        """Number ``ev`` and hand it to every subscriber; never waits."""
        self._stamp(ev)
        for sub in list(self.subscribers.values()):
            sub.offer(ev)

    def round_started(self, session_id: str, index: int, expected: int, timeout: float, left_s: float, model_bytes: int) -> None:
        deadline = time.time() + max(0.0, left_s)
        self.round = {
            "session_id": session_id, "round_index": index, "received": 0, "refused": 0, "expected": expected,
            "bytes_in": 0, "bytes_out": model_bytes * expected, "deadline": deadline, "model_bytes": model_bytes,
        }
        self.publish(m.RoundStarted(
            session_id=session_id, round_index=index, expected=expected, timeout=timeout, deadline=deadline, model_bytes=model_bytes,
        ))

    def round_ended(self, row: dict[str, Any]) -> None:
        self._flush_progress()
        self.round = None
        self.publish(m.RoundEnded(
            session_id=str(row.get("session_id")), round_index=int(row["idx"]), status=str(row["status"]), reason=row.get("reason"),
            duration_s=row.get("duration_s"), participants=len(row.get("participants") or []), model_id=row.get("model_id"),
            validation={k: v for k, v in (row.get("validation") or {}).items() if isinstance(v, (int, float))},
        ))

    def report(self, kind: str, session_id: str, round_index: int, client: str, data: dict[str, Any], error: str | None) -> None:
        """A client's report as its combiner forwarded it (already within the limits)."""
        if kind == "metric":
            if not m.numeric_values(data.get("metrics")):
                return  # no values: a count of dropped ones (metric ls says so)
            step = data.get("step")
            self.publish(m.MetricLogged(
                session_id=session_id, round_index=round_index, client=client,
                step=step if isinstance(step, int) and not isinstance(step, bool) else None, values=m.numeric_values(data.get("metrics")),
            ))
            return
        self.publish(m.ClientReported(
            session_id=session_id, round_index=round_index, client=client, task=kind, error=error, values=m.numeric_values(data),
        ))
        r = self.round
        if kind == "train" and r is not None and r["session_id"] == session_id and r["round_index"] == round_index:
            if error:
                r["refused"] += 1
            else:
                r["received"] += 1
                r["bytes_in"] += r["model_bytes"]
            if self._progress_due is None:
                self._progress_due = asyncio.get_running_loop().call_later(PROGRESS_S, self._flush_progress)

    def reports(self, kind: str, session_id: str, round_index: int, rows: list[tuple[str, dict[str, Any], str | None]]) -> None:
        """A combiner's clients' outcomes of a round (one Reports message): each client's
        event as ``report`` would publish it, the round's progress counted once."""
        for client, data, error in rows:
            self.publish(m.ClientReported(
                session_id=session_id, round_index=round_index, client=client, task=kind, error=error, values=m.numeric_values(data),
            ))
        r = self.round
        if kind == "train" and rows and r is not None and r["session_id"] == session_id and r["round_index"] == round_index:
            refused = sum(1 for _, _, error in rows if error)
            r["refused"] += refused
            r["received"] += len(rows) - refused
            r["bytes_in"] += r["model_bytes"] * (len(rows) - refused)
            if self._progress_due is None:
                self._progress_due = asyncio.get_running_loop().call_later(PROGRESS_S, self._flush_progress)

    def _flush_progress(self) -> None:
        if self._progress_due is not None:
            self._progress_due.cancel()
            self._progress_due = None
            r = self.round
            if r is not None:
                self.publish(m.RoundProgress(**{k: v for k, v in r.items() if k != "model_bytes"}))


def _limit_send_buffer(link: Link) -> None:
    import socket

    sock = getattr(getattr(link.ws, "transport", None), "get_extra_info", lambda _: None)("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SUBSCRIBER_SNDBUF)


async def snapshot(ctl: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Everything a watcher shows, as of event ``seq``: status, nodes, sessions, the current
    (or ``session_id``'s) session with its rounds and per-client reports, the model trail.
    Read in a thread, on the registry writer's connection (after its queue is written)."""
    hub: EventHub = ctl.hub
    seq = hub.seq
    key = args.get("session_id")
    if key is not None and not isinstance(key, str):
        raise ProtocolError("events.snapshot: session_id must be a session id (text)")
    if key is None and ctl.session is not None:
        key = ctl.session.id
    await ctl.registry.flush()
    snap = await asyncio.to_thread(ctl.registry.query, lambda st: _read(st, key))
    snap["sessions"] = [ctl.sessions.with_end(row) for row in snap["sessions"]]
    if snap["session"] is not None:
        snap["session"] = ctl.sessions.with_end(snap["session"])
    live = {name: len(c.clients) for name, c in ctl.combiners.items()}
    for row in snap["combiners"]:
        if row["name"] in live:
            row["clients"] = live[row["name"]]
    for row in snap["clients"]:
        row["package"] = hub.packages.get(row["name"], "")
    snap.update(
        seq=seq, url=ctl.url, running=ctl.session.id if ctl.session is not None else None,
        round=dict(hub.round) if hub.round is not None else None,
    )
    return snap


def _read(st: Any, session_id: str | None) -> dict[str, Any]:
    """The stored part of a snapshot (in a thread); ``session_id`` None: the latest session."""
    import json

    from scaleout.core.errors import NotFoundError

    sessions = st.sessions()[-SNAPSHOT_SESSIONS:]
    if session_id is None and sessions:
        session_id = sessions[-1]["id"]
    session = None
    if session_id is not None:
        try:
            session = st.session(session_id)
        except NotFoundError:
            raise NotFoundError("session", session_id) from None
    package_id = st.get_meta("active_package")
    package = None
    if package_id:
        with contextlib.suppress(NotFoundError):
            package = st.package(package_id)
    rows = st.db.execute(
        "SELECT client, session_id, round_index FROM reports WHERE id IN "
        "(SELECT MAX(id) FROM reports WHERE kind='train' AND error IS NULL GROUP BY client)"
    ).fetchall()
    last = {r[0]: [r[1], r[2]] for r in rows}
    clients = st.clients()
    for row in clients:
        row["last_round"] = last.get(row["name"])
    reports: list[dict[str, Any]] = []
    if session_id is not None:
        out = st.db.execute(
            "SELECT kind, round_index, client, data, error, created FROM reports WHERE session_id=? AND kind!='metric' ORDER BY id",
            (session_id,),
        ).fetchall()
        metrics = st.db.execute(
            "SELECT kind, round_index, client, data, error, created FROM reports WHERE session_id=? AND kind='metric' "
            "ORDER BY id DESC LIMIT ?", (session_id, SNAPSHOT_METRICS),
        ).fetchall()
        for kind, idx, client, data, error, created in [*out, *reversed(metrics)]:
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = {}
            rep: dict[str, Any] = {"kind": kind, "round_index": idx, "client": client, "error": error, "time": created}
            if kind == "metric":
                step = parsed.get("step") if isinstance(parsed, dict) else None
                rep["step"] = step if isinstance(step, int) and not isinstance(step, bool) else None
                rep["values"] = m.numeric_values(parsed.get("metrics") if isinstance(parsed, dict) else None)
                if not rep["values"]:
                    continue  # a count of dropped metrics: nothing to plot
            else:
                rep["values"] = m.numeric_values(parsed)
            reports.append(rep)
    return {
        "active_model": st.get_meta("active_model"),
        "active_package": {"id": package_id, "name": package["name"] if package else ""} if package_id else None,
        "combiners": st.combiners(),
        "clients": clients,
        "sessions": [{k: v for k, v in s.items() if k != "rounds"} for s in sessions],
        "session": session,
        "reports": reports,
        "models": st.models()[-SNAPSHOT_MODELS:],
    }
