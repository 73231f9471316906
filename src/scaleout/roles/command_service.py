"""The controller's side of custom commands, predictions and what clients log about themselves.

A job (``command.run`` with kind ``command`` or ``predict``) goes to each chosen client's
combiner as one CommandStart; combiners send each client a CommandTask and relay every
client's CommandResult. Results are stored per client as they come (store/commands.py);
a job ends when all clients answered or at its deadline (the timeout plus the time a model
takes to travel, plus grace for the relays), when those still silent are recorded as timed
out. A combiner lost meanwhile fails its clients' results as ``lost``.

Writes go to state.db in batches from a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from scaleout.core import commands as cmd
from scaleout.core import messages as m
from scaleout.core.errors import AuthError, ConfigError, ConflictError, LimitExceeded, NotFoundError, ProtocolError, StorageError
from scaleout.core.limits import MAX_ERROR_BYTES, MAX_METRIC_BYTES, MAX_RESULT_BYTES, check_size, clip_text, transfer_timeout
from scaleout.roles.common import new_id

if TYPE_CHECKING:
    from scaleout.roles.admin import Caller
    from scaleout.roles.sessions import CombinerLink as CombinerConn
    from scaleout.store.commands import CommandStore

log = logging.getLogger("scaleout.controller")
FLUSH_S = 0.1  # a batching window for result writes, not a synchronisation
MAX_NAMES_ARG = 10_000  # clients named in one request
MAX_TELEMETRY = 1000  # rows telemetry.ls returns at most
MAX_RETRIES = 50  # flushes a client's info waits for its row in the registry (about 5 s)


@dataclass
class Job:
    id: str
    kind: str
    tracker: cmd.JobTracker
    where: dict[str, str]  # client -> combiner it was asked through
    done: asyncio.Event = field(default_factory=asyncio.Event)
    timer: asyncio.TimerHandle | None = None


class CommandHost(Protocol):
    """What the command service needs of the controller that owns it."""

    dir: Path
    store: Path | str  # state.db or a postgresql:// URL
    state: Any  # store.state.State
    registry: Any  # store.registry.RegistryWriter
    assigner: Any  # core.selection.Assigner
    combiners: dict[str, Any]  # name -> its connection (.link, .url, .clients)

    @property
    def session(self) -> Any: ...  # the running session (its .id), or None


class CommandService:
    def __init__(self, ctl: CommandHost) -> None:
        self.ctl = ctl
        self.jobs: dict[str, Job] = {}
        self.store: CommandStore | None = None
        self._outcomes: dict[str, list[dict[str, Any]]] = {}
        self._ended: dict[str, float] = {}
        self._attributes: dict[str, dict[str, Any]] = {}
        self._status: dict[str, tuple[str | None, str | None]] = {}
        self._telemetry: list[tuple[str, str | None, str, float]] = []
        self._flushing = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._retries: dict[str, int] = {}  # client -> flushes its info waited for its registry row

    def prepare(self) -> None:
        from scaleout.store.commands import CommandStore

        self.store = CommandStore(self.ctl.store)
        n = self.store.interrupt_running("the controller stopped before this client answered")
        if n:
            log.info("%d commands or predictions were still running when the controller stopped: their missing results are marked lost", n)

    async def close(self) -> None:
        for job in self.jobs.values():
            if job.timer is not None:
                job.timer.cancel()
        with contextlib.suppress(StorageError):
            await self.flush()
        if self.store is not None:
            self.store.close()

    # -- admin operations ------------------------------------------------------------------

    async def run(
        self, caller: Caller, *, kind: str, name: str | None, params: dict[str, Any] | None, timeout: float | None, clients: list[str] | None, model: str | None,
    ) -> dict[str, Any]:
        if kind not in cmd.KINDS:
            raise ProtocolError(f"command.run: kind must be one of {', '.join(cmd.KINDS)}")
        name = cmd.check_command_name(name) if kind == "command" else ""
        params = cmd.check_params(params or {})
        timeout = cmd.check_timeout(cmd.DEFAULT_TIMEOUT_S[kind] if timeout is None else timeout)
        wanted = clients
        if wanted is not None and (not isinstance(wanted, list) or not all(isinstance(c, str) for c in wanted) or len(wanted) > MAX_NAMES_ARG):
            raise ProtocolError(f"command.run: clients must be a list of at most {MAX_NAMES_ARG} names, or absent for all")
        ctl = self.ctl
        model_id: str | None = None
        model_size = 0
        if kind == "predict":

            def model_row() -> dict[str, Any]:
                key = model
                if key in (None, "", "active"):
                    key = ctl.state.get_meta("active_model")
                    if key is None:
                        raise ConflictError("no global model yet: set a seed first (scaleout model set-seed FILE)")
                return ctl.state.model(str(key))  # type: ignore[no-any-return]

            row = await asyncio.to_thread(model_row)
            model_id, model_size = row["id"], int(row["size"])
        where = {c: comb for c, comb in ctl.assigner.where.items() if comb in ctl.combiners and ctl.combiners[comb].url}
        failed: dict[str, tuple[str, str]] = {}
        if wanted is None:
            chosen = dict(where)
            if not chosen:
                raise ConflictError("no clients are connected (list them with: scaleout client ls)")
            if kind == "predict":  # the running session's server functions choose who predicts
                from scaleout.roles.serverfunctions import prediction_selection

                chosen = await prediction_selection(ctl.session, ctl, chosen)
        else:
            names = list(dict.fromkeys(m.check_name(c, "client name") for c in wanted))
            if not names:
                raise ConfigError("clients", "name at least one client, or use --all")
            offline = [c for c in names if c not in where]
            assert self.store is not None
            known = await asyncio.to_thread(self._known, offline) if offline else set()
            unknown = [c for c in offline if c not in known]
            if unknown:
                raise NotFoundError("client", ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""), "list them with: scaleout client ls")
            chosen = {c: where[c] for c in names if c in where}
            failed = {c: (cmd.NOT_CONNECTED, "not connected when the job started") for c in offline}
        job_id = new_id("p-" if kind == "predict" else "c-")
        now = time.time()
        record = {"id": job_id, "kind": kind, "name": name, "params": params, "model_id": model_id, "timeout": timeout, "created": now}
        assert self.store is not None
        await asyncio.to_thread(self.store.add_job, record, chosen, failed)
        await asyncio.to_thread(
            ctl.state.audit, caller.actor, f"{kind}.run", address=caller.address, id=job_id, name=name, model=model_id, clients=len(chosen) + len(failed),
        )
        loop = asyncio.get_running_loop()
        travel = transfer_timeout(model_size) if kind == "predict" else 0.0
        wait_s = timeout + travel + cmd.RELAY_GRACE_S + cmd.CONTROLLER_GRACE_S
        job = Job(job_id, kind, cmd.JobTracker.start(chosen, loop.time(), wait_s), dict(chosen))
        self.jobs[job_id] = job
        by_combiner: dict[str, list[str]] = {}
        for client, comb in sorted(chosen.items()):
            by_combiner.setdefault(comb, []).append(client)
        for comb, clients in by_combiner.items():
            msg = m.CommandStart(job_id=job_id, kind=kind, name=name, params=params, model_id=model_id, count=len(clients), timeout=timeout)
            c = ctl.combiners.get(comb)
            sent = False
            if c is not None:
                with contextlib.suppress(Exception):  # the role edge: a dead combiner fails its clients below
                    await c.link.send_with_blob(msg, json.dumps(clients, separators=(",", ":")).encode())
                    sent = True
            if not sent:
                self._fail(job, clients, cmd.LOST, f"could not reach its combiner {comb}")
        log.info("%s %s%s started on %d clients (%d not connected)", kind, job_id, f" {name!r}" if name else "", len(chosen), len(failed))
        if job.tracker.done:
            self._end(job)
        else:
            job.timer = loop.call_at(job.tracker.deadline, self._on_deadline, job)
        return {"job": {**record, "clients": len(chosen) + len(failed), "connected": len(chosen)}}

    def _known(self, names: list[str]) -> set[str]:
        assert self.store is not None
        with self.store.lock:
            found: set[str] = set()
            for i in range(0, len(names), 500):
                part = names[i : i + 500]
                rows = self.store.db.execute(f"SELECT name FROM clients WHERE name IN ({','.join('?' * len(part))})", part)
                found |= {r[0] for r in rows}
            return found

    async def ls(self, *, kind: str, limit: int) -> dict[str, Any]:
        kind = _kind(kind)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 100_000:
            raise ProtocolError("command.ls: limit must be a whole number from 1 to 100000")
        await self.flush()
        assert self.store is not None
        return {"jobs": await asyncio.to_thread(self.store.jobs, kind, limit)}

    async def show(self, *, kind: str, id: str | None) -> dict[str, Any]:
        kind = _kind(kind)
        key = id or "latest"
        if not isinstance(key, str):
            raise ProtocolError("command.show: id must be text")
        await self.flush()
        assert self.store is not None
        return {"job": await asyncio.to_thread(self.store.job, kind, key)}

    async def wait(self, *, kind: str, id: str) -> dict[str, Any]:
        """Return a job once every client answered or its deadline passed."""
        kind = _kind(kind)
        key = id
        if not isinstance(key, str) or not key:
            raise ProtocolError("command.wait: id must be a job id")
        assert self.store is not None
        job_id = (await asyncio.to_thread(self.store.job, kind, key))["id"]
        job = self.jobs.get(job_id)
        if job is not None:
            await job.done.wait()
        await self.flush()
        return {"job": await asyncio.to_thread(self.store.job, kind, job_id)}

    async def client_show(self, *, name: str) -> dict[str, Any]:
        name = m.check_name(name, "client name")
        await self.ctl.registry.flush()
        await self.flush()
        assert self.store is not None
        row = await asyncio.to_thread(self.store.client, name)
        row["connected_to"] = self.ctl.assigner.where.get(name)
        return {"client": row}

    async def telemetry_ls(self, *, client: str | None, key: str | None, limit: int) -> dict[str, Any]:
        if client is not None:
            m.check_name(client, "client name")
        if key is not None and not isinstance(key, str):
            raise ProtocolError("telemetry.ls: key must be text")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_TELEMETRY:
            raise ProtocolError(f"telemetry.ls: limit must be a whole number from 1 to {MAX_TELEMETRY}")
        await self.flush()
        assert self.store is not None
        rows, total = await asyncio.to_thread(self.store.telemetry_page, client, key, limit)
        return {"telemetry": rows, "total": total}

    # -- from combiners --------------------------------------------------------------------

    def on_message(self, c: CombinerConn, msg: m.Message) -> None:
        if isinstance(msg, (m.ClientLog, m.ClientStatus)) and msg.client not in c.clients:
            # Only the combiner a client proved itself attached to speaks for it.
            raise AuthError(f"combiner {c.name} may not speak for client {msg.client!r:.60}: not one of its clients")
        if isinstance(msg, m.CommandResult):
            self._on_result(c, msg)
        elif isinstance(msg, m.ClientLog):
            self._on_log(c, msg)
        elif isinstance(msg, m.ClientStatus):
            client = m.check_name(msg.client, "client.status: client")
            package = msg.package if isinstance(msg.package, str) and len(msg.package) <= 80 else None
            error = clip_text(msg.error) if msg.error else None
            self._status[client] = (package, error)
            if error:
                log.error("client %s cannot load compute package %s: %s", client, (package or "?")[:12], error)
            else:
                log.debug("client %s runs compute package %s", client, (package or "?")[:12])
            self._schedule()

    def _on_result(self, c: CombinerConn, msg: m.CommandResult) -> None:
        client = m.check_name(msg.client, "command.result: client")
        job = self.jobs.get(msg.job_id)
        if job is None or job.where.get(client) != c.name:
            log.info("ignoring a late or unknown result of %s from %s on combiner %s", msg.job_id, client, c.name)
            return
        data, error, code = msg.data, msg.error, msg.code
        if msg.ok:
            try:
                check_size(data, MAX_RESULT_BYTES, f"the {job.kind} result")
            except LimitExceeded as exc:
                data, error, code = {}, str(exc), cmd.TOO_LARGE
        ok = msg.ok and error is None
        if not ok:
            error = clip_text(error or "failed", MAX_ERROR_BYTES)
            code = code if code in cmd.REASONS else cmd.FAILED
            log.warning("%s %s: client %s: %s", job.kind, job.id, client, error)
        duration = msg.duration_s if isinstance(msg.duration_s, float) and 0 <= msg.duration_s < 1e9 else None
        outcome = cmd.Outcome(client, ok, data if ok else {}, None if ok else error, None if ok else code, duration)
        if job.tracker.on_outcome(outcome):
            self._queue(job, [outcome])
            if job.tracker.done:
                self._end(job)

    def _on_log(self, c: CombinerConn, msg: m.ClientLog) -> None:
        client = m.check_name(msg.client, "client.log: client")
        try:
            check_size(msg.data, MAX_METRIC_BYTES, f"a {msg.kind} message")
        except LimitExceeded as exc:
            log.warning("combiner %s: client %s: %s: dropped", c.name, client, exc)
            return
        if msg.kind == "attributes":
            merged = {**self._attributes.get(client, {}), **msg.data}
            self._attributes[client] = merged
        elif msg.kind == "telemetry":
            key = msg.data.get("key")
            if not isinstance(key, str) or not key:
                raise ProtocolError("client.log: telemetry needs a key")
            session = self.ctl.session.id if self.ctl.session is not None else None
            payload = msg.data.get("payload")
            value = payload.get("value") if isinstance(payload, dict) else None
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            # Also in the shape metric ls reads ({"metrics": {...}, "step": ...}): `metric ls --telemetry`.
            body = {"key": key, "payload": payload, "metrics": {key: value} if number else {}, "step": None}
            self._telemetry.append((client, session, m.to_json(body), time.time()))
        else:
            raise ProtocolError(f"client.log: kind must be attributes or telemetry, got {msg.kind!r:.40}")
        self._schedule()

    def combiner_gone(self, name: str) -> None:
        for job in list(self.jobs.values()):
            lost = [c for c, comb in job.where.items() if comb == name]
            if lost:
                self._fail(job, lost, cmd.LOST, f"its combiner {name} disconnected before it answered")

    async def package_changed(self, digest: str, name: str) -> None:
        """Tell every combiner (which tells its clients) that a new package is active."""
        for c in list(self.ctl.combiners.values()):
            with contextlib.suppress(Exception):  # the role edge: a dead combiner's clients learn it when they reconnect
                await c.link.send(m.PackageChanged(package_id=digest, name=name))

    # -- bookkeeping -----------------------------------------------------------------------

    def _fail(self, job: Job, clients: list[str], code: str, error: str) -> None:
        outcomes = job.tracker.fail(clients, code, error)
        if outcomes:
            self._queue(job, outcomes)
        if job.tracker.done and job.id in self.jobs:
            self._end(job)

    def _on_deadline(self, job: Job) -> None:
        if self.jobs.get(job.id) is not job:
            return
        outcomes = job.tracker.on_tick(asyncio.get_running_loop().time(), "no answer came back in time (the client or its combiner went silent)")
        if outcomes:
            log.warning("%s %s: no answer from %s", job.kind, job.id, ", ".join(o.client for o in outcomes[:10]))
            self._queue(job, outcomes)
        self._end(job)

    def _end(self, job: Job) -> None:
        if self.jobs.pop(job.id, None) is None:
            return
        if job.timer is not None:
            job.timer.cancel()
        counts = {"ok": sum(o.ok for o in job.tracker.outcomes.values())}
        counts["error"] = len(job.tracker.outcomes) - counts["ok"]
        log.info("%s %s finished: %d ok, %d failed", job.kind, job.id, counts["ok"], counts["error"])
        self._ended[job.id] = time.time()
        self._outcomes.setdefault(job.id, [])
        # Waiters read the stored job: set done once the write is through.
        task = asyncio.ensure_future(self._end_written(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_written(self, job: Job) -> None:
        try:
            await self.flush()
        finally:
            job.done.set()

    def _queue(self, job: Job, outcomes: list[cmd.Outcome]) -> None:
        now = time.time()
        self._outcomes.setdefault(job.id, []).extend(
            {"client": o.client, "ok": o.ok, "data": o.data, "error": o.error, "code": o.code, "duration_s": o.duration_s, "finished": now}
            for o in outcomes
        )
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(FLUSH_S, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the role edge: log, never lose it
            log.error("could not record command results: %s", task.exception())

    async def flush(self) -> None:
        """Write what is queued (in a thread); a read after it sees everything queued before."""
        async with self._flushing:
            outcomes, self._outcomes = self._outcomes, {}
            ended, self._ended = self._ended, {}
            attributes, self._attributes = self._attributes, {}
            status, self._status = self._status, {}
            telemetry, self._telemetry = self._telemetry, []
            if not (outcomes or ended or attributes or status or telemetry):
                return
            assert self.store is not None
            store = self.store

            if attributes or status:
                await self.ctl.registry.flush()  # the rows of clients that just joined

            def write() -> set[str]:
                for job_id in outcomes.keys() | ended.keys():
                    store.record(job_id, outcomes.get(job_id, []), ended.get(job_id))
                return store.client_info(attributes, status, telemetry) if attributes or status or telemetry else set()

            missing = await asyncio.to_thread(write)
            for client in missing:  # not recorded as joined yet: kept for the next flush (a few times)
                tries = self._retries.get(client, 0) + 1
                if tries > MAX_RETRIES:
                    log.warning("client %s: dropping its attributes and status: it is not in the registry", client)
                    self._retries.pop(client, None)
                    continue
                self._retries[client] = tries
                if client in attributes:
                    self._attributes[client] = {**attributes[client], **self._attributes.get(client, {})}
                if client in status:
                    self._status.setdefault(client, status[client])
            for client in (attributes.keys() | status.keys()) - missing:
                self._retries.pop(client, None)
            if missing:
                self._schedule()


def _kind(kind: Any) -> str:
    if kind not in cmd.KINDS:
        raise ProtocolError(f"kind must be one of {', '.join(cmd.KINDS)}")
    return str(kind)
