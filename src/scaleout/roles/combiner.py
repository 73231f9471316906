"""The combiner: serves clients, hands them tasks, folds their updates into a partial."""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from scaleout.core import messages as m
from scaleout.core import payload, permissions
from scaleout.core.errors import AuthError, LimitExceeded, PayloadError, ProtocolError, ScaleoutError, StorageError, Superseded, UpdateRejected
from scaleout.core.limits import MAX_RESULT_BYTES, MetricGate, check_size, clip_text, json_size, metric_body
from scaleout.core.rounds import CombinerRound, Resume
from scaleout.core.aggregators.bounds import check_change, clip_examples, norm_limit
from scaleout.core.updates import read_num_examples
from scaleout.core.units import fmt_bytes
from scaleout.roles.command_relay import CommandRelay
from scaleout.core.aggregators.landing import LandingCheck
from scaleout.roles.folding import FOLD_BATCH, FoldQueue
from scaleout.roles.common import STOP_GRACE_S, announce, bracket, cert_names, close_now, close_server, dial_urls, failpoint, new_id, private_tempdir, quietly, fix_mmap_threshold, raise_file_limit, url_host
from scaleout.security import tls, tokens
from scaleout.store.blobs import release
from scaleout.transport.budget import ByteBudget
from scaleout.core.ratelimit import DEFAULT_RATE
from scaleout.transport.link import CLOSE_POLICY, DEFAULT_MAX_PAYLOAD, SEND_TIMEOUT_S, Hashed, Incoming, Link, LinkClosed, Pieces, Tap
from scaleout.transport.dialer import MAX_LEARNED, Controllers
from scaleout.transport.net import HANDSHAKE_TIMEOUT, ConnectError, TrustError, backoff, bearer, connect, serve

log = logging.getLogger("scaleout.combiner")
T = TypeVar("T")

# What a client link may hold: one payload at a time, and a small one unless the combiner
# is pulling that client's update (then the size the client announced).
CLIENT_IN_FLIGHT = 1
CLIENT_IDLE_PAYLOAD = 1 << 20
UPDATE_SLACK = 1 << 20
UPLOAD_BUDGET_MIN = 16 << 20  # bytes of updates held at once: at least this, or one model-sized update
# Bytes of checked, file-backed updates waiting for the fold (their upload budget given back):
# one being folded and FOLD_BATCH waiting, at most FOLD_WAIT_MAX (but one update always). They are unnamed temporary
# files, in the page cache or on disk, not in the process's memory: the fold maps each and lets
# every stretch go once added. So disk use is at most the upload budget plus this.
FOLD_WAIT_MAX = 1 << 30
RECONNECT_GRACE_S = 10.0  # how long a round keeps waiting for a client whose link dropped
ABORT_SEND_S = 2.0  # a late client's abort notice waits this long for its socket, in the background
PULL_STALL_S = 10.0  # a client asked for its update that sends nothing for this long is left out
PULLS_AT_ONCE = 32  # updates being pulled from clients at once: the others wait their turn, unasked
SENDS_AT_ONCE = 4  # command jobs' models being sent to clients at once (command_relay)
SEND_BUDGET = 64 << 20  # bytes of a round's model frames being written to all clients at once
STATUS_DELAY_S = 0.05  # joins and leaves within this window travel in one message
HELLO_TIMEOUT_S = 10.0  # a client link that has not said hello by then is closed
BURST_FACTOR = 10  # connections an address may open at once: this many seconds' worth
TICKET_CONNECT_S = 300.0  # a client connects with a ticket issued at most this long ago (it gets one per assignment)
REPORTS_PAGE_BYTES = 768 << 10  # clients' outcomes per Reports message, well within a frame (MAX_TEXT_BYTES)
FORWARD_GRACE_S = 10.0  # a forwarded update waits this long past the round's deadline for the controller to take it


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
    state_dir: Path | None = None  # where its identity is kept (default: ~/.local/state/scaleout)
    max_connect_rate: float = DEFAULT_RATE  # new client connections per second per address (0: no limit)
    hello_timeout: float = HELLO_TIMEOUT_S  # a client link that has not said hello by then is closed
    handshake_timeout: float = HANDSHAKE_TIMEOUT  # TLS and websocket handshakes, from the TCP connection on
    send_timeout: float = SEND_TIMEOUT_S  # a peer that takes nothing we send for this long is dropped


@dataclass
class Job:
    """One round (train or validate) as this combiner sees it."""

    kind: str
    session_id: str
    round_index: int
    model_id: str
    tracker: CombinerRound
    tasks: dict[str, str] = field(default_factory=dict)  # task id -> client
    task_of: dict[str, str] = field(default_factory=dict)  # client -> its task id: a client back finds it in O(1)
    agg: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # agg.add and its tracker update vs. _complete
    timer: asyncio.TimerHandle | None = None
    update_limit: int = 0  # bytes a selected client may send as its update (train only)
    max_examples: int = 0  # a client's weight is clipped to this (0: no cap)
    model: dict[str, Any] = field(default_factory=dict)  # the round's global model (views), to measure changes against
    norm_limit: float | None = None  # the largest change an update may make (None: no bound)
    settings: dict[str, Any] = field(default_factory=dict)
    pulling: dict[str, asyncio.Future[Any]] = field(default_factory=dict)  # client -> its pull, in progress
    told: set[str] = field(default_factory=set)  # clients whose outcome the controller has heard
    dropped: dict[str, int] = field(default_factory=dict)  # client -> metric messages dropped, not yet reported
    # Clients' outcomes, told to the controller in one Reports message as the job completes
    # (None once told: a later one goes on its own).
    outcomes: list[dict[str, Any]] | None = field(default_factory=list)
    # When it started, all tasks were sent, the last result was announced (loop time).
    started: float = 0.0
    sent: float | None = None
    last_result: float | None = None
    attempt: int = 1  # the controller's try of this round (RoundStart.attempt), echoed in the partial
    forward: bool = False  # the strategy needs each update on its own: forwarded to the controller, not folded
    forwarded: dict[str, int] = field(default_factory=dict)  # client -> its weight, for updates the controller took
    model_size: int = 0  # bytes of the round's model: a forwarded update of another size is re-encoded like it
    model_map: mmap.mmap | None = None  # the file mapping job.model points into (its pages let go after each read)
    folds: Any = None  # its FoldQueue (train): checked updates wait there for the fold, under ``lock``


class Combiner:
    def __init__(self, settings: CombinerSettings) -> None:
        self.settings = settings
        self.name = settings.name or f"combiner-{socket.gethostname()}-{new_id()[:4]}"
        self.enrolled: Any = None  # its identity (roles/joining.py), once enrolled
        self.advertised: str | None = None  # the host clients dial, which its certificate must name
        self.renewal: asyncio.Task[None] | None = None
        self.clients: dict[str, Link] = {}
        self.jobs: dict[str, Job] = {}  # by kind: at most one train and one validate job
        self.models: dict[str, bytes] = {}  # the current global model: its file mapped (_mapped_copy), read as bytes
        self._fetching: dict[str, asyncio.Future[None]] = {}  # model id -> done when its fetch from the controller ends
        self.controller: Link | None = None
        self.verifier: tokens.TokenVerifier | None = None
        self.stopping = False
        self.background: set[asyncio.Future[Any]] = set()
        self.sending = asyncio.Semaphore(SENDS_AT_ONCE)
        self.send_budget = ByteBudget(SEND_BUDGET)  # a round's model goes to all its clients at once, within this
        self.uploads = ByteBudget(UPLOAD_BUDGET_MIN)  # raised to two updates when a round starts
        self.fold_wait = ByteBudget(UPLOAD_BUDGET_MIN)  # checked updates in files waiting for the fold (FOLD_WAIT_MAX)
        # Within the budget, at most this many clients are asked at once: thousands of small
        # updates fit the budget together, and clients on a busy host asked all at once could
        # not all answer within PULL_STALL_S. A pull's stall clock starts when it is asked.
        self.pull_slots = asyncio.Semaphore(PULLS_AT_ONCE)
        self.partials: dict[tuple[str, int], Hashed] = {}  # encoded partials the controller will pull
        # (session, round, client) -> an update the controller will pull (needs_updates), and a future set once it asked
        self.forwards: dict[tuple[str, int, str], tuple[Hashed, asyncio.Future[None]]] = {}
        self.announced: m.RoundPartial | None = None  # the last partial told of: told again if the link dropped
        self.boot: str | None = None  # which run of the controller gave us our rounds
        self.run_id = new_id("r-")  # this process: the controller tells a blip (same run) from a restart
        self.gates: dict[str, MetricGate] = {}  # client -> its metric size and rate limits
        self._joined: set[str] = set()  # membership changes not yet told to the controller
        self.proofs: dict[str, str] = {}  # client -> the ticket it connected with: forwarded as proof it is here
        self._left: set[str] = set()
        self._status_timer: asyncio.TimerHandle | None = None
        self.relay = CommandRelay(self)  # custom commands, predictions, client logs, package updates
        self.controllers = Controllers(settings.controller)  # --controller's addresses, the active one first
        self.told_clients: set[str] = set()  # controller addresses passed on to the clients attached (ControllersChanged)

    async def _register(self, ctx: Any, csr: str | None) -> tuple[asyncio.Task[None], dict[str, Any]]:
        """Connect to the controller and register; returns the link's reader and the reply."""
        s = self.settings
        if self.enrolled is None:
            from scaleout.roles.joining import enrolled, learned_controllers

            self.enrolled = await enrolled("combiner", self.name, s.controller, s.token, s.ca, ctx, s.state_dir or _state_dir())
            if kept := self.controllers.add(await asyncio.to_thread(learned_controllers, self.enrolled)):
                log.info("also dialling the controller(s) learned before: %s", ", ".join(kept))
        args: dict[str, Any] = {"name": self.name, "advertise": self.advertised, "run": self.run_id}
        if csr is not None:
            args["csr"] = csr

        async def attempt(url: str) -> tuple[Link, asyncio.Task[None], dict[str, Any]]:
            link = await connect(url, self.enrolled.token, ctx, max_payload=s.max_payload)
            reader = asyncio.create_task(link.run(on_message=self._on_controller, on_request=self._on_controller_request))
            try:
                result, _ = await link.request("combiner.register", args, timeout=30)
            except BaseException:
                await link.ws.close()
                reader.cancel()
                raise
            return link, reader, result

        link, reader, result = await self.controllers.dial(attempt)  # the active one of --controller's addresses
        self.controller = link
        self.enrolled.renew(result.get("token"))
        if self.verifier is not None:
            self.verifier.revoked.update(str(i) for i in result.get("revoked") or [])
        await self._learn_controllers(result.get("controllers"))
        return reader, result

    async def _learn_controllers(self, urls: object) -> None:
        """Dial the controllers the active one told of too (a standby started after this
        combiner), and tell the clients attached here, which ask a controller again when they lose us."""
        from scaleout.roles.joining import learn

        await learn(self.controllers, urls, self.enrolled, log)
        told = [u for u in urls if isinstance(u, str)][: 2 * MAX_LEARNED] if isinstance(urls, list) else []
        if set(told) <= self.told_clients:
            return
        self.told_clients.update(told)
        for name, link in list(self.clients.items()):  # in the background: a frozen client must not stall this link
            self._spawn(quietly(asyncio.wait_for(link.send(m.ControllersChanged(urls=told)), ABORT_SEND_S), f"telling {name} of the controllers"))

    async def _reconnect(self, ctx: Any, url: str, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """Register again after losing the controller, with backoff; None when stopped.

        The rounds under way go on meanwhile (clients keep training). Back with the same run
        of the controller, a partial it had not taken is told of again (that round may still
        be open); a controller that restarted runs its round again, so the old ones go."""

        async def again() -> asyncio.Task[None]:
            reader, result = await self._register(ctx, None)
            assert self.controller is not None
            if result.get("boot") != self.boot:
                await self._abandon_jobs()  # a new run of the controller: it retries its round itself
                self.boot = result.get("boot")
            await self.controller.request("combiner.ready", {"url": url}, timeout=30)
            await self._send_all_clients()
            log.info("reconnected to the controller at %s", self.controllers)
            told = self.announced
            if told is not None and (told.session_id, told.round_index) in self.partials:
                log.info("round %d: telling the controller again of the partial it had not taken", told.round_index)
                await quietly(self.controller.send(told))
            return reader

        return await _with_backoff(again, stop, (ScaleoutError, OSError))

    async def _first_register(self, ctx: Any, csr: str | None, stop: asyncio.Event) -> tuple[asyncio.Task[None], dict[str, Any]] | None:
        """Register at start, waiting with backoff for a controller that is not up yet (a
        combiner started at boot before its controller); a refused token or an untrusted
        certificate stops it at once. None when stopped while waiting."""
        return await _with_backoff(lambda: self._register(ctx, csr), stop, (ConnectError,))

    async def _abandon_jobs(self) -> None:
        """The controller that gave us these rounds is gone: stop their tasks."""
        self.partials.clear()
        self.announced = None
        self.relay.abandon()
        for job in list(self.jobs.values()):
            self._drop(job)
            for link in list(self.clients.values()):
                await quietly(link.send(m.TaskAbort(session_id=job.session_id, reason="the combiner lost the controller")))

    async def run(self, stop: asyncio.Event) -> None:
        raise_file_limit()
        fix_mmap_threshold()
        s = self.settings
        ctx = None if s.insecure else tls.client_context(s.ca)
        advertised_host, dial_port = split_host_port(s.advertise) if s.advertise else (None, None)
        dial_host = advertised_host or url_host(s.host).strip("[]")
        if not s.advertise and s.host in ("0.0.0.0", "::", ""):
            # Listening everywhere: clients on other machines need a name, not loopback.
            dial_host = socket.gethostname()
            log.info("clients will dial %s (pass --advertise HOST to give them another name)", dial_host)
        self.advertised = dial_host
        if not s.name:
            from scaleout.roles.joining import choose_name, controller_key

            self.name = choose_name("combiner", "", s.token, s.state_dir or _state_dir(), controller_key(s.controller, s.ca)) or self.name
        key_pem = b""
        csr: str | None = None
        wanted: list[str] = []
        if not s.insecure:
            wanted = cert_names(s.host, [dial_host, *s.san])
            csr_pem, key_pem = tls.make_csr(wanted, self.name)
            csr = csr_pem.decode()
        first = await self._first_register(ctx, csr, stop)
        if first is None:
            return
        reader, result = first
        self.boot = result.get("boot")
        assert self.controller is not None
        self.verifier = tokens.TokenVerifier(str(result["token_public_key"]).encode())
        self.verifier.revoked.update(str(i) for i in result.get("revoked") or [])
        server_ctx = None
        tmp = None
        if not s.insecure:
            if s.data_dir is None:
                tmp = private_tempdir("scaleout-combiner-")  # its key: swept at a next start if this one is killed
            cert_dir = s.data_dir or Path(tmp.name)  # type: ignore[union-attr]
            cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # its key lives here
            tls.write_private(cert_dir / "combiner.key", key_pem)
            (cert_dir / "combiner.pem").write_text(result["cert"])
            left_out = sorted({tls._canonical(n.strip("[]")) for n in wanted} - tls.certificate_names(str(result["cert"]).encode()))
            if left_out:  # the controller signs only what this combiner's token allows
                log.warning(
                    "the controller left %s out of this combiner's certificate: its token does not allow them "
                    "(an admin allows them with: scaleout token create --role combiner --san NAME ...)", ", ".join(left_out),
                )
            server_ctx = tls.server_context(cert_dir / "combiner.pem", cert_dir / "combiner.key")
            if isinstance(result.get("cert_ttl_s"), int):
                self.renewal = asyncio.create_task(self._renew_certificate(ctx_files=(cert_dir, server_ctx), ttl_s=result["cert_ttl_s"], stop=stop))
        rate = (s.max_connect_rate, s.max_connect_rate * BURST_FACTOR) if s.max_connect_rate > 0 else None
        server, port = await serve(
            self._on_client, self._authenticate, s.host, s.port, server_ctx, max_payload=0, connect_rate=rate, handshake_timeout=s.handshake_timeout,
            send_timeout=s.send_timeout,
        )
        scheme = "ws" if s.insecure else "wss"
        url = f"{scheme}://{bracket(dial_host)}:{dial_port or port}"
        await self.controller.request("combiner.ready", {"url": url}, timeout=30)
        await self._send_all_clients()
        announce(f"{scheme}://{bracket(s.host)}:{port}", dial_urls(scheme, s.host, port))
        log.info("combiner %s registered with %s", self.name, self.controllers)
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
                if self.controller.ws.close_code == m.CLOSE_REVOKED:
                    raise AuthError(f"the controller closed this combiner's link: {self.controller.ws.close_reason or 'credential revoked'}")
                log.warning("lost the connection to the controller at %s: reconnecting (clients stay connected, rounds go on)", self.controllers)
                current = await self._reconnect(ctx, url, stop)
        finally:
            self.stopping = True
            stopping.cancel()
            if self.renewal is not None:
                self.renewal.cancel()
            close_server(server)
            self.controller.ws.close_timeout = STOP_GRACE_S
            await self.controller.ws.close()
            if current is not None:
                current.cancel()
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
            if tmp is not None:
                tmp.cleanup()

    def _authenticate(self, token: str | None) -> tokens.TokenClaims:
        if not token:
            raise AuthError("no token given")
        assert self.verifier is not None
        now = time.time()
        # Any audience passes verify here: the checks below refuse all but a ticket for this combiner.
        claims = self.verifier.verify(token, now, roles={"client"}, audience=tokens.peek(token).aud)
        if claims.nid is None:
            raise AuthError("a client connects with its own credential: it enrols with the controller first (scaleout join does)")
        if claims.aud != self.name:
            # Its own credential would let this combiner act as the client at the controller.
            raise AuthError(f"a client connects with the ticket the controller gave it for this combiner ({self.name}), not with another credential")
        if now > claims.iat + TICKET_CONNECT_S:
            raise AuthError("this ticket is too old to connect with: ask the controller for a combiner again")
        return claims

    # -- clients --------------------------------------------------------------------------

    async def _on_client(self, link: Link) -> None:
        name: str | None = None
        gate: MetricGate | None = None  # the client's metric limits: per name, so reconnecting does not reset them
        link.max_in_flight = CLIENT_IN_FLIGHT
        link.max_payload = 0  # nothing before hello; a client's own limit after it

        async def on_message(inc: Incoming) -> None:
            nonlocal name, gate
            if self.stopping:
                # Nothing a client says now can go anywhere: dropped, so what it queued (metrics
                # logged in a tight loop) is read through at once, and its goodbye with it.
                return
            msg = inc.msg
            permissions.check_message(link.claims.role, msg.type, "combiner")  # the one table, before any handler
            if name is None:
                if not isinstance(msg, m.Hello):  # a protocol breaker: cut off at once
                    await link.close_now(CLOSE_POLICY, f"say hello first (got {msg.type})")
                    return
                m.check_name(msg.name, "client name")
                if link.claims is None or link.claims.sub != msg.name:
                    # A name belongs to its identity: nobody else may connect (or upload) under it.
                    log.warning("refused %s: its credential is for client %r, not %r", link.peer, getattr(link.claims, "sub", None), msg.name)
                    self._spawn(quietly(link.ws.close(m.CLOSE_REVOKED, f"this credential is not client {msg.name}'s")))
                    return
                old = self.clients.get(msg.name)
                if old is not None:
                    # The newest connection wins: the old one is usually a dead link from
                    # before a restart; a live twin is told why and stops. Closed in the
                    # background: a dead peer must not hold up this link for the close timeout.
                    log.warning("client %s connected again: closing its older connection", msg.name)
                    self._spawn(quietly(old.ws.close(m.CLOSE_SUPERSEDED, f"another client connected as {msg.name}")))
                for current in self.jobs.values():  # a pull on the old connection will never finish
                    stale = current.pulling.pop(msg.name, None)
                    if stale is not None:
                        stale.cancel()
                name = msg.name
                self.proofs[name] = bearer(link.ws.request.headers) or ""
                link.max_payload = self._client_limit(name)
                gate = self.gates.setdefault(name, MetricGate())
                self.clients[name] = link
                log.info("client %s connected (%d clients)", name, len(self.clients))
                self._changed(joined=name)
                await self._resume(name, link, msg.task_id)
            elif isinstance(msg, m.TaskResult):
                await self._on_result(name, inc)
            elif isinstance(msg, m.Metric):
                job = self._job_of(msg.task_id)
                if job is not None:
                    _check_own_task(job, msg.task_id, name)
                if job is not None and gate is not None:
                    await self._on_metric(name, link, gate, job, msg)
            elif isinstance(msg, (m.CommandResult, m.ClientLog, m.ClientStatus)) and gate is not None:
                await self._announced(name)
                await self.relay.on_client(name, link, gate, msg)
            else:
                raise ProtocolError(f"a client may not send {msg.type}")

        watch = asyncio.ensure_future(link.watch(greeted=lambda: name is not None, hello_s=self.settings.hello_timeout))
        try:
            await link.run(on_message=on_message)
        finally:
            watch.cancel()
            if name is not None and self.clients.get(name) is link:
                del self.clients[name]
                self.proofs.pop(name, None)
                log.info("client %s disconnected (%d clients)", name, len(self.clients))
                self._changed(left=name)
                self.relay.client_gone(name)
                # A client that said goodbye is lost now; after a blip it has a grace period.
                goodbye = link.ws.close_code in (1000, 1001)
                now = asyncio.get_running_loop().time()
                for job in list(self.jobs.values()):
                    waited = name in job.tracker.pending
                    if job.tracker.on_client_dropped(name, now, goodbye):
                        await self._complete(job)
                    elif waited and not goodbye and name in job.tracker.away:
                        log.info("round %d: waiting up to %.0fs for %s to reconnect", job.round_index, job.tracker.away[name] - now, name)
                        self._arm(job)

    async def _on_metric(self, client: str, link: Link, gate: MetricGate, job: Job, msg: m.Metric) -> None:
        """Forward a metric within the limits; a drop is logged and told once per burst."""
        body = metric_body(msg.metrics, msg.step)
        verdict = gate.offer(json_size(body), asyncio.get_running_loop().time())
        if not verdict.ok:
            job.dropped[client] = job.dropped.get(client, 0) + 1
            if verdict.tell:
                log.warning("client %s: %s", client, verdict.reason)
                await quietly(link.send(m.Error(code=LimitExceeded.code, message=verdict.reason, re=msg.id)))
            return
        if verdict.dropped_before:
            log.warning("client %s: %d metric messages were dropped in that burst; forwarding them again", client, verdict.dropped_before)
            await self._report_dropped(job, client)
        await self._report("metric", job, client, body, None)

    async def _report_dropped(self, job: Job, client: str) -> None:
        """Tell the controller how many of ``client``'s metric messages of this round were
        dropped since it last heard (a metric report with no values and a ``dropped`` count),
        so `metric ls` can say so."""
        n = job.dropped.pop(client, 0)
        if n:
            await self._report("metric", job, client, {"metrics": {}, "step": None, "dropped": n}, None)

    async def _resume(self, name: str, link: Link, working_on: str | None) -> None:
        """A client is back: resend tasks it lost, and abort one nobody waits for any more."""
        wanted = False
        for job in list(self.jobs.values()):
            task_id = job.task_of.get(name)
            action = job.tracker.on_client_back(name, still_working=task_id is not None and task_id == working_on)
            self._arm(job)
            if action is Resume.KEEP:
                wanted = True
                log.info("round %d: %s is back and still working on its %s task", job.round_index, name, job.kind)
            elif action is Resume.RESEND and task_id is not None:
                log.info("round %d: %s is back: sending its %s task again", job.round_index, name, job.kind)
                self._spawn(self._resend(job, task_id, name))
        if working_on is not None and not wanted:
            await quietly(link.send(m.TaskAbort(session_id="", task_id=working_on)))

    async def _resend(self, job: Job, task_id: str, name: str) -> None:
        if self.jobs.get(job.kind) is not job:
            return
        try:
            model = await self._model(job.model_id)
        except ScaleoutError as exc:
            if job.tracker.on_refused(name, f"could not send the task again: {exc}"):
                await self._complete(job)
            return
        if self.jobs.get(job.kind) is job and name in job.tracker.pending:  # still wanted after the fetch
            await self._send_task(job, task_id, name, model, job.settings)

    def _changed(self, joined: str | None = None, left: str | None = None) -> None:
        """Note a membership change; changes within STATUS_DELAY_S go up as one message."""
        if joined is not None:
            self._left.discard(joined)
            self._joined.add(joined)
        if left is not None:
            if left in self._joined:
                self._joined.discard(left)
            else:
                self._left.add(left)
        if self._status_timer is None:
            self._status_timer = asyncio.get_running_loop().call_later(STATUS_DELAY_S, lambda: self._spawn(self._flush_changes()))

    async def _announced(self, client: str) -> None:
        """Tell the controller now of a client that joined a moment ago (its batch still
        waits), so what is said for it next is said by a combiner it knows it is on."""
        if client in self._joined:
            if self._status_timer is not None:
                self._status_timer.cancel()
            await self._flush_changes()

    async def _flush_changes(self) -> None:
        self._status_timer = None
        joined, left = sorted(self._joined), sorted(self._left)
        self._joined.clear()
        self._left.clear()
        await self._send_pages(joined, left, reset=False)

    async def _send_all_clients(self) -> None:
        """After (re)registering: the full membership, in pages, replacing what was known."""
        if self._status_timer is not None:
            self._status_timer.cancel()
            self._status_timer = None
        self._joined.clear()
        self._left.clear()
        await self._send_pages(sorted(self.clients), [], reset=True)

    async def _send_pages(self, joined: list[str], left: list[str], reset: bool) -> None:
        link = self.controller
        if link is None or self.stopping or link.ws.close_code is not None or not (joined or left or reset):
            return
        page = m.MAX_PROOFS
        joined = [c for c in joined if self.proofs.get(c)]
        try:
            for i in range(0, max(len(joined), len(left), 1), page):
                names = joined[i : i + page]
                proofs = [self.proofs[c] for c in names]
                await link.send(m.ClientsChanged(joined=names, proofs=proofs, left=left[i : i + page], reset=reset and i == 0))
        except Exception as exc:  # the role edge: the reader notices the lost controller
            log.warning("could not report clients to the controller: %s", exc)

    def _client_limit(self, client: str | None) -> int:
        return min(CLIENT_IDLE_PAYLOAD, self.settings.max_payload)

    def _job_of(self, task_id: str) -> Job | None:
        for job in self.jobs.values():
            if task_id in job.tasks:
                return job
        return None

    # -- rounds -----------------------------------------------------------------------------

    async def _on_controller(self, inc: Incoming) -> None:
        msg = inc.msg
        if isinstance(msg, (m.RoundStart, m.RoundValidate)):
            clients = _client_list(inc.take_blob(), msg.count, inc.blob_error)
            kind = "train" if isinstance(msg, m.RoundStart) else "validate"
            settings = msg.settings if isinstance(msg, m.RoundStart) else {}
            self._spawn(self._start_job(kind, msg, clients, msg.timeout, settings))
        elif isinstance(msg, m.SessionStop):
            for job in [j for j in self.jobs.values() if j.session_id == msg.session_id]:
                self._drop(job)
                taken, job.outcomes = job.outcomes, None  # those in so far are still recorded
                self._spawn(self._send_outcomes(job, taken or []))
            self.partials = {k: v for k, v in self.partials.items() if k[0] != msg.session_id}
            for name, link in list(self.clients.items()):  # in the background: a frozen client must not stall this link
                self._spawn(quietly(asyncio.wait_for(link.send(m.TaskAbort(session_id=msg.session_id)), ABORT_SEND_S), f"telling {name} the session stopped"))
        elif isinstance(msg, (m.CommandStart, m.PackageChanged)):
            await self.relay.on_controller(inc)
        elif isinstance(msg, m.Event):
            pass
        elif isinstance(msg, m.Revoked):
            self._revoke(msg)
        elif isinstance(msg, m.ControllersChanged):
            await self._learn_controllers(msg.urls)
        else:
            raise ProtocolError(f"the controller may not send {msg.type} to a combiner")

    def _revoke(self, msg: m.Revoked) -> None:
        """Refuse these tokens and identities from now on and close the clients' links holding them."""
        ids = set(msg.ids)
        if self.verifier is not None:
            self.verifier.revoked |= ids
        for name, link in list(self.clients.items()):
            claims = link.claims
            if claims is not None and (claims.jti in ids or claims.nid in ids):
                log.warning("closing client %s: %s", name, msg.reason or "its credential was revoked")
                self._spawn(close_now(link, m.CLOSE_REVOKED, msg.reason or "credential revoked"))

    async def _renew_certificate(self, ctx_files: tuple[Path, Any], ttl_s: int, stop: asyncio.Event) -> None:
        """Ask the controller for a new certificate after 2/3 of the current one's life, and
        serve it to new connections from then on (the key changes with it)."""
        cert_dir, server_ctx = ctx_files
        s = self.settings
        while True:
            await asyncio.sleep(max(1.0, ttl_s * 2 / 3))  # a timer, not a synchronisation
            delays = backoff(1.0, 60.0)
            while True:
                try:
                    csr_pem, key_pem = tls.make_csr(cert_names(s.host, [self.advertised or "", *s.san]), self.name)
                    link = self.controller
                    if link is None:
                        raise LinkClosed("controller", "not connected")
                    result, _ = await link.request("combiner.renew", {"csr": csr_pem.decode(), "advertise": self.advertised}, timeout=30)
                    tls.write_private(cert_dir / "combiner.key", key_pem)
                    tls.write_public(cert_dir / "combiner.pem", str(result["cert"]).encode())
                    server_ctx.load_cert_chain(cert_dir / "combiner.pem", cert_dir / "combiner.key")
                    if self.enrolled is not None:
                        self.enrolled.renew(result.get("token"))
                    ttl_s = int(result.get("cert_ttl_s") or ttl_s)
                    log.info("renewed this combiner's certificate (valid %s more)", _duration(ttl_s))
                    break
                except (ScaleoutError, OSError, ValueError) as exc:
                    log.warning("could not renew this combiner's certificate yet: %s", exc)
                    await asyncio.sleep(next(delays))  # a backoff, not a synchronisation

    async def _on_controller_request(self, req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], Hashed]:
        if req.op == "update.get":
            key3 = (str(req.args.get("session_id")), req.args.get("round_index"), str(req.args.get("client")))
            entry = self.forwards.get(key3)  # type: ignore[arg-type]
            if entry is None:
                raise ProtocolError(f"no update of client {key3[2]} for round {key3[1]} of session {key3[0]} (it was sent or dropped)")
            data, taken = entry
            if not taken.done():
                taken.set_result(None)
            return {}, data
        if req.op != "partial.get":
            raise ProtocolError(f"unknown operation {req.op!r}")
        key = (str(req.args.get("session_id")), req.args.get("round_index"))
        data = self.partials.pop(key, None)  # type: ignore[arg-type]
        if data is None:
            raise ProtocolError(f"no partial aggregate for round {key[1]} of session {key[0]} (it was sent or dropped)")
        log.info("round %s: sending the partial aggregate (%s) to the controller", key[1], fmt_bytes(len(data.data)))
        return {}, data

    def _spawn(self, coro: Any) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Future[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the role edge: log, never lose it
            log.error("background task failed", exc_info=task.exception())

    async def _model(self, model_id: str, tap: Tap | None = None) -> bytes:
        """The global model ``model_id``, fetched from the controller once. ``tap``: told its
        bytes as they arrive (sends to clients read them from there) and how the fetch ended."""
        if model_id not in self.models and (fetching := self._fetching.get(model_id)) is not None:
            # Being fetched (a client back mid-relay is sent its task again): that one download
            # serves this too, not a second copy of the model (this link keeps payloads in memory).
            await asyncio.wait((fetching,))
            if model_id not in self.models:  # that fetch failed (its round with it), or a newer model came since
                raise PayloadError(f"the combiner could not fetch model {model_id[:12]}")
        if model_id not in self.models:
            assert self.controller is not None
            link = self.controller
            if tap is not None:
                link.tap(tap)
            self._fetching[model_id] = fetching = asyncio.get_running_loop().create_future()
            try:
                # The link checked the bytes against the digest they came with, as they arrived: the
                # model id is that digest, so they are not hashed again here.
                _, data, digest = await link.request_checked("model.get", {"id": model_id}, timeout=300)
                if data is None or (digest or await asyncio.to_thread(payload.model_id, data)) != model_id:
                    raise PayloadError(f"controller sent the wrong bytes for model {model_id[:12]}")
                self.models = {}  # keep only the current global model
                # Kept in a file, mapped: its pages are in memory while it is sent (and let go after,
                # _let_go), not through the round's fold, where the sums and an update are. A tapped
                # one was written to its file and mapped as it arrived.
                model = data if isinstance(data, mmap.mmap) else await asyncio.to_thread(_mapped_copy, data)
                self.models = {model_id: cast(bytes, model)}  # bytes-like to every reader
                del data
            except BaseException as exc:
                if tap is not None:  # the clients' sends stop, and tell them to drop what they got
                    tap.fail(f"the combiner could not fetch model {model_id[:12]}: {exc or type(exc).__name__}")
                raise
            finally:
                if tap is not None:
                    link.untap(tap)
                if self._fetching.get(model_id) is fetching:
                    del self._fetching[model_id]
                fetching.set_result(None)
        if tap is not None:
            tap.complete(self.models[model_id])  # when it was not tapped (small, or held already): all of it now
        return self.models[model_id]

    async def _start_job(self, kind: str, msg: m.RoundStart | m.RoundValidate, clients: list[str], timeout: float, settings: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        old = self.jobs.get(kind)
        if old is not None:
            self._drop(old)
        tracker = CombinerRound.start(clients, loop.time(), timeout, grace=RECONNECT_GRACE_S)
        job = Job(kind, msg.session_id, msg.round_index, msg.model_id, tracker, settings=settings, started=loop.time(), attempt=getattr(msg, "attempt", 1))
        self.jobs[kind] = job
        sends = {new_id("t-"): client for client in clients}
        # Known before the model arrives: a client whose link blips while it is relayed to it is
        # sent its task again when back (_resume), from the one download (_model).
        job.tasks.update(sends)
        job.task_of.update((client, task_id) for task_id, client in sends.items())
        # A model not held yet goes to the clients as it arrives from the controller: each send
        # reads the one file it is written to (Tap). A client's task, which makes it use the
        # model, follows only once the whole model matched its id and the job is set up
        # (``ready`` says None), never before; otherwise (the reason) it drops what it got.
        ready: asyncio.Future[str | None] = loop.create_future()
        tap = Tap(msg.model_id) if msg.model_id not in self.models and self.controller is not None else None
        relayed = asyncio.gather(*(self._send_task(job, t, c, tap, settings, ready) for t, c in sends.items())) if tap is not None else None
        try:
            await self._distribute(job, kind, msg, clients, sends, settings, tap, ready, relayed)
        finally:
            if not ready.done():  # failed, stopped or replaced before the tasks could go
                ready.set_result(f"round {msg.round_index} was not started here")
            if relayed is not None and not relayed.done():
                await relayed  # each client told to drop what it got

    async def _distribute(
        self, job: Job, kind: str, msg: m.RoundStart | m.RoundValidate, clients: list[str], sends: dict[str, str], settings: dict[str, Any],
        tap: Tap | None, ready: asyncio.Future[str | None], relayed: asyncio.Future[Any] | None,
    ) -> None:
        from scaleout.core.aggregators import get_aggregator, needs_updates

        loop = asyncio.get_running_loop()
        try:
            model = await self._model(msg.model_id, tap)
            if kind == "train":
                assert isinstance(msg, m.RoundStart)
                job.agg = get_aggregator(msg.aggregator, payload.describe(model))
                job.folds = FoldQueue(job.lock, job.agg.add_many, job.tracker.on_update, lambda: self.jobs.get(kind) is job)
                job.forward = msg.forward_updates or needs_updates(msg.aggregator)
                job.max_examples = msg.max_examples
                job.model = payload.views(model)
                job.model_map = model if isinstance(model, mmap.mmap) else None
                job.model_size = len(model)
                job.norm_limit = await asyncio.to_thread(norm_limit, job.model, msg.max_update_norm)
                _let_go(model)
        except ScaleoutError as exc:
            log.error("round %d: cannot start %s: %s", msg.round_index, kind, exc)
            ready.set_result(f"round {msg.round_index}: {exc}")
            for client in clients:
                job.tracker.on_refused(client, str(exc))
            await self._complete(job)
            return
        if self.jobs.get(kind) is not job or self.stopping:  # stopped or replaced while the model was fetched
            return
        self._arm(job)
        if kind == "train":
            # An update may be float64 for a float32 model: twice the model, plus its header.
            job.update_limit = min(2 * len(model) + UPDATE_SLACK, self.settings.max_payload)
            # One model-sized update held at a time (a float64 one for a float32 model is admitted
            # alone); small models get UPLOAD_BUDGET_MIN, i.e. many at once.
            self.uploads.limit = max(UPLOAD_BUDGET_MIN, len(model) + UPDATE_SLACK)
            self.fold_wait.limit = max(min((FOLD_BATCH + 1) * (len(model) + UPDATE_SLACK), FOLD_WAIT_MAX), len(model) + UPDATE_SLACK)
        log.info("round %d: %s on %d clients", msg.round_index, kind, len(clients))
        job.tasks.update(sends)  # before any task is sent: a fast client may answer before the last send ends
        job.task_of.update((client, task_id) for task_id, client in sends.items())
        if kind == "train":
            await failpoint("distribute")  # the round taken on, its tasks not yet sent
        if relayed is None:
            await asyncio.gather(*(self._send_task(job, task_id, client, model, settings) for task_id, client in sends.items()))
        else:
            ready.set_result(None)  # each client's task goes once it has all of the model
            await relayed
        _let_go(model)
        job.sent = loop.time()
        if job.tracker.on_tick(loop.time()) or job.tracker.check():
            await self._complete(job)

    async def _send_task(
        self, job: Job, task_id: str, client: str, model: bytes | Tap, settings: dict[str, Any], ready: asyncio.Future[str | None] | None = None,
    ) -> None:
        """Send one client its task with the model; one unreachable client must not stop the round.
        With ``ready`` (a model relayed as it arrives, _start_job): the task goes once it says None."""
        link = self.clients.get(client)
        if link is None:
            reason = "not connected to this combiner"
        else:
            task = m.Task(task_id=task_id, kind=job.kind, session_id=job.session_id, round_index=job.round_index, model_id=job.model_id, settings=settings)
            try:
                # The model id is the sha256 of its bytes: no need to hash them again per client.
                # Every client's frames are views of the one model; what is being written to all
                # of them at once is bounded in bytes, so a client that stops reading holds one
                # frame of the budget (until send_timeout drops it), never up the others.
                task.blob = await link.send_blob(model, "model", sha256=job.model_id, budget=self.send_budget)
                if ready is not None:
                    await asyncio.wait((ready,))
                    if (why := ready.result()) is not None:  # no task will name it: the client drops what it got
                        await quietly(asyncio.wait_for(link.abort_blob(task.blob, why), ABORT_SEND_S), f"telling {client} to drop the model")
                        return
                await link.send(task)
                return
            except LinkClosed:
                return  # a dropped link: the reconnect grace and _resume take it from here
            except ScaleoutError as exc:
                reason = str(exc)
        if ready is not None:
            await asyncio.wait((ready,))
            if ready.result() is not None:
                return  # the round did not start here: its clients were refused as one (a failed send told its client to drop the model)
        if job.tracker.on_refused(client, f"could not send the task: {reason}"):
            await self._complete(job)

    def _arm(self, job: Job) -> None:
        """One timer per job, at the next moment its tracker has something to decide."""
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        when = job.tracker.next_wakeup
        if when is not None and self.jobs.get(job.kind) is job:
            job.timer = asyncio.get_running_loop().call_at(when, lambda: self._spawn(self._tick(job)))

    async def _tick(self, job: Job) -> None:
        if self.jobs.get(job.kind) is not job:
            return
        if job.tracker.on_tick(asyncio.get_running_loop().time()):
            timed_out = sorted(c for c, why in job.tracker.failed.items() if "timeout" in why or "come back" in why)
            if timed_out:
                log.warning("round %d: %s gave up on %s", job.round_index, job.kind, ", ".join(timed_out))
            await self._complete(job)
        else:
            self._arm(job)

    def _drop(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
        for pull in job.pulling.values():  # nobody folds what they bring now: free the budget
            if pull is not asyncio.current_task():  # a pull that completes the round ends by itself
                pull.cancel()
        if self.jobs.get(job.kind) is job:
            del self.jobs[job.kind]

    async def _on_result(self, client: str, inc: Incoming) -> None:
        msg = inc.msg
        assert isinstance(msg, m.TaskResult)
        job = self._job_of(msg.task_id)
        if job is not None:
            _check_own_task(job, msg.task_id, client)
        if job is None:
            log.info("ignoring a late or unknown result from client %s", client)
            return
        if client in job.tracker.reported or client in job.tracker.failed or client in job.pulling:
            log.info("ignoring a repeated result from client %s", client)
            return
        job.last_result = asyncio.get_running_loop().time()
        await self._bound_result(job, client, msg)
        if job.kind == "validate":
            error = msg.error if not msg.ok else None
            await self._report("validate", job, client, msg.data, error)
            ready = job.tracker.on_refused(client, error) if error else job.tracker.on_update(client)
            if ready:
                await self._complete(job)
            return
        try:
            if not msg.ok:
                raise UpdateRejected(msg.error or "the client reported a failure")
            claimed = read_num_examples(msg.data.get("metadata"))
            weight = clip_examples(claimed, job.max_examples)
            if weight != claimed:  # clipped, not refused: a large honest site still counts, at the cap
                log.warning("round %d: client %s claims %d examples; counted as %d (max_examples_per_client)", job.round_index, client, claimed, weight)
            size = msg.size
            if not isinstance(size, int) or size <= 0:
                raise ProtocolError("a train result must say the size of its update")
            if size > job.update_limit:
                raise PayloadError(f"update of {fmt_bytes(size)} exceeds the limit of {fmt_bytes(job.update_limit)} (twice the model)")
        except ScaleoutError as exc:
            await self._refuse_update(job, client, msg, exc)
            return
        # Pulled in its own task: this link goes on reading (pings, metrics) while it waits.
        job.pulling[client] = self._spawn(self._pull(job, client, msg, weight, size))

    async def _refuse_update(self, job: Job, client: str, msg: m.TaskResult, exc: ScaleoutError) -> None:
        """Leave a client's update out of the round, say why, and close the round if it was the last."""
        log.warning("round %d: update from %s refused: %s", job.round_index, client, exc)
        await self._report("train", job, client, msg.data, str(exc))
        if job.tracker.on_refused(client, str(exc)):
            await self._complete(job)

    async def _pull(self, job: Job, client: str, msg: m.TaskResult, weight: int, size: int) -> None:
        """Fetch a client's update when the upload budget has room, check it and fold it in.

        The budget bounds the bytes of updates being pulled and checked at once, so memory
        does not grow with the number of clients that finish together; a waiting client holds
        its update. Its values are checked chunk by chunk as they land (the link's worker, right
        after each chunk's hash); the header and the change's norm in a thread. A checked update
        in its own file gives the budget back and waits for the fold within ``fold_wait``; the
        fold is serialised (what waits for it is folded together, up to FOLD_BATCH in one pass).
        """
        try:
            async with self.uploads.hold(size) as give_back:
                async with self.pull_slots:  # the transfer only: the check and fold free the slot
                    link = self.clients.get(client)
                    if self.jobs.get(job.kind) is not job or client not in job.tracker.pending or link is None:
                        return  # the round closed, or the client left (it announces again when back)
                    # Written to a temporary file as it arrives and read back mapped, a stretch at a
                    # time, by the fold: the update is never all in memory beside the sums. Its values
                    # are checked chunk by chunk as they land, right after each is hashed (in cache).
                    landing = LandingCheck(job.agg.template, size) if job.agg is not None else None
                    link.max_payload, link.file_payloads, link.landing = size, True, landing
                    try:
                        blob, digest = await self._watched_pull(link, msg.task_id, job.tracker.deadline)
                    finally:
                        link.max_payload, link.file_payloads, link.landing = self._client_limit(client), False, None
                if blob is None or len(blob) != size:
                    raise PayloadError(f"the client announced an update of {size} bytes and sent {0 if blob is None else len(blob)}")
                if self.jobs.get(job.kind) is not job or job.agg is None:
                    return  # the round closed while the update was on its way
                # Its verdict counts for these bytes only (not another payload the client sent meanwhile); None: the whole check decides.
                landed = landing.verdict() if landing is not None and landing.payload is blob else None
                checked = await asyncio.to_thread(_check_update, job, blob, landed)
                if job.forward:
                    ready = await self._forward(job, client, msg, blob, digest, checked, weight)
                elif isinstance(blob, mmap.mmap):
                    # Checked and in its own file: it waits for the fold out of the upload budget
                    # (within fold_wait), so the next updates are pulled meanwhile and what waits
                    # is folded together, up to FOLD_BATCH in one pass.
                    ready = await job.folds.fold_out_of_budget(checked, float(weight), client, size, give_back, self.fold_wait)
                else:  # folded with the other checked updates waiting then, in one pass (roles/folding.py)
                    ready = await job.folds.fold(checked, float(weight), client)
                del checked, blob, landing  # the views (and the landing check's mark) hold the bytes: they go now
        except LinkClosed:
            return  # the reconnect grace decides; a client back in time announces again
        except ScaleoutError as exc:
            await self._refuse_update(job, client, msg, exc)
            return
        finally:
            if job.pulling.get(client) is asyncio.current_task():  # not a newer pull of the same client
                del job.pulling[client]
        log.info("round %d: update from %s accepted (%d examples)", job.round_index, client, weight)
        await failpoint("collect")  # an update folded in, the partial not yet announced
        await self._report("train", job, client, msg.data, None)
        if ready:
            await self._complete(job)

    async def _forward(self, job: Job, client: str, msg: m.TaskResult, blob: bytes, digest: str | None, checked: Any, weight: int) -> bool:
        """A ``needs_updates`` round: hand a checked update to the controller instead of
        folding it. It is announced (RoundUpdate) and held, inside the upload budget, until
        the controller pulls it with ``update.get``, so the combiner never holds more than
        the budget however slowly the controller takes them. True when the round is complete.
        ``digest``: the sha256 the link checked ``blob`` against as it arrived."""
        data = await asyncio.to_thread(_forwarded_bytes, job, blob, checked, digest)
        key = (job.session_id, job.round_index, client)
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.forwards[key] = (data, taken)
        try:
            if self.controller is None:
                raise UpdateRejected("the combiner is not connected to the controller")
            metadata = msg.data.get("metadata")
            await self.controller.send(m.RoundUpdate(
                session_id=job.session_id, round_index=job.round_index, client=client, num_examples=weight, size=len(data.data),
                metadata=metadata if isinstance(metadata, dict) else {}, attempt=job.attempt,
            ))
            wait = job.tracker.deadline + FORWARD_GRACE_S - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(asyncio.shield(taken), max(0.0, wait))
            except asyncio.TimeoutError:
                raise UpdateRejected("the controller did not take this update by the round's deadline") from None
        finally:
            self.forwards.pop(key, None)
        async with job.lock:
            if self.jobs.get(job.kind) is not job:
                raise UpdateRejected("the round closed while the update was forwarded")
            job.forwarded[client] = weight
            return job.tracker.on_update(client)

    async def _watched_pull(self, link: Link, task_id: str, deadline: float) -> tuple[bytes | None, str | None]:
        """Ask a client for its update (and the sha256 the link checked it against as it
        arrived) and wait as long as bytes keep coming: a stalled client
        (nothing for PULL_STALL_S since it was asked, or since its last byte) or one still
        sending at the round's deadline is given up, so it cannot hold the upload budget from
        the others; a slow but steady one is not. It sleeps until the next moment one of
        those limits could be reached, not every second."""
        loop = asyncio.get_running_loop()
        asked: asyncio.Future[float] = loop.create_future()

        def on_sent() -> None:  # the stall clock starts when the request is written, not queued
            if not asked.done():
                asked.set_result(loop.time())

        request = asyncio.ensure_future(link.request_checked("update.get", {"task_id": task_id}, on_sent=on_sent))
        try:
            both: set[asyncio.Future[Any]] = {request, asked}
            done, _ = await asyncio.wait(both, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
            if request in done:
                return request.result()[1:]
            if not asked.done():
                raise PayloadError("its update was still arriving at the round timeout")
            seen, since = link.received_bytes, asked.result()
            while True:
                wake = min(since + PULL_STALL_S, deadline)
                landed, _ = await asyncio.wait({request}, timeout=max(0.0, wake - loop.time()))
                if landed:
                    return request.result()[1:]
                now = loop.time()
                if link.received_bytes != seen:
                    seen, since = link.received_bytes, max(since, link.received_at)
                elif now - since >= PULL_STALL_S:
                    raise PayloadError(f"sent nothing for {PULL_STALL_S:g} s when asked for its update")
                if now >= deadline:
                    raise PayloadError("its update was still arriving at the round timeout")
        finally:
            if not request.done():
                request.cancel()
            elif not request.cancelled():
                request.exception()  # failed (the link closed) as this pull was cancelled: not an error to log

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
                await quietly(link.send(m.Error(code=exc.code, message=str(exc), re=msg.id)))
            msg.data = {}
            if msg.ok:
                msg.ok, msg.error = False, str(exc)

    async def _report(self, kind: str, job: Job, client: str, data: dict[str, Any], error: str | None) -> None:
        assert self.controller is not None
        if kind == job.kind:  # the client's outcome; a metric it logged on the way is not one
            job.told.add(client)
        # Data entered within its limit (_on_metric, _bound_result): the report fits the controller's frames.
        error = clip_text(error) if error is not None else None
        if kind == job.kind and job.outcomes is not None:  # told with the others when the job completes
            job.outcomes.append({"client": client, "data": data, "error": error})
            return
        await self._announced(client)
        report = m.Report(kind=kind, session_id=job.session_id, round_index=job.round_index, client=client, data=data, error=error)
        await quietly(self.controller.send(report))

    async def _send_outcomes(self, job: Job, entries: list[dict[str, Any]] | None = None) -> None:
        """The clients' outcomes of a completed job (or ``entries`` taken from it), in one
        Reports message (pages of at most MAX_NAMES entries within a frame): one message per
        round, not one per client."""
        if entries is None:
            entries, job.outcomes = job.outcomes or [], None
        if not entries or self.controller is None:
            return
        if self._joined:  # the controller hears of clients that joined a moment ago before their outcomes
            if self._status_timer is not None:
                self._status_timer.cancel()
            await self._flush_changes()
        failed = sum(1 for e in entries if e["error"] is not None)
        page: list[dict[str, Any]] = []
        size = 0
        for entry in entries:
            more = json_size(entry) + 1
            if page and (len(page) >= m.MAX_NAMES or size + more > REPORTS_PAGE_BYTES):
                await quietly(self.controller.send(self._reports_page(job, page, len(entries) - failed, failed)))
                page, size = [], 0
            page.append(entry)
            size += more
        await quietly(self.controller.send(self._reports_page(job, page, len(entries) - failed, failed)))

    @staticmethod
    def _reports_page(job: Job, page: list[dict[str, Any]], done: int, failed: int) -> m.Reports:
        return m.Reports(kind=job.kind, session_id=job.session_id, round_index=job.round_index, entries=page, done=done, failed=failed)

    def _abort_late(self, job: Job) -> None:
        """Tell clients still working on this job that nobody waits for their result, in the
        background and ABORT_SEND_S at most each: a frozen client's socket (its buffers full,
        or closing for websockets' 10 s) must never hold up the end of a round."""
        late = set(job.tracker.expected) - job.tracker.reported - set(job.tracker.failed)
        late |= {c for c, why in job.tracker.failed.items() if "timeout" in why}
        for task_id, client in job.tasks.items():
            link = self.clients.get(client)
            if client in late and link is not None:
                abort = m.TaskAbort(session_id=job.session_id, task_id=task_id)
                self._spawn(quietly(asyncio.wait_for(link.send(abort), ABORT_SEND_S), f"telling {client} its task is aborted"))

    async def _complete(self, job: Job) -> None:
        """Tell the controller this combiner's share of the round is ready, once; a train
        round's partial is encoded now and kept until the controller pulls it."""
        from scaleout.core.aggregators.base import encode_partial_pieces

        if self.jobs.get(job.kind) is not job:
            return
        self._drop(job)
        assert self.controller is not None
        self._abort_late(job)
        for client in sorted(job.dropped):  # a burst of drops still going on at the round's end
            log.warning("round %d: client %s: %d metric messages were dropped", job.round_index, client, job.dropped[client])
            await self._report_dropped(job, client)
        # Clients lost, timed out or never reached are named too, not only those that answered.
        for client, reason in sorted(job.tracker.failed.items()):
            if client not in job.told:
                await self._report(job.kind, job, client, {}, reason)
        await self._send_outcomes(job)
        if job.kind == "validate":
            log.info("round %d: %d validations in, %d missing", job.round_index, len(job.tracker.reported), len(job.tracker.failed))
            await quietly(self.controller.send(m.ValidateDone(session_id=job.session_id, round_index=job.round_index)))
            return
        now = asyncio.get_running_loop().time()
        sent = job.sent if job.sent is not None else now
        last = job.last_result if job.last_result is not None else sent
        timing = {
            "distribute_s": round(sent - job.started, 4),
            "train_s": round(max(0.0, last - sent), 4),
            "collect_s": round(max(0.0, now - max(last, sent)), 4),
        }
        size, count, weight = 0, 0, 0.0
        if job.forward:  # the updates went up one by one: this says how many the controller should have
            count, weight = len(job.forwarded), float(sum(job.forwarded.values()))
        async with job.lock:
            if job.agg is not None and job.agg.count > 0:
                try:
                    p = job.agg.partial(copy=False)  # refused if not finite: never sent on
                    # Its header and views of the sums: streamed to the controller from the sums themselves.
                    data = await asyncio.to_thread(_encode_hashed, encode_partial_pieces, p)
                    self.partials = {(job.session_id, job.round_index): data}  # one round's share at a time
                    size, count, weight = len(data.data), p.count, p.weight
                except ScaleoutError as exc:
                    log.error("round %d: aggregate of %d updates not sent: %s", job.round_index, job.agg.count, exc)
            job.agg = None  # the partial's pieces hold the sums until the controller took them (or they were refused)
        msg = m.RoundPartial(
            session_id=job.session_id, round_index=job.round_index, count=count, weight=weight, size=size, timing=timing, attempt=job.attempt,
        )
        log.info("round %d: %d updates aggregated; telling the controller (%s to pull)", job.round_index, count, fmt_bytes(size))
        self.announced = msg
        await quietly(self.controller.send(msg))


async def _with_backoff(step: Callable[[], Awaitable[T]], stop: asyncio.Event, retryable: tuple[type[BaseException], ...]) -> T | None:
    """``step()`` until it succeeds, waiting with backoff after each ``retryable`` failure; a
    refused token or an untrusted certificate ends it at once. None when stopped first."""
    delays = backoff()
    while not stop.is_set():
        try:
            return await step()
        except (AuthError, TrustError):
            raise
        except retryable as exc:
            log.warning("controller not reachable yet (retrying): %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), next(delays))
        except asyncio.TimeoutError:
            pass
    return None


def _check_own_task(job: Job, task_id: str, client: str) -> None:
    """A client answers only its own tasks: a result or metric naming another client's task
    is refused (and logged), never counted for either of them."""
    owner = job.tasks.get(task_id)
    if owner is not None and owner != client:
        log.warning("round %d: client %s sent a message for task %s of client %s: refused", job.round_index, client, task_id, owner)
        raise AuthError(f"task {task_id} is not yours: a client may send results and metrics only for its own tasks")


def _encode_hashed(encode: Any, partial: Any) -> Hashed:
    """Encode a partial as pieces (never joined: no second copy of the sums) and hash them
    (in a thread, before the controller asks for it)."""
    data = Pieces(encode(partial))
    return Hashed(data, data.sha256())


def _client_list(blob: bytes | None, count: int, error: str | None) -> list[str]:
    """The names a round start or validate carries in its payload (a JSON list)."""
    if blob is None:
        raise ProtocolError(error or "the round's client list is missing")
    try:
        names = json.loads(blob)
    except (ValueError, RecursionError):
        raise ProtocolError("the round's client list is not JSON") from None
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) for n in names):
        raise ProtocolError(f"the round's client list must be a JSON list of {count} names")
    return names


def _mapped_copy(data: bytes) -> mmap.mmap:
    """``data`` written to an unnamed temporary file (gone with its last mapping, even if this
    process is killed) and mapped read-only: bytes-like, in the page cache, not the heap."""
    try:
        with tempfile.TemporaryFile(prefix="scaleout-model-") as fh:
            fh.write(data)
            fh.flush()
            return mmap.mmap(fh.fileno(), len(data), access=mmap.ACCESS_READ)
    except OSError as exc:  # a full temporary folder: the round is refused, the combiner goes on
        raise StorageError(exc.strerror or str(exc), "keeping the round's model in", tempfile.gettempdir(), exc.errno) from None


def _reader(*maps: Any) -> Callable[[np.ndarray], None] | None:
    """For the check and fold over a mapped model and update: let go of each stretch once it
    is read, so neither is brought whole into memory beside the sums (other buffers: nothing)."""
    spans = [(np.frombuffer(mp, dtype=np.uint8, count=1).ctypes.data, mp) for mp in maps if isinstance(mp, mmap.mmap) and len(mp)]
    if not spans:
        return None

    def read(stretch: np.ndarray) -> None:
        address = stretch.ctypes.data
        for base, mapped in spans:
            if base <= address < base + len(mapped):
                release(mapped, address - base, stretch.nbytes)

    return read


def _let_go(model: bytes | mmap.mmap) -> None:
    """Let go of the pages of a mapped model this process touched (sending or reading it):
    they are read back from its file when touched again."""
    if isinstance(model, mmap.mmap):
        release(model)


def _check_update(job: Job, blob: bytes, landed: dict[str, float] | None = None) -> Any:
    """Parse an update's header and check its values, dtypes and the size of its change
    against the round's model (off the loop). ``landed``: the peaks its values passed with
    as they landed (`LandingCheck`): they are not read again (None: checked here)."""
    # The model's pages a send to a slower client still touches are let go here too: they are
    # read back from its file as that send goes on, not held beside the sums this update fills.
    _let_go(job.model_map)  # type: ignore[arg-type]  # None (no mapped model): nothing to let go
    read = _reader(job.model_map, blob)  # kept by checked: the fold lets go of the update's pages too
    checked = job.agg.check(payload.views(blob), read, landed)
    log.debug("round %d: update values %s", job.round_index, "checked as they landed" if landed is not None else "checked whole")
    check_change(job.model, checked.arrays, job.norm_limit, read)
    if checked.converted:
        log.info("round %d: update tensors %s are not in the model's dtype: converted", job.round_index, ", ".join(map(repr, checked.converted[:5])))
    return checked


def _forwarded_bytes(job: Job, blob: bytes, checked: Any, digest: str | None) -> Hashed:
    """An update as it goes up to the controller: the client's bytes with ``digest``, the
    sha256 the link checked them against on receipt (not hashed again), or (when some tensor
    came in another width, float64 for float32, or its header differs in size from the
    model's) re-encoded in the model's dtypes, so the controller can expect the model's size, and hashed."""
    import hashlib

    if checked.converted or len(blob) != job.model_size:
        template = job.agg.template
        arrays = {name: np.asarray(a).astype(template[name].dtype) for name, a in checked.arrays.items()}
        blob = payload.encode_named(arrays, payload.layout_of(blob))
        digest = None
    if digest is None:
        digest = hashlib.sha256(blob).hexdigest()
    _let_go(blob)  # a mapped update is read again from its file as the controller pulls it
    return Hashed(blob, digest)


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


def _state_dir() -> Path:
    from scaleout.security.identity import default_state_dir

    return default_state_dir()


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds:.0f} s"
