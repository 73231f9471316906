"""Sessions at the controller: the admin operations on them and the runner that carries
out what the durable state machine (core/sessions.py) decides.

Every transition is written to state.db (its step in ``session_steps`` together with the
rows it implies, one transaction) before the controller acts on it, so a controller that
is killed and started again on the same data dir resumes a running session by itself: the
round that was in flight is run again under the same index from the last committed model
and strategy state, and nothing committed is lost or done twice.

This module never imports the controller: it gets what it needs through ``SessionHost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.core.config import SessionConfig
from scaleout.core.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    PayloadError,
    ProtocolError,
    RemoteError,
    ShuttingDown,
    StorageError,
    StoreUnreachable,
    UpdateRejected,
)
from scaleout.core.limits import transfer_timeout
from scaleout.core.metrics import mean_metrics
from scaleout.core.rounds import ControllerRound, Outcome
from scaleout.core.selection import (
    choose_validators,
    clients_to_wait_for,
    eligible_count,
    sample_clients,
    select_clients,
)
from scaleout.core.sessions import Done, EndSession, RunRound, SessionMachine, Step, StepKind, ValidateRound, Wait
from scaleout.roles import serverfunctions as sfn
from scaleout.roles.common import failpoint, new_id
from scaleout.roles.spill import SPILL, Spill, sweep
from scaleout.transport.link import Link, LinkClosed, Pieces, RequestTimeout

log = logging.getLogger("scaleout.controller")
T = TypeVar("T")

MODEL = ("models", ".safetensors")
STATE = ("state", ".safetensors")  # what a strategy keeps across the rounds of a session
PARTIAL_GRACE_S = 5.0
PARTIAL_ENCODE_RATE = 100e6  # bytes/s a combiner encodes and hashes its partial at, at the least
PULL_STALL_S = 10.0  # a partial of which nothing arrives for this long is given up
COMBINER_GRACE_S = 10.0  # a combiner whose link drops mid-round may register again and report within this
SMALL_PAYLOAD = 1 << 20
SPILL_SLACK = 1 << 20  # a forwarded update may have a larger header than the model's
RECORD_RETRY_S = (1.0, 30.0)  # first and longest wait between tries to record a session's end
RESTARTED = "controller restarted"
STORE_RETRY_S = (0.5, 5.0)  # first and longest wait between tries of a write while the store is unreachable

KNOWN_KEPT = 64  # session ids known() keeps the store's answer for, each way (the newest)


class CombinerLink(Protocol):
    name: str
    link: Link
    clients: set[str]


class SessionHost(Protocol):
    """What the session service needs of the controller that owns it."""

    state: Any  # store.state.State
    registry: Any  # store.registry.RegistryWriter
    blobs: Any  # store.blobs.BlobStore
    hub: Any  # roles.events.EventHub
    obs: Any  # roles.exporter.Observer
    assigner: Any  # core.selection.Assigner
    combiners: dict[str, Any]  # name -> CombinerLink
    round_members: dict[str, frozenset[str]]

    @property
    def max_payload(self) -> int: ...

    def registry_event(self) -> asyncio.Event: ...

    async def model_bytes(self, model_id: str) -> bytes: ...

    def keep_model(self, model_id: str, data: bytes | Pieces) -> None: ...


@dataclass
class RunningSession:
    id: str
    config: SessionConfig
    machine: SessionMachine
    task: asyncio.Task[None] | None = None
    stopped: bool = False
    round_index: int = 0
    attempt: int = 1
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    server_state: dict[str, Any] = field(default_factory=dict)  # what the strategy keeps across rounds
    stop_reason: str | None = None  # why it was stopped ("stopped by an admin", "controller shut down")
    storage_failure: StorageError | None = None  # a write failed (a full disk): the session ends
    sfn: Any = None  # roles/serverfunctions.SessionFunctions: the session's server functions, while it runs


@dataclass
class SessionEnd:
    """A session's outcome that state.db could not take yet (a full disk): kept here, shown
    by the admin operations, written as soon as a write succeeds."""

    status: str
    reason: str | None
    end_model: str | None
    finished: float
    round_reason: str | None = None
    tried: bool = False  # a write of it failed already


class SessionService:
    """The session operations (start, ls, show, stop, wait) and the runner of the one
    session that runs at a time."""

    def __init__(self, host: SessionHost, store_wait: float | None = None) -> None:
        self.host = host
        self.running: RunningSession | None = None
        self._known: dict[str, None] = {}  # session ids the store has, newest last (known())
        self._unknown: dict[str, None] = {}  # ids the store did not have, newest last (known())
        self.starting = False  # a start or continue is between its checks and its launch (it awaits)
        self.subscribers: set[Link] = set()  # session.wait followers
        self.closing = False  # shutdown() began: session.wait is refused
        self._emitting: dict[Link, asyncio.Future[bool]] = {}  # the event being sent to each follower
        self._unrecorded: dict[str, SessionEnd] = {}  # session id -> its end, not yet in state.db
        self._record_retry: asyncio.Task[None] | None = None
        self._resumable: list[RunningSession] = []
        # The runner's writes (steps, rounds, ends) go to the store on this one thread, in
        # order, off the event loop: on PostgreSQL each is a round trip, and an outage makes
        # one wait seconds. One thread: they never interleave with each other (State's lock
        # keeps them from interleaving with the loop's own writes on the shared connection).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scaleout-store")
        self._ends_lock = threading.Lock()  # one writer of _unrecorded's ends at a time (the loop or the store thread)
        self.store_wait = store_wait  # how long a write waits for an unreachable store; None: a session's round_timeout

    # -- restart ----------------------------------------------------------------------------

    def recover(self, resume: bool) -> None:
        """At start: a session that was running when the controller stopped is resumed (its
        round in flight is retried, recorded as such) or, with ``resume`` off, left
        ``interrupted`` for ``session continue``. Sessions from before the state machine
        (no steps stored) cannot resume: they are marked stopped, as they always were."""
        st = self.host.state
        sweep(self.host.blobs.root / SPILL)  # updates spilled by a round a kill cut short: that round runs again
        for row in st.sessions():
            if row["status"] != "running":
                continue
            steps = [Step.from_dict(d) for d in st.steps(row["id"])]
            cfg = SessionConfig.from_mapping(row["config"])
            if not steps:
                st.end_session(row["id"], "stopped", st.get_meta("active_model"), RESTARTED)
                continue
            machine = SessionMachine.replay(row["id"], steps, validate=cfg.validate)
            now = time.time()
            if not resume:
                end = machine.end("interrupted", f"{RESTARTED} (serve --no-resume)", now)
                with st.transaction():
                    st.add_step(row["id"], end.to_dict())
                    st.end_session(row["id"], "interrupted", machine.model_id, end.reason, round_reason=RESTARTED)
                log.warning("session %s was interrupted by a restart: carry on with scaleout session continue %s", row["id"], row["id"])
                continue
            retry = machine.recover(RESTARTED, now)
            with st.transaction():
                for step in retry:
                    st.add_step(row["id"], step.to_dict())
            for step in retry:
                machine.apply(step)
            s = RunningSession(row["id"], cfg, machine)
            s.server_state = self._load_state(machine.state_id)
            self._resumable.append(s)

    def _load_state(self, state_id: str | None) -> dict[str, Any]:
        if not state_id:
            return {}
        data = self.host.blobs.get(STATE[0], state_id, STATE[1])
        return dict(payload.read(data)[0])

    def resume(self) -> None:
        """Start the runners of the sessions ``recover`` found (once the controller listens)."""
        for s in self._resumable:
            action = s.machine.next_action()
            what = f"round {action.index} again (try {action.attempt})" if isinstance(action, RunRound) else "where it stopped"
            log.info("session %s resumes after a restart: %s", s.id, what)
            self._launch(s)
        self._resumable.clear()

    async def known(self, session_id: str) -> bool:
        """Whether session ``session_id`` was started on this store (by this controller, before
        a restart, or by another on the same store): combiners report their clients' outcomes
        only for those (a late report of a session that ended included); a made-up id is not
        stored. The store is asked once per id, in a thread; its answers for the last
        KNOWN_KEPT ids each way are kept, so ids made up faster than that cost a lookup each."""
        for kept in (self._known, self._unknown):
            if session_id in kept:
                kept[session_id] = kept.pop(session_id)  # the newest again
                return kept is self._known
        found = await asyncio.to_thread(self.host.state.has_session, session_id)
        self._remember(session_id, found)
        return found

    def _remember(self, session_id: str, found: bool) -> None:
        kept = self._known if found else self._unknown
        (self._unknown if found else self._known).pop(session_id, None)
        kept[session_id] = None
        while len(kept) > KNOWN_KEPT:
            kept.pop(next(iter(kept)))

    def _launch(self, s: RunningSession) -> None:
        self.running = s
        self._remember(s.id, True)
        self.host.obs.session_started()
        s.task = asyncio.get_running_loop().create_task(self._run_session(s))

    # -- admin operations ----------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self.running is not None:
            raise ConflictError(f"session {self.running.id} is still running; stop it first (scaleout session stop {self.running.id})")
        if self.starting:
            raise ConflictError("another session is being started; wait for it to run, then stop it first (scaleout session ls)")
        failure = self.record_ends()
        if failure is not None:
            raise failure

    async def start(self, args: dict[str, Any], audit: Any) -> dict[str, Any]:
        """Start a session from the global model, or from ``model`` (any model of the trail)."""
        args = dict(args)
        start_from = args.pop("model", None)
        cfg = SessionConfig.from_mapping(args)  # checks the aggregator and its kwargs too
        self._check_idle()
        self.starting = True  # before any await: a second start meanwhile is refused by _check_idle
        try:
            return await self._start(cfg, start_from, audit)
        finally:
            self.starting = False

    async def _start(self, cfg: SessionConfig, start_from: Any, audit: Any) -> dict[str, Any]:
        st = self.host.state
        if cfg.seed is None:  # drawn once and recorded with the session: its sampling can be replayed
            cfg = replace(cfg, seed=secrets.randbelow(2**32))
        if cfg.clients is not None:
            await self._check_known(cfg.clients)
        if start_from is not None:
            if not isinstance(start_from, str) or not start_from:
                raise ProtocolError("session.start: model must be a model id")
            model_id = st.model(start_from)["id"]  # a unique prefix works; an unknown one says so
            await self.host.model_bytes(model_id)  # its file is there and intact, before anything is written
        else:
            model_id = st.get_meta("active_model")
        if model_id is None:
            raise ConflictError("no global model yet: set a seed first (scaleout model set-seed FILE)")
        sid = new_id("s-")
        functions = await sfn.open_functions(sid, cfg, self.host) if cfg.server_functions else None  # a file that does not load is refused here
        first = Step(StepKind.SESSION_STARTED, model_id=model_id, rounds=cfg.rounds, at=time.time())
        try:
            with st.transaction():  # a full disk must not leave a session row nobody runs
                st.add_session(sid, cfg.to_dict(), model_id)
                st.add_step(sid, first.to_dict())
                audit("session.start", id=sid, config=cfg.to_dict(), model=model_id)
        except BaseException:
            if functions is not None:  # nor a worker nobody uses
                functions.runner.stop()
                functions.executor.shutdown(wait=False)
            raise
        machine = SessionMachine(sid, validate=cfg.validate)
        machine.apply(first)
        s = RunningSession(sid, cfg, machine, sfn=functions)
        self._launch(s)
        log.info("session %s started: %d rounds, aggregator %s", sid, cfg.rounds, cfg.aggregator)
        self.host.hub.publish(m.SessionStarted(session_id=sid, config=cfg.to_dict()))
        connected = sum(map(len, select_clients(self.host.assigner.members, self.host.assigner.ready).values()))
        return {"session": st.session(sid), "clients": connected}

    async def _check_known(self, names: list[str]) -> None:
        """--clients names only clients the controller knows (connected, or seen before)."""
        host = self.host
        await host.registry.flush()
        rows = await asyncio.to_thread(host.registry.read, "clients")
        known = {r["name"] for r in rows} | set(host.assigner.where)
        unknown = [n for n in names if n not in known]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ConfigError("clients", f"unknown client{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:5])}{more}: never seen by this controller (scaleout client ls lists the known ones)")

    async def continue_(self, args: dict[str, Any], audit: Any) -> dict[str, Any]:
        """Carry on a session that ended (finished, stopped, failed, interrupted) from its
        last committed model and strategy state, with its settings; round indexes go on.
        ``rounds``: how many more (default: the rounds it had left, or as many as it had)."""
        self._check_idle()
        self.starting = True  # before any await (see start)
        try:
            return await self._continue(args, audit)
        finally:
            self.starting = False

    async def _continue(self, args: dict[str, Any], audit: Any) -> dict[str, Any]:
        st = self.host.state
        sid = self.key(args)
        row = st.session(sid)
        if row["status"] == "running":
            raise ConflictError(f"session {sid} is running already")
        cfg = SessionConfig.from_mapping(row["config"])
        machine = SessionMachine.replay(sid, self._steps_of(row, cfg), validate=cfg.validate)
        done = machine.next_index - 1  # a round an interruption cut short runs again
        more = args.get("rounds")
        if more is None:
            more = cfg.rounds - done if cfg.rounds > done else cfg.rounds
        if not isinstance(more, int) or isinstance(more, bool) or more < 1:
            raise ProtocolError("session.continue: rounds must be a whole number >= 1")
        changes: dict[str, Any] = {"rounds": done + more}
        if args.get("round_timeout") is not None:
            changes["round_timeout"] = args["round_timeout"]
        cfg = SessionConfig.from_mapping({**cfg.to_dict(), **changes})  # checks the bounds again
        if machine.model_id is None:
            raise ConflictError(f"session {sid} has no model to carry on from")
        step = Step(StepKind.SESSION_CONTINUED, rounds=cfg.rounds, model_id=machine.model_id, state_id=machine.state_id, at=time.time())
        with st.transaction():
            st.add_step(sid, step.to_dict())
            st.reopen_session(sid, cfg.to_dict())
            audit("session.continue", id=sid, rounds=more, model=machine.model_id)
        machine.apply(step)
        s = RunningSession(sid, cfg, machine)
        s.server_state = await asyncio.to_thread(self._load_state, machine.state_id)
        self._launch(s)
        log.info("session %s continues from model %s: rounds %d to %d", sid, machine.model_id[:12], done + 1, cfg.rounds)
        self.host.hub.publish(m.SessionStarted(session_id=sid, config=cfg.to_dict()))
        return {"session": st.session(sid)}

    def _steps_of(self, row: dict[str, Any], cfg: SessionConfig) -> list[Step]:
        """A session's steps; for one run before steps were stored, the same steps rebuilt
        from its rounds (a committed round, a failed one, and its end)."""
        stored = self.host.state.steps(row["id"])
        if stored:
            return [Step.from_dict(d) for d in stored]
        steps = [Step(StepKind.SESSION_STARTED, model_id=row["start_model"], rounds=cfg.rounds)]
        state_id = None
        for r in row["rounds"]:
            steps.append(Step(StepKind.ROUND_STARTED, r["idx"], model_id=r["parent"], state_id=state_id))
            if r["status"] == "succeeded" and r["model_id"]:
                state_id = r.get("server_state")
                steps.append(Step(StepKind.ROUND_COMMITTED, r["idx"], model_id=r["model_id"], state_id=state_id))
                if cfg.validate:
                    steps.append(Step(StepKind.ROUND_VALIDATED, r["idx"]))
            else:
                steps.append(Step(StepKind.ROUND_FAILED, r["idx"], reason=r.get("reason")))
        steps.append(Step(StepKind.SESSION_ENDED, status=row["status"], reason=row.get("reason")))
        return steps

    async def ls(self) -> dict[str, Any]:
        return {"sessions": [self.with_end(row) for row in await asyncio.to_thread(self.host.state.sessions)]}

    async def read(self, args: dict[str, Any]) -> dict[str, Any]:
        """The session ``args`` names (the latest without an id) as the admin should see it; read in a thread."""
        return self.with_end(await asyncio.to_thread(lambda: self.host.state.session(self.key(args))))

    async def show(self, args: dict[str, Any]) -> dict[str, Any]:
        session = await self.read(args)
        if args.get("clients"):
            await self.host.registry.flush()
            reports = await asyncio.to_thread(self.host.registry.reports, session["id"])
            for r in session["rounds"]:
                r["clients"] = [x for x in reports if x["round_index"] == r["idx"] and x["kind"] in ("train", "validate")]
        return {"session": session}

    def key(self, args: dict[str, Any]) -> str:
        key = args.get("id")
        if not key:
            rows = self.host.state.sessions()
            if not rows:
                raise NotFoundError("session", "latest", "none was started yet")
            return str(rows[-1]["id"])
        return str(key)

    async def stop_op(self, args: dict[str, Any], audit: Any) -> dict[str, Any]:
        key = await asyncio.to_thread(self.key, args)
        s = self.running
        if s is None or s.id != key:
            row = await self.read({"id": key})
            raise ConflictError(f"session {key} is not running (it is {row['status']})")
        await asyncio.to_thread(audit, "session.stop", id=key)
        await self.stop(s, "stopped by an admin")
        return {"session": await self.read({"id": key})}

    async def wait(self, link: Link, args: dict[str, Any]) -> dict[str, Any]:
        """Push round events to this link until the session ends, then return it."""
        if self.closing:  # its runner is cancelled: it would never be told the session ended
            raise ShuttingDown("the controller is shutting down; the session stays running and resumes when it starts again")
        key = await asyncio.to_thread(self.key, args)
        s = self.running
        if s is not None and s.id == key:
            self.subscribers.add(link)
            try:
                await s.done.wait()
            finally:
                self.subscribers.discard(link)
        return {"session": await self.read({"id": key})}

    def gone(self, link: Link) -> None:
        self.subscribers.discard(link)

    async def stop(self, s: RunningSession, reason: str) -> None:
        if s.stopped:
            return
        s.stopped = True
        s.stop_reason = reason
        s.stop_event.set()
        s.events.put_nowait(("stop", reason))
        # To all at once: a combiner that does not read holds this up send_timeout at most, the others not at all.
        await asyncio.gather(*(quiet_send(c.link, m.SessionStop(session_id=s.id)) for c in list(self.host.combiners.values())))
        if s.task is not None:
            await asyncio.wait({s.task}, timeout=10)

    async def shutdown(self) -> None:
        """The controller stops: the running session is left ``running`` in state.db (its
        runner is cancelled), so the next start resumes it."""
        self.closing = True
        s = self.running
        if s is not None and s.task is not None:
            s.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # the role edge: it is being abandoned
                await s.task
        if s is not None:
            await sfn.close(s)
        if self._record_retry is not None:
            self._record_retry.cancel()
        await asyncio.to_thread(self._writer.shutdown, True)  # a write under way ends before the store closes
        if self.record_ends() is not None:
            log.error("sessions %s end unrecorded: the next start resumes them", ", ".join(self._unrecorded))

    # -- events from combiners ---------------------------------------------------------------

    def on_combiner_lost(self, name: str, link: Link) -> None:
        if self.running is not None:  # the link says which registration was lost
            self.running.events.put_nowait(("lost", (name, link)))

    def on_combiner_back(self, name: str, link: Link, same_run: bool) -> None:
        """A combiner registered (again): a round that gave it a grace waits for its partial on
        this link if it is the same process (``same_run``); a restarted one lost its share."""
        if self.running is not None:
            self.running.events.put_nowait(("back", (name, link, same_run)))

    def on_round_message(self, name: str, msg: m.RoundPartial | m.RoundUpdate | m.ValidateDone, link: Link) -> None:
        s = self.running
        if s is None or msg.session_id != s.id:  # stale rounds are dropped by _next_event
            log.info("ignoring a late %s from combiner %s", msg.type, name)
            return
        s.events.put_nowait((msg.type, (name, msg, link)))

    # -- ends that a full disk held back -----------------------------------------------------

    def record_ends(self) -> StorageError | None:
        """Write the ends of sessions that state.db could not take (a full disk); return the
        error if it still cannot, after arranging a retry."""
        return self._retry_if(self._write_ends())

    async def _record_ends(self) -> StorageError | None:
        """record_ends, its writes on the store thread."""
        return self._retry_if(await self._store(self._write_ends))

    def _write_ends(self) -> StorageError | None:
        with self._ends_lock:
            for sid, end in list(self._unrecorded.items()):
                try:
                    step = Step(StepKind.SESSION_ENDED, status=end.status, reason=end.reason, at=end.finished)
                    with self.host.state.transaction():
                        self.host.state.add_step(sid, step.to_dict())
                        self.host.state.end_session(sid, end.status, end.end_model, end.reason, end.finished, end.round_reason)
                except StorageError as exc:
                    if not end.tried:
                        log.error("could not record the end of session %s (%s); retrying: %s", sid, end.status, exc)
                    end.tried = True
                    return exc
                del self._unrecorded[sid]
                if end.tried:
                    log.info("recorded the end of session %s (%s)", sid, end.status)
        return None

    def _retry_if(self, exc: StorageError | None) -> StorageError | None:
        if exc is not None and (self._record_retry is None or self._record_retry.done()):
            self._record_retry = asyncio.get_running_loop().create_task(self._retry_record_ends())
        return exc

    async def _retry_record_ends(self) -> None:
        delay, longest = RECORD_RETRY_S
        while self._unrecorded:
            await asyncio.sleep(delay)  # a backoff, not a synchronisation: space may come back any time
            if await self._record_ends() is None:
                return
            delay = min(delay * 2, longest)

    def with_end(self, row: dict[str, Any]) -> dict[str, Any]:
        """A session row as the admin should see it: an end not yet in state.db is shown."""
        end = self._unrecorded.get(row["id"])
        if end is not None:
            row.update(status=end.status, reason=end.reason, finished=end.finished, end_model=end.end_model or row.get("end_model"))
            for r in row.get("rounds", []):
                if r["status"] == "running":
                    r.update(status="failed", reason=end.round_reason or end.reason or end.status, finished=end.finished)
        return row

    async def _emit(self, kind: str, data: dict[str, Any]) -> None:
        """Tell session.wait followers, without waiting for them: a follower still taking
        the previous event (a stalled link) skips this one (it re-reads the session on the
        next, and gets it whole in the reply), so it never holds up the rounds."""
        for link in list(self.subscribers):
            busy = self._emitting.get(link)
            if busy is not None and not busy.done():
                continue
            self._emitting[link] = asyncio.ensure_future(quiet_send(link, m.Event(kind=kind, data=data)))
        for link in [k for k, t in self._emitting.items() if t.done() and k not in self.subscribers]:
            del self._emitting[link]

    # -- the runner --------------------------------------------------------------------------

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store thread (after the writes queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _patient(self, s: RunningSession, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()``, tried again with backoff while the store is unreachable (a lost or
        refused link: StoreUnreachable; a full disk is not waited for) for up to the session's
        round_timeout (ControllerSettings.store_wait), then its StoreUnreachable is raised. A stop
        ends the wait."""
        loop = asyncio.get_running_loop()
        bound = s.config.round_timeout if self.store_wait is None else self.store_wait
        began, delay, longest = loop.time(), *STORE_RETRY_S
        said = False
        while True:
            try:
                out = await attempt()
            except StoreUnreachable as exc:
                waited = loop.time() - began
                if waited >= bound or s.stopped:
                    if said:
                        log.error("round %d: the store is still unreachable after %.1f s: giving up (%s)", s.round_index, waited, exc)
                    raise
                if not said:
                    log.warning("round %d: the store is unreachable: waiting up to %.0f s for it (%s)", s.round_index, bound, exc)
                    said = True
                await asyncio.sleep(min(delay, bound - waited))  # a backoff, not a synchronisation: the store may come back any time
                delay = min(delay * 2, longest)
                continue
            if said:
                log.warning("round %d: the store is back after %.1f s: going on", s.round_index, loop.time() - began)
            return out

    async def _persist(self, s: RunningSession, step: Step, *writes: Any, wait: bool = True) -> None:
        """Write a step and the rows it implies in one transaction (on the store thread),
        then fold it in: the step is committed before the controller acts on it. While the
        store is unreachable it is tried again (``wait``: see _patient); a try after one whose
        COMMIT may have landed unanswered (the link lost meanwhile) first looks: a step is
        never written twice."""
        st = self.host.state
        record = json.loads(json.dumps(step.to_dict()))
        tries = 0

        def write() -> None:
            nonlocal tries
            tries += 1
            with st.transaction():
                if tries > 1 and st.steps(s.id)[-1:] == [record]:
                    return  # the last try's COMMIT landed
                st.add_step(s.id, step.to_dict())
                for more in writes:
                    more()

        if wait:
            await self._patient(s, lambda: self._store(write))
        else:
            await self._store(write)
        s.machine.apply(step)

    async def _run_session(self, s: RunningSession) -> None:
        status, reason = "finished", None
        try:
            while True:
                action = s.machine.next_action()
                if isinstance(action, (EndSession, Done)):
                    status, reason = action.status, action.reason
                    break
                if s.stopped:
                    break
                if isinstance(action, Wait):  # cannot happen after recover(): a bug, not a hang
                    raise RuntimeError(f"round {action.index} is in flight with nobody running it")
                s.round_index, s.attempt = action.index, action.attempt
                if isinstance(action, ValidateRound):
                    row = await self._revalidate(s, action)
                else:
                    try:
                        row = await self._run_round(s, action)
                    finally:  # committed or failed, the round's spilled updates go
                        await asyncio.to_thread(sweep, self.host.blobs.root / SPILL / s.id)
                await self.host.registry.flush()  # the round's reports are in state.db once it is over
                await self._emit("round", {"session_id": s.id, **row})
                if action.index == 1 and row["status"] != "succeeded" and not row.get("participants") and not s.stopped:
                    # Round 1 waited its timeout for min_clients in vain: the clients the
                    # session needs never came, so every other round would fail the same way.
                    status, reason = "failed", f"round 1: {row['reason']}"
                    break
                if s.storage_failure is not None:  # the next round would fail the same way
                    status, reason = "failed", f"round {action.index}: {s.storage_failure}"
                    break
            if s.stopped and s.storage_failure is None:
                status, reason = "stopped", s.stop_reason or reason or "stopped"
        except asyncio.CancelledError:
            # The controller shuts down: the session stays "running" in state.db and the
            # next start resumes it. Nothing more is written here, and followers are not
            # told it ended (it did not): their link closes with the controller's, and they
            # say how to follow it again.
            self.running = None
            raise
        except StorageError as exc:  # a full disk: say so, and record the end once it can be
            log.error("session %s: %s", s.id, exc)
            s.storage_failure = exc
            status, reason = "failed", f"round {s.round_index}: {exc}"
        except Exception as exc:  # the role edge: a bug must not leave the session "running"
            log.exception("session %s crashed", s.id)
            status, reason = "failed", f"internal error: {exc}"
        await self._end(s, status, reason)

    async def _end(self, s: RunningSession, status: str, reason: str | None) -> None:
        self.running = None  # first: a failing write below must not block new sessions
        end_model = s.machine.model_id
        failure = s.storage_failure
        self._unrecorded[s.id] = SessionEnd(status, reason, end_model, time.time(), str(failure) if failure else None)
        await self._record_ends()  # session.wait shows the end from _unrecorded (with_end) until it is in the store
        await sfn.close(s)
        if s.machine.ended is None and s.id not in self._unrecorded:
            s.machine.apply(Step(StepKind.SESSION_ENDED, status=status, reason=reason))
        log.info("session %s %s%s", s.id, status, f" ({reason})" if reason else "")
        self.host.obs.session_finished(status)
        with contextlib.suppress(Exception):  # the role edge: the writer logs its own failures
            await self.host.registry.flush()
        self.host.hub.publish(m.SessionEnded(session_id=s.id, status=status, reason=reason))
        await self._emit("session", {"id": s.id, "status": status, "reason": reason})
        s.done.set()

    async def _wait_for_clients(self, s: RunningSession, deadline: float) -> dict[str, list[str]]:
        loop = asyncio.get_running_loop()
        host = self.host
        cfg = s.config
        need = clients_to_wait_for(cfg.clients_per_round, cfg.clients, cfg.min_clients)  # a sample draws from this many
        while True:
            # Counted in O(combiners) while clients keep joining; the sorted lists are built once, at the end.
            n = host.assigner.connected() if cfg.clients is None else None
            if n is None or n >= need or s.stopped or loop.time() >= deadline:
                selected = select_clients(host.assigner.members, host.assigner.ready)  # each name once, where it is
                n = eligible_count(selected, cfg.clients)
                if n >= need or s.stopped or loop.time() >= deadline:
                    return selected
            log.info("waiting for clients: %d connected, %d needed", n, need)
            changed = asyncio.ensure_future(host.registry_event().wait())
            stop = asyncio.ensure_future(s.stop_event.wait())
            await asyncio.wait({changed, stop}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stop.cancel()

    async def _next_event(self, s: RunningSession, index: int, deadline: float) -> tuple[str, Any] | None:
        """The next event of round ``index`` (this try), or None at the deadline; stale ones are dropped."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # What is queued already counts, even past the deadline (wait_for(get(), 0) would miss it).
                kind, value = s.events.get_nowait() if not s.events.empty() else await asyncio.wait_for(s.events.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            if kind in (m.RoundPartial.type, m.RoundUpdate.type, m.ValidateDone.type):
                msg = value[1]
                if msg.round_index != index or getattr(msg, "attempt", s.attempt) != s.attempt:
                    log.info("dropping a stale %s for round %d (try %d)", kind, msg.round_index, getattr(msg, "attempt", 0))
                    continue
            return kind, value

    async def _run_round(self, s: RunningSession, action: RunRound) -> dict[str, Any]:
        from scaleout.core.aggregators import get_aggregator, make_strategy

        host = self.host
        st = host.state
        loop = asyncio.get_running_loop()
        cfg = s.config
        index, attempt, parent = action.index, action.attempt, action.parent
        started, started_at = loop.time(), time.time()  # the round starts now, before it waits for clients
        global_bytes = await host.model_bytes(parent)
        template = payload.describe(global_bytes)
        layout = payload.layout_of(global_bytes)
        selected = await self._wait_for_clients(s, started + cfg.round_timeout)
        selected = {name: clients for name, clients in selected.items() if name in host.combiners}
        # Sampling: the same draw for the same seed, round and connected clients (a restart draws it again).
        selected, left_out = sample_clients(selected, index, cfg.seed or 0, cfg.clients_per_round, cfg.clients)
        await sfn.begin_round(s, host, index)
        selected = await sfn.client_selection(s, host, selected, "training", left_out)  # the server functions choose last
        host.round_members = {name: frozenset(clients) for name, clients in selected.items()}
        participants = sorted(c for clients in selected.values() for c in clients)
        selection = {"selected": participants, "not_selected": left_out}
        retried = s.machine.retries.get(index)
        await self._persist(
            s, s.machine.start_round(action, started_at),
            lambda: st.start_round(s.id, index, parent, participants, started=started_at, attempt=attempt, retried=retried, selection=selection),
        )
        again = f" (try {attempt}: {retried[-1]})" if retried else ""
        out = f", {len(left_out)} not selected" if left_out else ""
        log.info("round %d of session %s: %d clients on %d combiners%s%s", index, s.id, len(participants), len(selected), out, again)
        host.hub.round_started(s.id, index, len(participants), cfg.round_timeout, started + cfg.round_timeout - loop.time(), len(global_bytes))

        def this_round() -> dict[str, Any]:
            return next(r for r in st.rounds(s.id) if r["idx"] == index)

        async def finish(status: str, reason: str | None = None, **extra: Any) -> dict[str, Any]:
            duration = round(loop.time() - started, 3)
            fields = {"status": status, "reason": reason, "duration_s": duration, "finished": time.time(), **extra, **sfn.record(s)}
            kind = StepKind.ROUND_VALIDATED if status == "succeeded" else StepKind.ROUND_FAILED
            try:
                if kind is StepKind.ROUND_VALIDATED and not cfg.validate:  # committed already: only the row's last fields
                    await self._patient(s, lambda: self._store(lambda: st.finish_round(s.id, index, **fields)))
                else:
                    await self._persist(s, Step(kind, index, attempt, reason=reason, at=time.time()), lambda: st.finish_round(s.id, index, **fields))
                row = await self._patient(s, lambda: self._store(this_round))
            except StorageError as exc:  # kept in memory; the session's end records it later
                log.error("round %d: could not record its outcome: %s", index, exc)
                s.storage_failure = s.storage_failure or exc
                row = {"session_id": s.id, "idx": index, "parent": parent, "model_id": None, "participants": participants, "started": started_at, "validation": {}, "selection": selection, **fields}
            log.info("round %d %s in %.2fs%s", index, status, duration, f": {reason}" if reason else "")
            host.obs.round_finished(status, duration)
            host.hub.round_ended({**row, "session_id": s.id})
            return {**row, "index": index}

        # A round that fails before any task was sent had no participants: nobody trained.
        if s.stopped:
            return await finish("failed", "session stopped", participants=[])
        if len(participants) < cfg.min_clients:
            return await finish("failed", f"only {len(participants)} clients connected; at least {cfg.min_clients} needed", participants=[])
        # A combiner reports at its own deadline at the latest; then it encodes its partial: time that grows with the model.
        grace = PARTIAL_GRACE_S + len(global_bytes) / PARTIAL_ENCODE_RATE
        tracker = ControllerRound.start({k: len(v) for k, v in selected.items()}, cfg.min_clients, loop.time(), cfg.round_timeout + grace)
        strategy = sfn.wrap(s, make_strategy(cfg.aggregator, cfg.aggregator_kwargs))
        agg = get_aggregator(cfg.aggregator, template)
        # A strategy that needs each update on its own gets them spilled to disk, not folded.
        spill = Spill(host.blobs.root / SPILL / s.id / f"{index}-{attempt}", template) if strategy.needs_updates else None
        # Events name the link they came from: one from an earlier registration of a combiner
        # (lost and back since) says nothing about this round.
        links = {name: host.combiners[name].link for name in selected}
        settings = {**cfg.settings, **strategy.train_settings()}  # e.g. FedProx's mu, over --settings
        try:
            await self._persist(s, Step(StepKind.TASKS_SENT, index, attempt, at=time.time()))
        except StoreUnreachable as exc:  # for longer than the wait: this round fails, not the session
            return await finish("failed", str(exc), participants=[])
        await failpoint("distribute")  # the round is recorded, its orders not yet out
        settings = await sfn.client_settings(s, settings, global_bytes)  # the server functions over both
        for name, clients in selected.items():
            msg = m.RoundStart(
                session_id=s.id, round_index=index, model_id=parent, count=len(clients),
                timeout=cfg.round_timeout, settings=settings, aggregator=cfg.aggregator, attempt=attempt,
                max_examples=cfg.max_examples_per_client, max_update_norm=cfg.max_update_norm,
                forward_updates=strategy.needs_updates,
            )
            if not await quiet_send(links[name], msg, _names(clients)):  # its link dropped since it was selected
                log.warning("round %d: combiner %s is gone: its %d clients are lost to this round", index, name, len(clients))
                tracker.on_combiner_lost(name)
        contributors: list[str] = []
        timings: dict[str, dict[str, Any]] = {}
        reduce_s = 0.0
        decision = tracker.on_tick(loop.time())
        while decision is None:
            event = await self._next_event(s, index, tracker.next_wakeup)
            if event is None:
                decision = tracker.on_tick(loop.time())
                continue
            kind, value = event
            if kind == "stop":
                return await finish("failed", "session stopped", participants=contributors)
            if kind == "lost":
                name, link = value
                if links.get(name) is link and name in tracker.waiting_for:
                    log.warning("round %d: combiner %s dropped its link: waiting up to %.0fs for it to come back", index, name, COMBINER_GRACE_S)
                    decision = tracker.on_combiner_dropped(name, loop.time(), COMBINER_GRACE_S)
            elif kind == "back":
                name, link, same_run = value
                if name in tracker.away and same_run:  # the same combiner again: its partial comes over this link
                    log.info("round %d: combiner %s is back", index, name)
                    links[name] = link
                    tracker.on_combiner_back(name)
                elif name in tracker.away:  # restarted: what it held of this round is gone
                    log.warning("round %d: combiner %s restarted: its share of this round is lost", index, name)
                    decision = tracker.on_combiner_lost(name)
            elif kind == m.RoundUpdate.type:
                name, msg, link = value
                if spill is None or links.get(name) is not link or name not in tracker.waiting_for:
                    log.info("ignoring an update forwarded by combiner %s that this round does not wait for", name)
                    continue
                began = loop.time()
                try:
                    if await _unless_set(self._pull_update(name, msg, spill, len(global_bytes), tracker.deadline), s.stop_event) is None:
                        return await finish("failed", "session stopped", participants=contributors)
                    await failpoint("collect")  # an update spilled, the round not yet decided
                except LinkClosed:
                    decision = tracker.on_combiner_lost(name)
                    continue
                except (PayloadError, UpdateRejected, ProtocolError, RemoteError, RequestTimeout) as exc:
                    log.error("round %d: update of client %s forwarded by combiner %s refused: %s", index, msg.client, name, exc)
                    continue
                finally:
                    reduce_s += loop.time() - began
            elif kind == m.RoundPartial.type:
                name, msg, link = value
                if links.get(name) is not link or name not in tracker.waiting_for:
                    log.info("ignoring a partial from combiner %s that this round does not wait for", name)
                    continue
                timings[name] = msg.timing if isinstance(msg.timing, dict) else {}
                if spill is not None:  # its updates came one by one: those spilled are its share
                    who = spill.clients_of(name)
                    if len(who) != msg.count:
                        log.warning("round %d: combiner %s counts %d updates; %d were spilled", index, name, msg.count, len(who))
                    if who:
                        try:
                            await self._persist(s, Step(StepKind.PARTIAL_RECEIVED, index, attempt, combiner=name, count=len(who), at=time.time()), wait=False)
                        except StorageError as exc:
                            log.warning("round %d: could not note the updates of combiner %s: %s", index, name, exc)
                    contributors.extend(who)
                    decision = tracker.on_partial(name, len(who))
                    continue
                if msg.count == 0:
                    decision = tracker.on_partial(name, 0)
                    continue
                began = loop.time()
                try:
                    pulled = await _unless_set(self._pull_partial(name, msg, agg, tracker.deadline), s.stop_event)
                    if pulled is None:  # stopped while the partial was on its way
                        return await finish("failed", "session stopped", participants=contributors)
                    count, who = pulled
                except LinkClosed:
                    decision = tracker.on_combiner_lost(name)
                    continue
                except (PayloadError, UpdateRejected, ProtocolError, RemoteError, RequestTimeout) as exc:
                    log.error("partial aggregate from combiner %s refused: %s", name, exc)
                    decision = tracker.on_partial_refused(name, str(exc))
                    continue
                finally:
                    reduce_s += loop.time() - began
                try:  # progress, not a decision: a restart retries the round whole either way (not waited for)
                    await self._persist(s, Step(StepKind.PARTIAL_RECEIVED, index, attempt, combiner=name, count=count, at=time.time()), wait=False)
                except StorageError as exc:
                    log.warning("round %d: could not note the partial of combiner %s: %s", index, name, exc)
                contributors.extend(who)
                decision = tracker.on_partial(name, count)
                await failpoint("collect")  # a partial folded in, the round not yet decided
        if decision.outcome is Outcome.FAILED:
            return await finish("failed", decision.reason, participants=sorted(contributors))
        committing = loop.time()
        record: dict[str, Any] = {}
        try:
            if spill is not None:
                new_bytes, state_bytes, new_state, record = await asyncio.to_thread(_aggregate_step, strategy, spill, set(contributors), global_bytes, layout, s.server_state)
            else:
                new_bytes, state_bytes, new_state = await asyncio.to_thread(_server_step, strategy, agg, global_bytes, layout, s.server_state)
        except (PayloadError, UpdateRejected) as exc:  # e.g. a mean beyond float32: never commit inf
            log.error("round %d: aggregate not committed: %s", index, exc)
            return await finish("failed", str(exc), participants=sorted(contributors))
        try:
            # Files first, then the rows that name them: a kill between the two leaves a file
            # no row names, which the next start sweeps (store/blobs.py), never a row without its file.
            # (Each blob is one transaction: stored whole or not at all; one stored already is kept.)
            new_size = len(new_bytes)
            model_id = await self._patient(s, functools.partial(asyncio.to_thread, host.blobs.put, MODEL[0], new_bytes, MODEL[1]))
            state_id = await self._patient(s, lambda: asyncio.to_thread(host.blobs.put, STATE[0], state_bytes, STATE[1])) if state_bytes else None
            await failpoint("commit")  # the files written, the rows that name them not yet
            # The model, its trail entry, the strategy's state, the round's outcome and its step land in one transaction.
            await self._persist(
                s, Step(StepKind.ROUND_COMMITTED, index, attempt, model_id=model_id, state_id=state_id, at=time.time()),
                lambda: st.commit_round(
                    s.id, index, model_id, new_size, parent=parent, aggregator=cfg.aggregator, contributors=sorted(contributors),
                    server_state=state_id,
                ),
            )
        except StoreUnreachable as exc:  # for longer than the wait: the global model stays, this round fails
            log.error("round %d: could not commit the new global model: %s", index, exc)
            return await finish("failed", str(exc), participants=sorted(contributors))
        except StorageError as exc:  # a full disk: the global model stays, the session ends
            log.error("round %d: could not commit the new global model: %s", index, exc)
            s.storage_failure = exc
            return await finish("failed", str(exc), participants=sorted(contributors))
        s.server_state = new_state
        host.keep_model(model_id, new_bytes)  # the next round's global model: no need to read it back (or hash it again)
        del new_bytes  # its pieces are views of the round's sums: they go now, not at the round's end
        host.hub.publish(m.ModelCommitted(
            model_id=model_id, parent=parent, session_id=s.id, round_index=index, aggregator=cfg.aggregator,
            contributors=len(contributors), size=new_size,
        ))
        log.info("round %d: %d updates aggregated into model %s", index, len(contributors), model_id[:12])
        timing = _round_timing(timings, reduce_s, loop.time() - committing)
        validation: dict[str, float] = {}
        if cfg.validate:
            validate_started = loop.time()
            validators = await sfn.client_selection(s, host, choose_validators(selected, contributors), "validation")
            validation = await self._validate(s, index, model_id, validators)
            timing["validate_s"] = round(loop.time() - validate_started, 4)
            if validation:
                log.info("round %d validation: %s", index, ", ".join(f"{k}={v:.4g}" for k, v in validation.items()))
        extra = {"aggregation": record} if record else {}
        return await finish("succeeded", None, model_id=model_id, participants=sorted(contributors), validation=validation, timing=timing, **extra)

    async def _revalidate(self, s: RunningSession, action: ValidateRound) -> dict[str, Any]:
        """A round committed before a restart, its validation not yet recorded: validate now."""
        host = self.host
        loop = asyncio.get_running_loop()
        selected = await self._wait_for_clients(s, loop.time() + s.config.round_timeout)
        host.round_members = {name: frozenset(clients) for name, clients in selected.items() if name in host.combiners}
        validation = await self._validate(s, action.index, action.model_id, {k: v for k, v in selected.items() if k in host.combiners})
        step = Step(StepKind.ROUND_VALIDATED, action.index, action.attempt, at=time.time())
        await self._persist(s, step, lambda: host.state.finish_round(s.id, action.index, validation=validation))
        row = await self._store(lambda: next(r for r in host.state.rounds(s.id) if r["idx"] == action.index))
        host.hub.round_ended({**row, "session_id": s.id})
        return {**row, "index": action.index}

    async def _pull_partial(self, name: str, msg: m.RoundPartial, agg: Any, deadline: float) -> tuple[int, list[str]]:
        """Fetch a combiner's partial when this round can fold it (one at a time, so the
        controller holds one partial, not one per combiner), and fold it in a thread.

        The announce must fit the round: at most as many updates as the combiner was given
        clients, and a size the model's template allows (`partial_size_range`), else it is
        refused before anything is pulled. The pull ends by the round's ``deadline`` (a few
        seconds more for a partial announced at the last moment) and is given up when no
        byte of it arrives for PULL_STALL_S."""
        from scaleout.core.aggregators.base import partial_size_range

        host = self.host
        c = host.combiners.get(name)
        if c is None:
            raise LinkClosed(name, "combiner gone")
        given = len(host.round_members.get(name, frozenset()))
        if not 0 < msg.count <= given:
            raise PayloadError(f"partial aggregate of {msg.count} updates announced; the combiner was given {given} clients")
        least, most = partial_size_range(agg.template, msg.count)
        if not least <= msg.size <= min(most, host.max_payload):
            raise PayloadError(
                f"partial aggregate of {msg.size} bytes announced; one of {msg.count} updates to this model has {least} to {min(most, host.max_payload)}"
            )
        args = {"session_id": msg.session_id, "round_index": msg.round_index}
        blob = await _watched_request(c.link, "partial.get", args, msg.size, deadline, "partial")
        host.obs.moved("in", "partial", len(blob))
        partial = await asyncio.to_thread(_fold_partial, agg, blob, msg.count, host.round_members.get(name, frozenset()))
        return partial.count, partial.contributors  # the partial's bytes go now, not at the round's end

    async def _pull_update(self, name: str, msg: m.RoundUpdate, spill: Spill, model_size: int, deadline: float) -> bool:
        """Fetch one update a combiner forwarded (one at a time: the controller holds one
        update, whatever the number of clients) and spill it to disk in a thread. It must be
        of a client that combiner was given this round, not seen before, and about the
        model's size (it comes in the model's dtypes)."""
        host = self.host
        c = host.combiners.get(name)
        if c is None:
            raise LinkClosed(name, "combiner gone")
        if msg.client not in host.round_members.get(name, frozenset()):
            raise UpdateRejected(f"combiner {name} forwarded an update of {msg.client}, a client it was not given this round")
        if msg.client in spill.entries:
            raise UpdateRejected(f"a second update of {msg.client} in this round")
        if not 0 < msg.num_examples or not 0 < msg.size <= min(model_size + SPILL_SLACK, host.max_payload):
            raise PayloadError(f"an update of {msg.size} bytes and {msg.num_examples} examples announced; the model has {model_size} bytes")
        args = {"session_id": msg.session_id, "round_index": msg.round_index, "client": msg.client}
        blob = await _watched_request(c.link, "update.get", args, msg.size, deadline, "update")
        host.obs.moved("in", "update", len(blob))
        metadata = msg.metadata if isinstance(msg.metadata, dict) else {}
        await asyncio.to_thread(spill.add, name, msg.client, msg.num_examples, metadata, blob)
        log.info("round %d: update of %s spilled to disk (%d of this round)", msg.round_index, msg.client, len(spill.entries))
        return True

    async def _validate(self, s: RunningSession, index: int, model_id: str, selected: dict[str, list[str]]) -> dict[str, float]:
        host = self.host
        loop = asyncio.get_running_loop()
        waiting = set()
        for name, clients in selected.items():
            c = host.combiners.get(name)
            msg = m.RoundValidate(session_id=s.id, round_index=index, model_id=model_id, count=len(clients), timeout=s.config.round_timeout)
            if c is not None and await quiet_send(c.link, msg, _names(clients)):
                waiting.add(name)
        deadline = loop.time() + s.config.round_timeout + PARTIAL_GRACE_S
        while waiting and loop.time() < deadline:
            event = await self._next_event(s, index, deadline)
            if event is None:
                break
            kind, value = event
            if kind == "stop":
                s.events.put_nowait((kind, value))
                break
            if kind == "lost" or kind == m.ValidateDone.type:
                waiting.discard(value[0])
        await host.registry.flush()  # the reports that came in with the validations
        rows = await asyncio.to_thread(host.registry.reports, s.id, index, "validate")
        return mean_metrics(r["data"] for r in rows if not r["error"])


def _names(clients: list[str]) -> bytes:
    """A round's client list as the payload of its message (never one capped frame)."""
    return json.dumps(clients, separators=(",", ":")).encode()


def _round_timing(combiners: dict[str, dict[str, Any]], reduce_s: float, commit_s: float) -> dict[str, float]:
    """Where a round's time went: the slowest combiner's distribute / train / collect, then
    the controller's reduce (pulling and folding partials) and commit (server step, writes)."""
    out: dict[str, float] = {}
    for key in ("distribute_s", "train_s", "collect_s"):
        values = [float(t[key]) for t in combiners.values() if isinstance(t.get(key), (int, float)) and math.isfinite(t[key])]
        out[key] = round(max(values), 4) if values else 0.0
    out["reduce_s"] = round(reduce_s, 4)
    out["commit_s"] = round(commit_s, 4)
    return out


def _server_step(strategy: Any, agg: Any, global_bytes: bytes, layout: str, state: dict[str, Any]) -> tuple[Pieces, bytes | None, dict[str, Any]]:
    """The strategy's step from the round's mean to the next global model (off the event
    loop): (the model as pieces, state bytes or None when the strategy keeps none, state).
    The pieces are its header and views of the arrays (the sums divided in place, for
    FedAvg): written to the model's file as they are, never joined into a second copy."""
    model, new_state = strategy.step(payload.views(global_bytes), agg.mean(in_place=True), state)
    state_bytes = payload.encode_named(new_state, "dict") if new_state else None
    return Pieces(payload.encode_named_pieces(model, layout)), state_bytes, new_state


def _aggregate_step(strategy: Any, spill: Spill, contributors: set[str], global_bytes: bytes, layout: str, state: dict[str, Any]) -> tuple[Pieces, bytes | None, dict[str, Any], dict[str, Any]]:
    """A ``needs_updates`` strategy's step over the round's spilled updates, memory-mapped
    (off the event loop): (model bytes, state bytes or None, state, what the strategy asks
    to record on the round). Only ``contributors`` count: an update spilled from a combiner
    lost before its share was complete is left out. The spill files go as soon as it is
    done, committed or not."""
    import secrets

    import numpy as np

    try:
        if getattr(strategy, "needs_seed", False) and "dp/seed" not in state:
            # Noise for differential privacy: 128 secret bits, kept with the session's state.
            state = {**state, "dp/seed": np.frombuffer(secrets.token_bytes(16), dtype=np.uint32).copy()}
        with spill.updates(contributors) as updates:
            model, new_state = strategy.aggregate(payload.views(global_bytes), updates, state)
    finally:
        spill.remove()
    state_bytes = payload.encode_named(new_state, "dict") if new_state else None
    return Pieces(payload.encode_named_pieces(model, layout)), state_bytes, new_state, dict(getattr(strategy, "last_record", None) or {})


async def _watched_request(link: Link, op: str, args: dict[str, Any], size: int, deadline: float, what: str) -> bytes:
    """Pull ``size`` announced bytes from a combiner with ``op``, as long as bytes keep
    coming: ended by the round's ``deadline`` (PARTIAL_GRACE_S more for one announced at
    the last moment) and given up when none arrives for PULL_STALL_S. It sleeps until the
    reply lands or the next moment one of those limits could be reached, not every second."""
    loop = asyncio.get_running_loop()
    link.max_payload = size
    link.writable_payloads = True  # a partial's buffer may become the round's sums (FedAvg.add_partial)
    request = asyncio.ensure_future(link.request(op, args, timeout=transfer_timeout(size)))
    until = max(deadline, loop.time() + PARTIAL_GRACE_S)
    seen, since = link.received_bytes, loop.time()
    try:
        while True:
            wake = min(since + PULL_STALL_S, until)
            done, _ = await asyncio.wait({request}, timeout=max(0.0, wake - loop.time()))
            if done:
                _, blob = request.result()
                break
            now = loop.time()
            if link.received_bytes != seen:
                seen, since = link.received_bytes, max(since, link.received_at)
            elif now - since >= PULL_STALL_S:
                raise PayloadError(f"combiner sent nothing of its {what} for {PULL_STALL_S:g} s")
            if now >= until:
                raise PayloadError(f"its {what} was still arriving at the round's deadline")
    finally:
        if not request.done():
            request.cancel()
        link.max_payload = SMALL_PAYLOAD
        link.writable_payloads = False
    if blob is None or len(blob) != size:
        raise PayloadError(f"combiner announced a {what} of {size} bytes and sent {0 if blob is None else len(blob)}")
    return blob


def _fold_partial(agg: Any, blob: bytes, count: int, members: frozenset[str]) -> Any:
    """Decode a combiner's partial and add it to the round's aggregate (off the event loop);
    a partial naming clients this combiner was not given this round is refused, unfolded."""
    from scaleout.core.aggregators import decode_partial

    partial = decode_partial(blob)
    if partial.count != count:
        raise PayloadError(f"partial says {partial.count} updates, message says {count}")
    strangers = sorted(set(partial.contributors) - members)
    if strangers or len(set(partial.contributors)) != len(partial.contributors):
        what = f"clients it was not given this round ({', '.join(strangers[:5])})" if strangers else "a client twice"
        raise UpdateRejected(f"partial aggregate names {what}")
    if partial.count:
        agg.add_partial(partial)
    return partial


async def _unless_set(step: Awaitable[T], event: asyncio.Event) -> T | None:
    """Await ``step`` unless ``event`` is set first (then cancel it and return None)."""
    task = asyncio.ensure_future(step)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # the role edge: it was abandoned
            await task
        return None
    return task.result()


async def quiet_send(link: Link, msg: m.Message, blob: bytes | None = None) -> bool:
    """Send (with a payload), reporting a closed link as False rather than raising."""
    try:
        await link.send_with_blob(msg, blob) if blob is not None else await link.send(msg)
        return True
    except Exception as exc:  # the role edge: a dead peer must not stop the round
        log.warning("could not send %s to %s: %s", msg.type, link.peer, exc)
        return False
