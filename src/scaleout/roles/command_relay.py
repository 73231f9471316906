"""The combiner's side of custom commands, predictions, client logs and package updates.

A CommandStart from the controller becomes one CommandTask per client (a prediction's
model travels with it, fetched once from the controller); each client's CommandResult goes
back up, bounded in size, with the client's name set here (a client cannot speak for
another). A client that is not connected, drops, or does not answer by the timeout plus a
grace gets its result here. Attributes, telemetry and package status are relayed up under
the client's metric limits; a PackageChanged goes down to every client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from scaleout.core import commands as cmd
from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.core.errors import LimitExceeded, PayloadError, ProtocolError, ScaleoutError
from scaleout.core.limits import MAX_RESULT_BYTES, MetricGate, check_size, clip_text, json_size, transfer_timeout
from scaleout.roles.common import quietly
from scaleout.transport.link import Incoming, Link

log = logging.getLogger("scaleout.combiner")


@dataclass
class RelayJob:
    msg: m.CommandStart
    tracker: cmd.JobTracker
    timer: asyncio.TimerHandle | None = None
    model: bytes | None = None
    sent: set[str] = field(default_factory=set)


class Combiner(Protocol):
    """What the relay needs of the combiner that owns it (roles/combiner.py)."""

    settings: Any  # roles.combiner.CombinerSettings (max_payload)
    clients: dict[str, Link]
    models: dict[str, bytes]
    controller: Link | None
    sending: asyncio.Semaphore

    def _spawn(self, coro: Any) -> asyncio.Future[Any]: ...


class CommandRelay:
    def __init__(self, combiner: Combiner) -> None:
        self.cb = combiner
        self.jobs: dict[str, RelayJob] = {}
        self._kept: tuple[str, bytes] | None = None  # the model of the last prediction

    # -- from the controller ---------------------------------------------------------------

    async def on_controller(self, inc: Incoming) -> None:
        msg = inc.msg
        if isinstance(msg, m.CommandStart):
            if msg.kind not in cmd.KINDS:
                raise ProtocolError(f"command.start: unknown kind {msg.kind!r:.40}")
            clients = _names(inc.take_blob(), msg.count, inc.blob_error)
            self.cb._spawn(self._start(msg, clients))
        elif isinstance(msg, m.PackageChanged):
            log.info("compute package %s is now active: telling %d clients", msg.package_id[:12], len(self.cb.clients))
            for link in list(self.cb.clients.values()):
                await quietly(link.send(m.PackageChanged(package_id=msg.package_id, name=msg.name)))

    async def _start(self, msg: m.CommandStart, clients: list[str]) -> None:
        loop = asyncio.get_running_loop()
        job = RelayJob(msg, cmd.JobTracker.start(clients, loop.time(), msg.timeout + cmd.RELAY_GRACE_S))
        self.jobs[msg.job_id] = job
        if msg.kind == "predict":
            try:
                job.model = await self._model(str(msg.model_id))
            except (ScaleoutError, OSError) as exc:
                await self._fail(job, clients, cmd.FAILED, f"its combiner could not fetch model {str(msg.model_id)[:12]}: {exc}")
                return
            # The model's travel to each client counts apart from the callback's timeout.
            job.tracker.deadline += transfer_timeout(len(job.model))
        job.timer = loop.call_at(job.tracker.deadline, lambda: self.cb._spawn(self._deadline(job)))
        log.info("%s %s: asking %d clients", msg.kind, msg.job_id, len(clients))
        await asyncio.gather(*(self._send(job, client) for client in clients))

    async def _model(self, model_id: str) -> bytes:
        """The model a prediction runs on: the round's if it is that one, else the one kept
        from the last prediction, else fetched (and kept instead: one model at most)."""
        if model_id in self.cb.models:
            return self.cb.models[model_id]
        if self._kept is not None and self._kept[0] == model_id:
            return self._kept[1]
        assert self.cb.controller is not None
        self._kept = None
        _, data = await self.cb.controller.request("model.get", {"id": model_id}, timeout=transfer_timeout(self.cb.settings.max_payload))
        if data is None or await asyncio.to_thread(payload.model_id, data) != model_id:
            raise PayloadError(f"the controller sent the wrong bytes for model {model_id[:12]}")
        self._kept = (model_id, data)
        return data

    async def _send(self, job: RelayJob, client: str) -> None:
        msg = job.msg
        link = self.cb.clients.get(client)
        if link is None:
            await self._fail(job, [client], cmd.NOT_CONNECTED, "not connected to its combiner when the job started")
            return
        task = m.CommandTask(job_id=msg.job_id, kind=msg.kind, name=msg.name, params=msg.params, model_id=msg.model_id, timeout=msg.timeout)
        try:
            async with self.cb.sending:
                await link.send_with_blob(task, job.model, "model", sha256=msg.model_id)
            job.sent.add(client)
        except ScaleoutError as exc:
            await self._fail(job, [client], cmd.LOST, f"could not send it the job: {exc}")

    async def _deadline(self, job: RelayJob) -> None:
        if self.jobs.get(job.msg.job_id) is not job:
            return
        late = sorted(job.tracker.pending)
        if late:
            log.warning("%s %s: no answer within %gs from %s", job.msg.kind, job.msg.job_id, job.msg.timeout, ", ".join(late[:10]))
        await self._fail(job, late, cmd.TIMEOUT, f"no answer within {job.msg.timeout:g} s (the client did not report back)")

    # -- from clients ----------------------------------------------------------------------

    async def on_client(self, client: str, link: Link, gate: MetricGate, msg: m.Message) -> None:
        if isinstance(msg, m.CommandResult):
            await self._on_result(client, link, msg)
        elif isinstance(msg, m.ClientLog):
            if msg.kind not in ("attributes", "telemetry"):
                raise ProtocolError(f"client.log: kind must be attributes or telemetry, got {msg.kind!r:.40}")
            if msg.kind == "telemetry":
                key, extra = msg.data.get("key"), set(msg.data) - {"key", "payload"}
                if not isinstance(key, str) or not key or extra or not isinstance(msg.data.get("payload", {}), (dict, type(None))):
                    raise ProtocolError('client.log: telemetry is {"key": text, "payload": {...}}')
            if await self._admit(client, link, gate, msg):
                await self._up(m.ClientLog(kind=msg.kind, data=msg.data, client=client))
        elif isinstance(msg, m.ClientStatus):
            error = clip_text(msg.error) if msg.error else None
            package = msg.package if isinstance(msg.package, str) and len(msg.package) <= 80 else None
            if await self._admit(client, link, gate, msg):
                await self._up(m.ClientStatus(package=package, error=error, client=client))

    async def _admit(self, client: str, link: Link, gate: MetricGate, msg: m.Message) -> bool:
        """Under the client's metric limits (size and rate), so it cannot flood the controller."""
        body = msg.data if isinstance(msg, m.ClientLog) else {"package": getattr(msg, "package", None), "error": getattr(msg, "error", None)}
        verdict = gate.offer(json_size(body), asyncio.get_running_loop().time())
        if not verdict.ok and verdict.tell:
            log.warning("client %s: %s", client, verdict.reason)
            await quietly(link.send(m.Error(code=LimitExceeded.code, message=verdict.reason, re=msg.id)))
        return verdict.ok

    async def _on_result(self, client: str, link: Link, msg: m.CommandResult) -> None:
        job = self.jobs.get(msg.job_id)
        if job is None or client not in job.tracker.expected:
            log.info("ignoring a late or unknown result of %s from client %s", msg.job_id, client)
            return
        ok, data, error, code = msg.ok, msg.data, msg.error, msg.code
        if ok:
            try:
                check_size(data, MAX_RESULT_BYTES, f"the {job.msg.kind} result", "return a summary, not data")
            except LimitExceeded as exc:
                await quietly(link.send(m.Error(code=exc.code, message=str(exc), re=msg.id)))
                ok, data, error, code = False, {}, str(exc), cmd.TOO_LARGE
        else:
            data, error = {}, clip_text(error or "failed")
            code = code if code in cmd.REASONS else cmd.FAILED
        duration = msg.duration_s if isinstance(msg.duration_s, float) and msg.duration_s >= 0 else None
        outcome = cmd.Outcome(client, ok, data, error, code, duration)
        if job.tracker.on_outcome(outcome):
            await self._report(job, [outcome])

    def client_gone(self, client: str) -> None:
        for job in list(self.jobs.values()):
            if client in job.tracker.pending:
                self.cb._spawn(self._fail(job, [client], cmd.LOST, "disconnected before it answered"))

    def abandon(self) -> None:
        """The controller that started these jobs is gone (it fails them itself)."""
        for job in self.jobs.values():
            if job.timer is not None:
                job.timer.cancel()
        self.jobs.clear()

    # -- up ------------------------------------------------------------------------------

    async def _fail(self, job: RelayJob, clients: list[str], code: str, error: str) -> None:
        await self._report(job, job.tracker.fail(clients, code, error))

    async def _report(self, job: RelayJob, outcomes: list[cmd.Outcome]) -> None:
        for o in outcomes:
            await self._up(m.CommandResult(job_id=job.msg.job_id, ok=o.ok, data=o.data, error=o.error, code=o.code, duration_s=o.duration_s, client=o.client))
        if job.tracker.done and self.jobs.get(job.msg.job_id) is job:
            del self.jobs[job.msg.job_id]
            if job.timer is not None:
                job.timer.cancel()
            job.model = None

    async def _up(self, msg: m.Message) -> None:
        link = self.cb.controller
        if link is not None:
            await quietly(link.send(msg))


def _names(blob: bytes | None, count: int, error: str | None) -> list[str]:
    if blob is None:
        raise ProtocolError(error or "the job's client list is missing")
    try:
        names = json.loads(blob)
    except (ValueError, RecursionError):
        raise ProtocolError("the job's client list is not JSON") from None
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"the job's client list must be a JSON list of {count} names")
    return names


