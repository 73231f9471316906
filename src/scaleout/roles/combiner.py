"""The combiner: serves clients, hands them tasks, folds their updates into a partial."""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.core.errors import AuthError, LimitExceeded, PayloadError, ProtocolError, ScaleoutError, Superseded, UpdateRejected
from scaleout.core.limits import MAX_RESULT_BYTES, MetricGate, check_size, clip_text, json_size, metric_body
from scaleout.core.rounds import CombinerRound
from scaleout.core.updates import read_num_examples
from scaleout.roles.common import announce, bracket, cert_names, new_id, url_host
from scaleout.security import tls, tokens
from scaleout.transport.link import DEFAULT_MAX_PAYLOAD, Incoming, Link, LinkClosed
from scaleout.transport.net import backoff, connect, serve

log = logging.getLogger("scaleout.combiner")

# What a client link may hold: one payload at a time, and only a small one unless the
# current train round awaits an update from that client (then twice the model, since
# an update may be float64 for a float32 model, plus room for the header).
CLIENT_IN_FLIGHT = 1
CLIENT_IDLE_PAYLOAD = 1 << 20
UPDATE_SLACK = 1 << 20
DECODE_SLOTS = 2  # updates decoded at once
RECONNECT_GRACE_S = 10.0  # how long a round keeps waiting for a client whose link dropped


@dataclass
class CombinerSettings:
    controller: str
    token: str
    ca: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    name: str = ""
    advertise: str | None = None  # the host clients should dial, when it differs from --host
    san: list[str] = field(default_factory=list)  # more names for its certificate
    insecure: bool = False
    data_dir: Path | None = None
    max_payload: int = DEFAULT_MAX_PAYLOAD


@dataclass
class Job:
    """One round (train or validate) as this combiner sees it."""

    kind: str
    session_id: str
    round_index: int
    model_id: str
    tracker: CombinerRound
    tasks: dict[str, str] = field(default_factory=dict)  # task id -> client
    agg: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # agg.add and its tracker update vs. _complete
    timer: asyncio.TimerHandle | None = None
    update_limit: int = 0  # bytes a selected client may send as its update (train only)
    settings: dict[str, Any] = field(default_factory=dict)


class Combiner:
    def __init__(self, settings: CombinerSettings) -> None:
        self.settings = settings
        self.name = settings.name or f"combiner-{socket.gethostname()}-{new_id()[:4]}"
        self.clients: dict[str, Link] = {}
        self.jobs: dict[str, Job] = {}  # by kind: at most one train and one validate job
        self.models: dict[str, bytes] = {}
        self.controller: Link | None = None
        self.verifier: tokens.TokenVerifier | None = None
        self.stopping = False
        self.background: set[asyncio.Future[Any]] = set()
        self.decoding = asyncio.Semaphore(DECODE_SLOTS)
        self.left_at: dict[str, float] = {}  # client -> when its link last dropped

    async def _register(self, ctx: Any, csr: str | None) -> tuple[asyncio.Task[None], dict[str, Any]]:
        """Connect to the controller and register; returns the link's reader and the reply."""
        s = self.settings
        link = await connect(s.controller, s.token, ctx, max_payload=s.max_payload)
        reader = asyncio.create_task(link.run(on_message=self._on_controller))
        args: dict[str, Any] = {"name": self.name}
        if csr is not None:
            args["csr"] = csr
        try:
            result, _ = await link.request("combiner.register", args, timeout=30)
        except BaseException:
            await link.ws.close()
            reader.cancel()
            raise
        self.controller = link
        return reader, result

    async def _reconnect(self, ctx: Any, url: str, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """Register again after losing the controller, with backoff; None when stopped."""
        delays = backoff()
        while not stop.is_set():
            try:
                reader, _ = await self._register(ctx, None)
                assert self.controller is not None
                await self.controller.request("combiner.ready", {"url": url}, timeout=30)
                await self._send_status()
                log.info("reconnected to the controller at %s", self.settings.controller)
                return reader
            except AuthError:
                raise
            except (ScaleoutError, OSError) as exc:
                log.warning("controller not reachable yet: %s", exc)
            try:
                await asyncio.wait_for(stop.wait(), next(delays))
            except asyncio.TimeoutError:
                pass
        return None

    async def _abandon_jobs(self) -> None:
        """The controller that gave us these rounds is gone: stop their tasks."""
        for job in list(self.jobs.values()):
            self._drop(job)
            for link in list(self.clients.values()):
                await _quiet(link.send(m.TaskAbort(session_id=job.session_id)))

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        ctx = None if s.insecure else tls.client_context(s.ca)
        advertised_host, dial_port = split_host_port(s.advertise) if s.advertise else (None, None)
        dial_host = advertised_host or url_host(s.host).strip("[]")
        if not s.advertise and s.host in ("0.0.0.0", "::", ""):
            # Listening everywhere: clients on other machines need a name, not loopback.
            dial_host = socket.gethostname()
            log.info("clients will dial %s (pass --advertise HOST to give them another name)", dial_host)
        key_pem = b""
        csr: str | None = None
        if not s.insecure:
            csr_pem, key_pem = tls.make_csr(cert_names(s.host, [dial_host, *s.san]), self.name)
            csr = csr_pem.decode()
        reader, result = await self._register(ctx, csr)
        assert self.controller is not None
        self.verifier = tokens.TokenVerifier(str(result["token_public_key"]).encode())
        server_ctx = None
        tmp = None
        if not s.insecure:
            if s.data_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="scaleout-combiner-")
            cert_dir = s.data_dir or Path(tmp.name)  # type: ignore[union-attr]
            cert_dir.mkdir(parents=True, exist_ok=True)
            tls.write_private(cert_dir / "combiner.key", key_pem)
            (cert_dir / "combiner.pem").write_text(result["cert"])
            server_ctx = tls.server_context(cert_dir / "combiner.pem", cert_dir / "combiner.key")
        server, port = await serve(self._on_client, self._authenticate, s.host, s.port, server_ctx, max_payload=self._client_limit(None))
        scheme = "ws" if s.insecure else "wss"
        url = f"{scheme}://{bracket(dial_host)}:{dial_port or port}"
        await self.controller.request("combiner.ready", {"url": url}, timeout=30)
        announce(f"{scheme}://{bracket(s.host)}:{port}")
        log.info("combiner %s registered with %s", self.name, s.controller)
        stopping = asyncio.ensure_future(stop.wait())
        current: asyncio.Task[None] | None = reader
        try:
            while current is not None:
                done, _ = await asyncio.wait({stopping, current}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    break
                assert self.controller is not None
                if self.controller.ws.close_code == m.CLOSE_SUPERSEDED:
                    raise Superseded(f"another combiner registered as {self.name!r}: this one stops (give each combiner its own --name)")
                log.warning("lost the connection to the controller at %s: reconnecting (clients stay connected)", s.controller)
                await self._abandon_jobs()
                current = await self._reconnect(ctx, url, stop)
        finally:
            self.stopping = True
            stopping.cancel()
            server.close()
            await self.controller.ws.close()
            if current is not None:
                current.cancel()
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
            if tmp is not None:
                tmp.cleanup()

    def _authenticate(self, token: str | None) -> tokens.TokenClaims:
        if not token:
            raise AuthError("no token given")
        assert self.verifier is not None
        return self.verifier.verify(token, time.time(), roles={"client"})

    # -- clients --------------------------------------------------------------------------

    async def _on_client(self, link: Link) -> None:
        name: str | None = None
        gate = MetricGate()  # this link's metric size and rate limits
        link.max_in_flight = CLIENT_IN_FLIGHT
        link.max_payload = self._client_limit(None)

        async def on_message(inc: Incoming) -> None:
            nonlocal name
            msg = inc.msg
            if name is None:
                if not isinstance(msg, m.Hello):
                    raise ProtocolError("say hello first")
                m.check_name(msg.name, "client name")
                old = self.clients.get(msg.name)
                if old is not None:
                    # The newest connection wins: the old one is usually a dead link from
                    # before a restart; a live twin is told why and stops.
                    log.warning("client %s connected again: closing its older connection", msg.name)
                    await _quiet(old.ws.close(m.CLOSE_SUPERSEDED, f"another client connected as {msg.name}"))
                name = msg.name
                self.clients[name] = link
                self._set_client_limit(name)  # back mid-round: its update is still welcome
                log.info("client %s connected (%d clients)", name, len(self.clients))
                await self._send_status()
                await self._resume(name, link, msg.task_id)
            elif isinstance(msg, m.TaskResult):
                await self._on_result(name, inc)
            elif isinstance(msg, m.Metric):
                job = self._job_of(msg.task_id)
                if job is not None:
                    await self._on_metric(name, link, gate, job, msg)
            else:
                raise ProtocolError(f"a client may not send {msg.type}")

        try:
            await link.run(on_message=on_message)
        finally:
            if name is not None and self.clients.get(name) is link:
                del self.clients[name]
                log.info("client %s disconnected (%d clients)", name, len(self.clients))
                if link.ws.close_code in (1000, 1001):  # it said goodbye: no blip to wait out
                    for job in list(self.jobs.values()):
                        if job.tracker.on_client_lost(name):
                            await self._complete(job)
                else:
                    self._grace(name)
                await self._send_status()

    async def _on_metric(self, client: str, link: Link, gate: MetricGate, job: Job, msg: m.Metric) -> None:
        """Forward a metric within the limits; a drop is logged and told once per burst."""
        body = metric_body(msg.metrics, msg.step)
        verdict = gate.offer(json_size(body), asyncio.get_running_loop().time())
        if not verdict.ok:
            if verdict.tell:
                log.warning("client %s: %s", client, verdict.reason)
                await _quiet(link.send(m.Error(code=LimitExceeded.code, message=verdict.reason, re=msg.id)))
            return
        if verdict.dropped_before:
            log.info("client %s: metrics are forwarded again (%d were dropped)", client, verdict.dropped_before)
        await self._report("metric", job, client, body, None)

    def _grace(self, name: str) -> None:
        """A client lost mid-round gets RECONNECT_GRACE_S to come back before it counts as lost:
        on an edge network most drops are blips, and its update is still welcome."""
        loop = asyncio.get_running_loop()
        left = self.left_at[name] = loop.time()
        for job in list(self.jobs.values()):
            if name not in job.tracker.pending:
                continue
            delay = max(0.0, min(RECONNECT_GRACE_S, job.tracker.deadline - loop.time()))
            log.info("round %d: waiting up to %.0fs for %s to reconnect", job.round_index, delay, name)
            loop.call_later(delay, self._spawn_lost_for_good, job, name, left)

    def _spawn_lost_for_good(self, job: Job, name: str, left: float) -> None:
        self._spawn(self._lost_for_good(job, name, left))

    async def _lost_for_good(self, job: Job, name: str, left: float) -> None:
        # Only the timer of the latest absence counts: one from an earlier drop is stale.
        if self.left_at.get(name) != left or name in self.clients or self.jobs.get(job.kind) is not job:
            return
        if job.tracker.on_client_lost(name):
            await self._complete(job)

    async def _resume(self, name: str, link: Link, working_on: str | None) -> None:
        """A client is back: resend tasks it lost, and abort one nobody waits for any more."""
        self.left_at.pop(name, None)
        wanted = False
        for job in list(self.jobs.values()):
            if name not in job.tracker.pending:
                continue
            for task_id, client in job.tasks.items():
                if client != name:
                    continue
                if task_id == working_on:
                    wanted = True
                    log.info("round %d: %s is back and still working on its %s task", job.round_index, name, job.kind)
                else:
                    log.info("round %d: %s is back: sending its %s task again", job.round_index, name, job.kind)
                    self._spawn(self._resend(job, task_id, name))
        if working_on is not None and not wanted:
            await _quiet(link.send(m.TaskAbort(session_id="", task_id=working_on)))

    async def _resend(self, job: Job, task_id: str, name: str) -> None:
        try:
            model = await self._model(job.model_id)
        except ScaleoutError as exc:
            if job.tracker.on_refused(name, f"could not send the task again: {exc}"):
                await self._complete(job)
            return
        if self.jobs.get(job.kind) is job and name in job.tracker.pending:  # still wanted after the fetch
            await self._send_task(job, task_id, name, model, job.settings)

    async def _send_status(self) -> None:
        if self.controller is not None and not self.stopping and self.controller.ws.close_code is None:
            try:
                await self.controller.send(m.CombinerStatus(clients=sorted(self.clients)))
            except Exception as exc:  # the role edge: the reader notices the lost controller
                log.warning("could not report status to the controller: %s", exc)

    def _client_limit(self, client: str | None) -> int:
        """Largest payload ``client`` may send now: an update if the train round awaits one."""
        job = self.jobs.get("train")
        limit = CLIENT_IDLE_PAYLOAD
        if job is not None and client in job.tracker.expected and client not in job.tracker.reported and client not in job.tracker.failed:
            limit = max(limit, job.update_limit)
        return min(limit, self.settings.max_payload)

    def _set_client_limit(self, client: str) -> None:
        link = self.clients.get(client)
        if link is not None:
            link.max_payload = self._client_limit(client)

    def _job_of(self, task_id: str) -> Job | None:
        for job in self.jobs.values():
            if task_id in job.tasks:
                return job
        return None

    # -- rounds -----------------------------------------------------------------------------

    async def _on_controller(self, inc: Incoming) -> None:
        msg = inc.msg
        if isinstance(msg, m.RoundStart):
            self._spawn(self._start_job("train", msg, msg.clients, msg.timeout, msg.settings))
        elif isinstance(msg, m.RoundValidate):
            self._spawn(self._start_job("validate", msg, msg.clients, msg.timeout, {}))
        elif isinstance(msg, m.SessionStop):
            for job in [j for j in self.jobs.values() if j.session_id == msg.session_id]:
                self._drop(job)
            for link in list(self.clients.values()):
                await _quiet(link.send(m.TaskAbort(session_id=msg.session_id)))
        elif isinstance(msg, m.Event):
            pass
        else:
            raise ProtocolError(f"the controller may not send {msg.type} to a combiner")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Future[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the role edge: log, never lose it
            log.error("background task failed", exc_info=task.exception())

    async def _model(self, model_id: str) -> bytes:
        if model_id not in self.models:
            assert self.controller is not None
            _, data = await self.controller.request("model.get", {"id": model_id}, timeout=300)
            if data is None or payload.model_id(data) != model_id:
                raise PayloadError(f"controller sent the wrong bytes for model {model_id[:12]}")
            self.models = {model_id: data}  # keep only the current global model
        return self.models[model_id]

    async def _start_job(self, kind: str, msg: m.RoundStart | m.RoundValidate, clients: list[str], timeout: float, settings: dict[str, Any]) -> None:
        from scaleout.core.aggregators import get_aggregator

        loop = asyncio.get_running_loop()
        old = self.jobs.get(kind)
        if old is not None:
            self._drop(old)
        job = Job(kind, msg.session_id, msg.round_index, msg.model_id, CombinerRound.start(clients, loop.time(), timeout), settings=settings)
        self.jobs[kind] = job
        try:
            model = await self._model(msg.model_id)
            if kind == "train":
                job.agg = get_aggregator(getattr(msg, "aggregator", "fedavg"), payload.describe(model))
        except ScaleoutError as exc:
            log.error("round %d: cannot start %s: %s", msg.round_index, kind, exc)
            for client in clients:
                job.tracker.on_refused(client, str(exc))
            await self._complete(job)
            return
        if self.jobs.get(kind) is not job:  # stopped or replaced while the model was fetched
            return
        job.timer = loop.call_at(job.tracker.deadline, lambda: self._spawn(self._tick(job)))
        if kind == "train":
            job.update_limit = 2 * len(model) + UPDATE_SLACK
        log.info("round %d: %s on %d clients", msg.round_index, kind, len(clients))
        sends = {new_id("t-"): client for client in clients}
        job.tasks.update(sends)  # before any send: a fast client may answer before the last send ends
        await asyncio.gather(*(self._send_task(job, task_id, client, model, settings) for task_id, client in sends.items()))
        if job.tracker.on_tick(loop.time()) or job.tracker.check():
            await self._complete(job)

    async def _send_task(self, job: Job, task_id: str, client: str, model: bytes, settings: dict[str, Any]) -> None:
        """Send one client its task with the model; one unreachable client must not stop the round."""
        link = self.clients.get(client)
        if link is None:
            reason = "not connected to this combiner"
        else:
            task = m.Task(task_id=task_id, kind=job.kind, session_id=job.session_id, round_index=job.round_index, model_id=job.model_id, settings=settings)
            self._set_client_limit(client)
            try:
                # The model id is the sha256 of its bytes: no need to hash them again per client.
                await link.send_with_blob(task, model, "model", sha256=job.model_id)
                return
            except LinkClosed:
                return  # a dropped link: the reconnect grace and _resume take it from here
            except ScaleoutError as exc:
                reason = str(exc)
        if job.tracker.on_refused(client, f"could not send the task: {reason}"):
            await self._complete(job)
        self._set_client_limit(client)

    async def _tick(self, job: Job) -> None:
        if self.jobs.get(job.kind) is job and job.tracker.on_tick(asyncio.get_running_loop().time()):
            log.warning("round %d: %s timed out waiting for %s", job.round_index, job.kind, ", ".join(sorted(job.tracker.failed)))
            await self._complete(job)

    def _drop(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if self.jobs.get(job.kind) is job:
            del self.jobs[job.kind]
            for client in set(job.tasks.values()):
                self._set_client_limit(client)

    async def _on_result(self, client: str, inc: Incoming) -> None:
        msg = inc.msg
        assert isinstance(msg, m.TaskResult)
        job = self._job_of(msg.task_id)
        if job is None or job.tasks.get(msg.task_id) != client:
            log.info("ignoring a late or unknown result from client %s", client)
            return
        if client in job.tracker.reported or client in job.tracker.failed:
            log.info("ignoring a repeated result from client %s", client)
            return
        await self._bound_result(job, client, msg)
        if job.kind == "validate":
            error = msg.error if not msg.ok else None
            await self._report("validate", job, client, msg.data, error)
            if error:
                ready = job.tracker.on_refused(client, error)
            else:
                ready = job.tracker.on_update(client)
        else:
            ready = await self._fold(job, client, msg, inc)
            self._set_client_limit(client)  # its update is in: back to small payloads
        if ready:
            await self._complete(job)

    async def _bound_result(self, job: Job, client: str, msg: m.TaskResult) -> None:
        """Cut a result down to what may travel on: its error text truncated, oversized data
        dropped (which fails the task, saying why; the client is told)."""
        if msg.error is not None:
            msg.error = clip_text(msg.error)
        what = "the training metadata" if job.kind == "train" else f"the {job.kind} result"
        try:
            check_size(msg.data, MAX_RESULT_BYTES, what, "return a few numbers, not data")
        except LimitExceeded as exc:
            log.warning("round %d: %s from %s refused: %s", job.round_index, job.kind, client, exc)
            link = self.clients.get(client)
            if link is not None:
                await _quiet(link.send(m.Error(code=exc.code, message=str(exc), re=msg.id)))
            msg.data = {}
            if msg.ok:
                msg.ok, msg.error = False, str(exc)

    async def _fold(self, job: Job, client: str, msg: m.TaskResult, inc: Incoming) -> bool:
        """Check a client's update and fold it into the running aggregate, or refuse it.

        At most ``DECODE_SLOTS`` updates are decoded at a time, so decoded copies do not
        grow with the number of clients; the lock only keeps `agg.add` and its tracker
        update whole against `_complete`. A client waiting for a slot holds its raw bytes
        and its link stops reading (backpressure), until updates fold chunk by chunk.
        """
        blob = inc.take_blob()
        try:
            if not msg.ok:
                raise UpdateRejected(msg.error or "the client reported a failure")
            if blob is None:
                raise PayloadError(inc.blob_error or "train result carried no model")
            weight = read_num_examples(msg.data.get("metadata"))
            async with self.decoding:
                # Checked in a thread as zero-copy views of the received bytes, several at once
                # (numpy releases the GIL); only the fold itself is serialised by the lock.
                checked = await asyncio.to_thread(_check_update, job.agg, blob)
                async with job.lock:
                    if self.jobs.get(job.kind) is not job:
                        raise UpdateRejected("the round closed while the update was being checked")
                    await asyncio.to_thread(job.agg.add, checked, float(weight), client)
                    ready = job.tracker.on_update(client)
                del checked, blob  # the views hold the bytes: both go now
        except ScaleoutError as exc:
            log.warning("round %d: update from %s refused: %s", job.round_index, client, exc)
            ready = job.tracker.on_refused(client, str(exc))
            await self._report("train", job, client, msg.data, str(exc))
            return ready
        log.info("round %d: update from %s accepted (%d examples)", job.round_index, client, weight)
        await self._report("train", job, client, msg.data, None)
        return ready

    async def _report(self, kind: str, job: Job, client: str, data: dict[str, Any], error: str | None) -> None:
        assert self.controller is not None
        # Data entered within its limit (_on_metric, _bound_result): the report fits the controller's frames.
        error = clip_text(error) if error is not None else None
        report = m.Report(kind=kind, session_id=job.session_id, round_index=job.round_index, client=client, data=data, error=error)
        await _quiet(self.controller.send(report))

    async def _abort_late(self, job: Job) -> None:
        """Tell clients still working on this job that nobody waits for their result."""
        late = set(job.tracker.expected) - job.tracker.reported
        for task_id, client in job.tasks.items():
            link = self.clients.get(client)
            if client in late and link is not None:
                await _quiet(link.send(m.TaskAbort(session_id=job.session_id, task_id=task_id)))

    async def _complete(self, job: Job) -> None:
        """Send this combiner's share of the round up to the controller, once."""
        from scaleout.core.aggregators import encode_partial

        if self.jobs.get(job.kind) is not job:
            return
        self._drop(job)
        assert self.controller is not None
        await self._abort_late(job)
        if job.kind == "validate":
            log.info("round %d: %d validations in, %d missing", job.round_index, len(job.tracker.reported), len(job.tracker.failed))
            await _quiet(self.controller.send(m.ValidateDone(session_id=job.session_id, round_index=job.round_index)))
            return
        async with job.lock:
            partial_bytes, count, weight, who = None, 0, 0.0, []
            if job.agg is not None and job.agg.count > 0:
                try:
                    p = job.agg.partial()  # refused if not finite: never sent on
                    partial_bytes = await asyncio.to_thread(encode_partial, p)
                    count, weight, who = p.count, p.weight, p.contributors
                except ScaleoutError as exc:
                    log.error("round %d: aggregate of %d updates not sent: %s", job.round_index, job.agg.count, exc)
        msg = m.RoundPartial(session_id=job.session_id, round_index=job.round_index, count=count, weight=weight, contributors=list(who))
        log.info("round %d: reporting %d updates to the controller", job.round_index, count)
        await _quiet(self.controller.send_with_blob(msg, partial_bytes, "partial aggregate"))


def _check_update(agg: Any, blob: bytes) -> Any:
    """Parse an update's header and check its values against the round's model (off the loop)."""
    return agg.check(payload.views(blob))


def split_host_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (clients behind NAT or a proxy)."""
    from scaleout.core.config import parse_port
    from scaleout.core.errors import ConfigError

    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host:
        raise ConfigError("advertise", f"expected HOST or HOST:PORT, got {text!r}")
    if port is None:
        return host, None
    if not port.isdigit():
        raise ConfigError("advertise", f"expected HOST or HOST:PORT, got {text!r}")
    return host, parse_port(int(port)) or None


async def _quiet(coro: Any) -> None:
    try:
        await coro
    except Exception as exc:  # the role edge: a closed peer is noticed by its reader
        log.warning("send failed: %s", exc)
