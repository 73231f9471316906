"""The controller: global model and trail, sessions and rounds, registry, tokens, admin API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from scaleout.core import messages as m
from scaleout.core import payload, permissions
from scaleout.core.config import SessionConfig
from scaleout.core.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    LimitExceeded,
    NotFoundError,
    PayloadError,
    RemoteError,
    ProtocolError,
    ScaleoutError,
    StorageError,
    UpdateRejected,
)
from scaleout.core.limits import MAX_METRIC_BYTES, MAX_RESULT_BYTES, check_size, clip_text, transfer_timeout
from scaleout.core.metrics import mean_metrics
from scaleout.core.rounds import ControllerRound, Outcome
from scaleout.core.ratelimit import DEFAULT_RATE
from scaleout.core.selection import Assigner, choose_validators, select_clients
from scaleout.roles.command_service import CommandService
from scaleout.package.limits import UnpackLimits
from scaleout.roles.common import announce, audit_actor, close_now, bracket, cert_names, dial_urls, new_id, url_host
from scaleout.roles.exporter import Observer
from scaleout.roles.events import EventHub, snapshot
from scaleout.security import tls, tokens
from scaleout.security.packages import KEY_FILE as PACKAGE_KEY
from scaleout.security.packages import PackageSigner
from scaleout.store.blobs import BlobStore, secure_data_dir
from scaleout.store.registry import RegistryWriter
from scaleout.store.state import AUDIT_HEAD, State
from scaleout.transport.link import DEFAULT_MAX_PAYLOAD, Hashed, Incoming, Link, LinkClosed, RequestTimeout
from scaleout.transport.net import HANDSHAKE_TIMEOUT, serve

log = logging.getLogger("scaleout.controller")
T = TypeVar("T")

MODEL = ("models", ".safetensors")
PACKAGE = ("packages", ".tgz")
STATE = ("state", ".safetensors")  # what a strategy keeps across the rounds of a session
ADMIN_TOKEN_TTL = 365 * 86400
PARTIAL_GRACE_S = 5.0
PARTIAL_ENCODE_RATE = 100e6  # bytes/s a combiner encodes and hashes its partial at, at the least
ASSIGNMENT_TTL_S = 30.0
SMALL_PAYLOAD = 1 << 20
RECORD_RETRY_S = (1.0, 30.0)  # first and longest wait between tries to record a session's end
HELLO_TIMEOUT_S = 10.0  # a combiner-token link that has not registered by then is closed
CLIENT_IDLE_S = 60.0  # a client-token link that asks nothing for this long is closed
BURST_FACTOR = 10  # connections an address may open at once: this many seconds' worth


@dataclass
class ControllerSettings:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8090
    san: list[str] = field(default_factory=list)  # more names for the generated certificate
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    max_payload: int = DEFAULT_MAX_PAYLOAD
    combiner_cert_ttl: int = 7 * 86400  # seconds a combiner's certificate lives; renewed after 2/3 of it
    metrics_port: int | None = None  # Prometheus metrics on this port (0: a free one); None: off
    metrics_host: str = "127.0.0.1"
    max_connect_rate: float = DEFAULT_RATE  # new connections per second per address (0: no limit)
    package_limits: UnpackLimits = field(default_factory=UnpackLimits)
    hello_timeout: float = HELLO_TIMEOUT_S  # a combiner-token link that has not registered by then is closed
    idle_timeout: float = CLIENT_IDLE_S  # a client-token link that asks nothing for this long is closed
    handshake_timeout: float = HANDSHAKE_TIMEOUT  # TLS and websocket handshakes, from the TCP connection on


@dataclass
class CombinerConn:
    name: str
    link: Link
    url: str | None = None
    clients: set[str] = field(default_factory=set)


@dataclass
class RunningSession:
    id: str
    config: SessionConfig
    task: asyncio.Task[None] | None = None
    stopped: bool = False
    round_index: int = 0
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    server_state: dict[str, Any] = field(default_factory=dict)  # what the strategy keeps across rounds
    stop_reason: str | None = None  # why it was stopped ("stopped by an admin", "controller shut down")
    storage_failure: StorageError | None = None  # a write failed (a full disk): the session ends


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


Handler = Callable[[Link, dict[str, Any], bytes | None], Awaitable[tuple[dict[str, Any], bytes | Hashed | None]]]


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.dir = settings.data_dir
        self.combiners: dict[str, CombinerConn] = {}
        self.session: RunningSession | None = None
        self.subscribers: set[Link] = set()
        self.hub = EventHub()  # the typed event stream to subscribed admin links
        self._emitting: dict[Link, asyncio.Future[bool]] = {}  # session.wait followers: the event being sent to each
        self.registry_changed = asyncio.Event()
        self.assigner = Assigner(ASSIGNMENT_TTL_S)  # who is where, and where a new client should go
        # The clients each combiner was given in the current round: it may report and
        # aggregate for those (and for the clients attached to it), no others.
        self.round_members: dict[str, frozenset[str]] = {}
        self._registering: set[Link] = set()  # combiner links whose combiner.register is being handled
        self._model_cache: tuple[str, bytes] | None = None  # the one model kept in memory
        self._package_cache: tuple[str, bytes] | None = None  # the active package, as clients fetch it
        self._unrecorded: dict[str, SessionEnd] = {}  # session id -> its end, not yet in state.db
        self._record_retry: asyncio.Task[None] | None = None
        self.url = ""
        self.obs = Observer()  # counts for Prometheus with --metrics-port (roles/exporter.py)
        self._ops: dict[str, tuple[frozenset[str], Handler]] = {
            "status": (ADMIN, self._status),
            "token.create": (ADMIN, self._token_create),
            "package.set_active": (ADMIN, self._package_set_active),
            "package.get": (ADMIN | CLIENT, self._package_get),
            "model.set_seed": (ADMIN, self._model_set_seed),
            "model.ls": (ADMIN, self._model_ls),
            "model.show": (ADMIN, self._model_show),
            "model.get": (ADMIN | COMBINER, self._model_get),
            "session.start": (ADMIN, self._session_start),
            "session.ls": (ADMIN, self._session_ls),
            "session.show": (ADMIN, self._session_show),
            "session.stop": (ADMIN, self._session_stop),
            "session.wait": (ADMIN, self._session_wait),
            "client.ls": (ADMIN, self._client_ls),
            "client.wait": (ADMIN, self._client_wait),
            "combiner.ls": (ADMIN, self._combiner_ls),
            "metric.ls": (ADMIN, self._metric_ls),
            "client.assign": (CLIENT, self._client_assign),
            "combiner.register": (COMBINER, self._combiner_register),
            "combiner.ready": (COMBINER, self._combiner_ready),
            "events.snapshot": (ADMIN, lambda link, args, blob: self._snapshot(args)),
            # Tokens and node identities (roles/enrolment.py).
            "node.enrol": (CLIENT | COMBINER, lambda *a: self.desk.enrol(*a)),
            "token.ls": (ADMIN, lambda *a: self.desk.token_ls(*a)),
            "token.revoke": (ADMIN, lambda *a: self.desk.token_revoke(*a)),
            "client.rm": (ADMIN, lambda *a: self.desk.client_rm(*a)),
            "combiner.rm": (ADMIN, lambda *a: self.desk.combiner_rm(*a)),
            "combiner.renew": (COMBINER, lambda *a: self.desk.combiner_renew(*a)),
            "audit.ls": (ADMIN, self._audit_ls),
            "audit.verify": (ADMIN, self._audit_verify),
        }
        self.commands = CommandService(self)  # custom commands, predictions, clients' attributes and telemetry
        self._ops.update({op: (ADMIN, handler) for op, handler in self.commands.ops().items()})

    # -- lifecycle --------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the data directory, TLS material, signing key, admin token and state."""
        # Only this user reads what the controller writes: the data dir is 0700, and
        # state.db (with its -wal and -shm), models and packages 0600 (see secure_data_dir).
        os.umask(0o077)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        secure_data_dir(self.dir)
        self._lock = _lock_data_dir(self.dir)
        self.state = State(self.dir / "state.db")
        self.registry = RegistryWriter(self.dir / "state.db")
        self.blobs = BlobStore(self.dir)
        self.commands.prepare()
        self.signer = tokens.TokenSigner.load_or_create(self.dir / "token.key")
        self.verifier = tokens.TokenVerifier(self.signer.public_pem())
        from scaleout.roles.enrolment import Desk

        self.desk = Desk(self)  # after the verifier: it loads the revoked ids into it
        self.package_signer = PackageSigner.load_or_create(self.dir / PACKAGE_KEY)
        self.ssl_context = None
        self.ca_fingerprint: str | None = None
        s = self.settings
        if s.insecure:
            log.warning("TLS is OFF (--insecure): tokens and models travel in clear text")
        else:
            files = tls.ensure_controller_tls(self.dir, cert_names(s.host, s.san))
            self.ca_pem = files.ca_cert.read_bytes()
            self.ca_key_pem = files.ca_key.read_bytes()
            self.ca_fingerprint = tls.fingerprint(self.ca_pem)
            cert, key = (s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else (files.cert, files.key)
            self.ssl_context = tls.server_context(cert, key)
            if cert == files.cert:
                log.info("TLS certificate valid for %s (add names with --san)", ", ".join(tls.names_in(cert)))
        # Nobody is connected to a controller that is just starting.
        for row in self.state.combiners():
            self.state.upsert_combiner(row["name"], "offline", clients=0)
            self.state.set_clients_offline(row["name"], keep=set())
        # A running session interrupted by a crash or shutdown cannot resume yet: say so.
        for row in self.state.sessions():
            if row["status"] == "running":
                for r in self.state.rounds(row["id"]):
                    if r["status"] == "running":
                        self.state.finish_round(row["id"], r["idx"], status="failed", reason="controller restarted")
                self.state.finish_session(row["id"], "stopped", self.state.get_meta("active_model"), "controller restarted")

    def _write_admin_token(self) -> None:
        path = self.dir / "admin.token"
        if path.exists():
            try:
                self.verifier.verify(path.read_text().strip(), time.time(), roles={"admin"})
                return
            except AuthError:
                log.info("admin token in %s is no longer valid: writing a new one", path)
        token = self.desk.issue("admin", ADMIN_TOKEN_TTL, name="admin", uses=None, sans=[], creator="controller")["token"]
        tls.write_private(path, (token + "\n").encode())

    async def run(self, stop: asyncio.Event) -> None:
        self.prepare()
        s = self.settings
        if s.metrics_port is not None:
            from scaleout.roles import exporter

            self.obs = await asyncio.to_thread(exporter.start, s.metrics_host, s.metrics_port)
            log.info("Prometheus metrics at %s", self.obs.url)
        public = {"/ca.pem": self.ca_pem.decode()} if self.ssl_context is not None else None
        server, port = await serve(
            self._on_link, self._authenticate, s.host, s.port, self.ssl_context, max_payload=s.max_payload, public=public,
            connect_rate=(s.max_connect_rate, s.max_connect_rate * BURST_FACTOR) if s.max_connect_rate > 0 else None,
            handshake_timeout=s.handshake_timeout,
        )
        scheme = "ws" if s.insecure else "wss"
        self.url = f"{scheme}://{url_host(s.host)}:{port}"
        self._write_admin_token()
        info = {"url": self.url, "ca": str((self.dir / "ca.pem").resolve()) if not s.insecure else None, "metrics_url": self.obs.url}
        tls.write_public(self.dir / "controller.json", (json.dumps(info) + "\n").encode())
        self.registry.start()
        from scaleout.roles.welcome import show_join_commands

        show_join_commands(self)  # its files are written before the ready line
        announce(f"{scheme}://{bracket(s.host)}:{port}", dial_urls(scheme, s.host, port))
        try:
            await stop.wait()
        finally:
            log.info("controller shutting down")
            if self.session is not None:
                await self._stop_session(self.session, "controller shut down")
            if self._record_retry is not None:
                self._record_retry.cancel()
            if self._record_ends() is not None:
                log.error("sessions %s end unrecorded: the next start marks them stopped", ", ".join(self._unrecorded))
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
            await self.hub.close()
            await self.registry.close()
            await self.commands.close()
            self.state.close()
            await asyncio.to_thread(self.obs.close)

    def _authenticate(self, token: str | None) -> tokens.TokenClaims:
        if not token:
            raise AuthError("no token given: pass one with --token (see scaleout token create)")
        return self.verifier.verify(token, time.time())

    # -- links --------------------------------------------------------------------------

    async def _on_link(self, link: Link) -> None:
        role = link.claims.role
        log.debug("%s connected with a %s token", link.peer, role)
        if role != "admin":
            # Clients only ask, and a combiner uploads a partial only when asked for it (the
            # limit is raised for that one pull; registering sets SMALL_PAYLOAD): no node link
            # may send a payload on its own, none holds more than one at a time.
            link.max_payload = 0
            link.max_in_flight = 1
        self.desk.on_link(link)

        def authorize(req: m.Request) -> None:
            if req.op not in self._ops:
                raise ProtocolError(f"unknown operation {req.op!r}")
            permissions.check_request(role, req.op)  # the one table (core/permissions.py), before any handler
            if role == "combiner" and req.op not in ("combiner.register", "node.enrol") and not self._registered(link):
                raise AuthError(f"register first: a combiner may do {req.op} once it has registered (combiner.register)")

        async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | Hashed | None]:
            authorize(req)  # done by the link already; kept here so no path skips it
            registering = req.op == "combiner.register"
            if registering:
                self._registering.add(link)  # the hello timeout waits for a registration under way
            try:
                result = await self._ops[req.op][1](link, req.args, blob)
            finally:
                if registering:
                    self._registering.discard(link)
            kind = PAYLOAD_OPS.get(req.op)
            if kind is not None:  # models and packages in and out, for --metrics-port
                self.obs.moved("in", kind, len(blob or b""))
                out = result[1]
                self.obs.moved("out", kind, len(out.data) if isinstance(out, Hashed) else len(out or b""))
            return result

        link.authorize = authorize

        # What each role may send is checked there first; an admin may only subscribe to events.
        on_message = self._admin_message(link) if role == "admin" else self._combiner_message(link)
        watch = None
        if role == "combiner":  # registers at once; a link that does not is dropped
            greeted = lambda: self._registered(link) or link in self._registering  # noqa: E731
            watch = asyncio.ensure_future(link.watch(greeted=greeted, hello_s=self.settings.hello_timeout))
        elif role == "client":  # asks for a combiner or the package, then goes
            watch = asyncio.ensure_future(link.watch(idle_s=self.settings.idle_timeout))
        try:
            await link.run(on_message=on_message, on_request=on_request)
        finally:
            if watch is not None:
                watch.cancel()
            self.subscribers.discard(link)
            self.hub.unsubscribe(link)
            self.desk.gone(link)
            if role == "combiner":
                self._combiner_gone(link)

    def _admin_message(self, link: Link) -> Callable[[Incoming], Awaitable[None]]:
        async def handle(inc: Incoming) -> None:
            if not isinstance(inc.msg, m.Subscribe):
                raise ProtocolError(f"an admin may not send {inc.msg.type}")
            self.hub.subscribe(link, inc.msg)

        return handle

    async def _snapshot(self, args: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
        return await snapshot(self, args), None

    def _registered(self, link: Link) -> bool:
        return any(c.link is link for c in self.combiners.values())

    def _combiner_of(self, link: Link) -> CombinerConn:
        for c in self.combiners.values():
            if c.link is link:
                return c
        raise ProtocolError("register first (combiner.register)")

    def _combiner_gone(self, link: Link) -> None:
        for name, c in list(self.combiners.items()):
            if c.link is link:
                del self.combiners[name]
                self.assigner.combiner_gone(name)
                log.warning("combiner %s disconnected (%d clients were attached)", name, len(c.clients))
                self.hub.publish(m.CombinerLeft(combiner=name, clients=len(c.clients)))
                if self.session is not None:  # the link says which registration was lost
                    self.session.events.put_nowait(("lost", (name, link)))
                self._registry_changed()
                self.registry.combiner(name, "offline", clients=0)
                self.commands.combiner_gone(name)

    def _registry_changed(self) -> None:
        self.registry_changed.set()
        self.registry_changed = asyncio.Event()
        self._count_nodes()

    def _count_nodes(self) -> None:
        self.obs.nodes(len(self.combiners), sum(len(c.clients) for c in self.combiners.values()))

    def _combiner_message(self, link: Link) -> Callable[[Incoming], Awaitable[None]]:
        async def handle(inc: Incoming) -> None:
            try:
                await record(inc)
            except StorageError as exc:  # the controller's disk, not the combiner's fault
                log.error("could not record a %s from combiner %s: %s", inc.msg.type, link.peer, exc)

        async def record(inc: Incoming) -> None:
            msg = inc.msg
            permissions.check_message(link.claims.role, msg.type, "controller")
            c = self._combiner_of(link)
            if isinstance(msg, m.ClientsChanged):
                # Deltas: O(1) per client; the writes go to state.db in batches, off the loop.
                if len(msg.joined) > m.MAX_NAMES or len(msg.left) > m.MAX_NAMES:
                    raise ProtocolError(f"clients.changed: at most {m.MAX_NAMES} names per list")
                for client in (*msg.joined, *msg.left):  # all checked before any is applied
                    m.check_name(client, "client name")
                for client in msg.joined:
                    elsewhere = self.assigner.where.get(client)
                    if elsewhere is not None and elsewhere != c.name and elsewhere in self.combiners:
                        # One name, one node: the newest connection counts, once, wherever it is.
                        log.warning("client %s is now on combiner %s (it was on %s)", client, c.name, elsewhere)
                        self.combiners[elsewhere].clients.discard(client)
                    c.clients.add(client)
                    self.assigner.client_joined(c.name, client)
                    self.hub.publish(m.ClientJoined(client=client, combiner=c.name, package=self.hub.packages.get(client, "")))
                    self.registry.client(client, "online", c.name)
                for client in msg.left:
                    if client not in c.clients:
                        continue  # never joined here (or moved on): not this combiner's to remove
                    c.clients.discard(client)
                    self.assigner.client_left(c.name, client)
                    if client not in self.assigner.where:  # not already back on another combiner
                        self.registry.client(client, "offline", c.name)
                        self.hub.publish(m.ClientLeft(client=client, combiner=c.name))
                self.registry.combiner(c.name, "online", clients=len(c.clients))
                self._registry_changed()
            elif isinstance(msg, m.Report):
                self._store_report(c, msg)
            elif isinstance(msg, (m.CommandResult, m.ClientLog, m.ClientStatus)):
                self.commands.on_message(c, msg)
            elif isinstance(msg, (m.RoundPartial, m.ValidateDone)):
                s = self.session
                if s is None or msg.session_id != s.id:  # stale rounds are dropped by _next_event
                    log.info("ignoring a late %s from combiner %s", msg.type, c.name)
                    return
                s.events.put_nowait((msg.type, (c.name, msg, link)))
            else:
                raise ProtocolError(f"a combiner may not send {msg.type}")

        return handle

    def _store_report(self, c: CombinerConn, msg: m.Report) -> None:
        """Store one client's report within the limits a combiner applies (core/limits.py):
        a report beyond them is cut down, never allowed to fill state.db."""
        if msg.kind not in REPORT_KINDS:
            raise ProtocolError(f"report: kind must be one of {', '.join(REPORT_KINDS)}, got {msg.kind!r:.40}")
        m.check_name(msg.session_id, "report: session id")
        m.check_name(msg.client, "report: client name")
        if msg.client not in c.clients and msg.client not in self.round_members.get(c.name, ()):
            raise AuthError(f"combiner {c.name} may not report for client {msg.client!r}: not one of its clients")
        data, error = msg.data, clip_text(msg.error) if msg.error is not None else None
        try:
            check_size(data, REPORT_KINDS[msg.kind], f"{msg.kind} report data")
        except LimitExceeded as exc:
            log.warning("combiner %s: client %s: %s: stored without it", c.name, msg.client, exc)
            data = {}
        self.registry.report(msg.kind, msg.session_id, msg.round_index, msg.client, data, error)
        if msg.kind == "train":
            self.obs.update_reported(error)
        self.hub.report(msg.kind, msg.session_id, msg.round_index, msg.client, data, error)
        if error:
            log.warning("client %s: %s: %s", msg.client, msg.kind, error.removeprefix(f"{msg.kind} "))

    # -- combiner and client registry -----------------------------------------------------

    async def _combiner_register(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        name = m.check_name(args.get("name"), "combiner name")
        self.desk.node_identity(link, "combiner", name, args)
        csr = args.get("csr")
        advertise = args.get("advertise") if isinstance(args.get("advertise"), str) else None
        cert = self.desk.sign(link, str(csr), advertise) if csr and self.ssl_context is not None else None  # refused before any takeover
        old = self.combiners.get(name)
        if old is not None and old.link is not link:
            # The newest registration wins: the old link is usually dead (a restart after a
            # network loss); a live twin learns why from the close code and stops.
            log.warning("combiner %s registered again: closing its older connection", name)
            self._combiner_gone(old.link)
            await close_now(old.link, m.CLOSE_SUPERSEDED, f"another combiner registered as {name}")
        result: dict[str, Any] = {"token_public_key": self.signer.public_pem().decode(), "revoked": sorted(self.verifier.revoked)}
        if csr:
            if self.ssl_context is None:
                raise ConflictError("this controller runs without TLS (--insecure); start the combiner with --insecure too")
            result["cert"] = cert
            result["cert_ttl_s"] = self.settings.combiner_cert_ttl
        renewed = self.desk.renewed(link)
        if renewed is not None:
            result["token"] = renewed
        self.combiners[name] = CombinerConn(name, link)
        self._count_nodes()
        link.max_payload = SMALL_PAYLOAD  # raised to the size of a partial when a round starts
        self.state.upsert_combiner(name, "registered")
        self.state.audit(_actor(link), "combiner.register", address=link.peer, name=name)
        return result, None

    async def _combiner_ready(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        c = self._combiner_of(link)
        url = args.get("url")
        scheme = "ws://" if self.ssl_context is None else "wss://"
        if not isinstance(url, str) or not url.startswith(scheme):
            raise ProtocolError(f"combiner.ready needs the {scheme} url clients should dial")
        self.desk.check_ready_url(link, url)
        c.url = url
        self.assigner.combiner_ready(c.name)
        self.state.upsert_combiner(c.name, "online", url=url)
        log.info("combiner %s ready at %s", c.name, url)
        self.hub.publish(m.CombinerJoined(combiner=c.name, url=url))
        self._registry_changed()
        return {}, None

    async def _client_assign(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        name = m.check_name(args.get("name"), "client name")
        self.desk.node_identity(link, "client", name, args)
        if isinstance(args.get("package"), str):  # which package it runs, for watchers (tui)
            self.hub.packages[name] = args["package"][:200]
        prefer = args.get("prefer")
        best = self.assigner.assign(name, asyncio.get_running_loop().time(), prefer if isinstance(prefer, str) else None)
        c = self.combiners[best]
        if self.assigner.where.get(name) != best:
            log.info("client %s assigned to combiner %s", name, best)
        reply: dict[str, Any] = {"combiner": c.name, "url": c.url, "package": self.state.get_meta("active_package")}
        renewed = self.desk.renewed(link)
        if renewed is not None:
            reply["token"] = renewed
        return reply, None

    async def _client_ls(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        await self.registry.flush()  # what was queued a moment ago is shown too
        return {"clients": await asyncio.to_thread(self.registry.read, "clients")}, None

    async def _client_wait(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        """Return once at least ``count`` clients are connected, or fail at ``timeout``."""
        count, timeout = args.get("count", 1), args.get("timeout", 60)
        if not isinstance(count, int) or not isinstance(timeout, (int, float)):
            raise ProtocolError("client.wait needs count (int) and timeout (seconds)")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (n := sum(len(c.clients) for c in self.combiners.values() if c.url)) < count:
            if loop.time() >= deadline:
                raise ConflictError(f"only {n} of {count} clients connected within {timeout}s")
            try:
                await asyncio.wait_for(self.registry_changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass
        return {"clients": n}, None

    async def _combiner_ls(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        await self.registry.flush()
        return {"combiners": await asyncio.to_thread(self.registry.read, "combiners")}, None

    async def _metric_ls(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        """What clients logged with log_metric, one row per value, oldest first: the latest
        ``limit`` (0: all) matching ``session_id`` ("latest" too), ``round_index``, and the
        globs ``client`` and ``key``; with how many match in all."""
        from scaleout.store.metrics import KINDS, dropped_metrics, logged_metrics

        kind = args.get("kind", "metric")  # telemetry (issue 9) is listed the same way once it is a report kind
        if kind not in KINDS:
            raise ProtocolError(f"metric.ls: kind must be one of {', '.join(KINDS)}")
        session_id, client, key = args.get("session_id"), args.get("client"), args.get("key")
        round_index, limit = args.get("round_index"), args.get("limit", 0)
        for name, value in (("session_id", session_id), ("client", client), ("key", key)):
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 256):
                raise ProtocolError(f"metric.ls: {name} must be text of 1-256 characters")
        for name, value in (("round_index", round_index), ("limit", limit)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ProtocolError(f"metric.ls: {name} must be a whole number >= 0")
        if session_id is not None:
            session_id = self._session_key({"id": None if session_id == "latest" else session_id})
            self.state.session(session_id)  # no such session: say so, rather than list nothing
        await self.registry.flush()  # what came in a moment ago is listed too
        rows, total = await asyncio.to_thread(
            self.registry.query,
            lambda st: logged_metrics(st, kind=kind, session_id=session_id, round_index=round_index, client=client, key=key, limit=limit or 0),
        )
        dropped = await asyncio.to_thread(
            self.registry.query, lambda st: dropped_metrics(st, kind=kind, session_id=session_id, round_index=round_index, client=client),
        )
        return {"metrics": rows, "total": total, "dropped": dropped}, None

    async def _status(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        return {
            "url": self.url,
            "active_model": self.state.get_meta("active_model"),
            "active_package": self.state.get_meta("active_package"),
            "session": self.session.id if self.session else None,
            "combiners": len(self.combiners),
            "clients": sum(len(c.clients) for c in self.combiners.values()),
            "metrics_url": self.obs.url,  # None without --metrics-port
        }, None

    # -- audit ----------------------------------------------------------------------------

    async def _audit_ls(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        since, limit = args.get("since"), args.get("limit", 100)
        if since is not None and (not isinstance(since, (int, float)) or isinstance(since, bool) or not math.isfinite(since)):
            raise ProtocolError("audit.ls: since must be unix seconds")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 1_000_000:
            raise ProtocolError("audit.ls: limit must be a whole number from 0 (all) to 1000000")
        rows = await asyncio.to_thread(_read_state, self.dir / "state.db", lambda st: st.audit_log(limit or -1, since))
        return {"entries": rows[::-1]}, None  # oldest first, as a log reads

    async def _audit_verify(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        checked, broken, head = await asyncio.to_thread(
            _read_state, self.dir / "state.db", lambda st: (*st.audit_verify(), st.get_meta(AUDIT_HEAD)),
        )
        # The head ("<id> <hash>" of the newest entry): kept elsewhere, it shows a rewritten chain too.
        result: dict[str, Any] = {"ok": broken is None, "entries": checked, "head": head}
        if broken is not None:
            result["broken"] = {"id": broken.id, "reason": broken.reason}
        return result, None

    # -- tokens, packages, models ----------------------------------------------------------

    async def _token_create(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        role = args.get("role")
        ttl = args.get("ttl_s")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 < ttl <= tokens.MAX_TTL_S:
            raise ProtocolError(f"token.create needs ttl_s, a whole number of seconds from 1 to {tokens.MAX_TTL_S} (100 years)")
        if role not in tokens.ROLES:
            raise ProtocolError(f"token.create: role must be one of {', '.join(tokens.ROLES)}")
        name, uses, sans = args.get("name"), args.get("uses"), args.get("sans") or []
        if name is not None:
            m.check_name(name, "token name")
        if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or not 0 < uses <= 1_000_000):
            raise ProtocolError("token.create: uses must be a whole number from 1 to 1000000")
        if not isinstance(sans, list) or len(sans) > 32 or not all(isinstance(x, str) and 0 < len(x) <= 253 for x in sans):
            raise ProtocolError("token.create: sans must be a list of at most 32 names or addresses")
        if sans and role != "combiner":
            raise ProtocolError("token.create: only a combiner token allows certificate names (--san)")
        from scaleout.roles.enrolment import canonical

        result = self.desk.issue(str(role), ttl, name=name, uses=uses, sans=[canonical(x) for x in sans], creator=_actor(link))
        self.state.audit(
            _actor(link), "token.create", address=link.peer, role=role, jti=result["jti"], exp=result["expires"], name=name, uses=uses, sans=result["sans"],
        )
        return result, None

    async def _package_set_active(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        if not blob:
            raise ProtocolError("package.set_active needs the package bytes")
        if self.session is not None:
            raise ConflictError(f"session {self.session.id} is running; its clients run the current package (stop it first)")
        await asyncio.to_thread(_check_package, blob, self.settings.package_limits)
        digest = await asyncio.to_thread(self.blobs.put, PACKAGE[0], blob, PACKAGE[1])
        name = str(args.get("name") or "package.tgz")
        with self.state.transaction():
            self.state.add_package(digest, name, len(blob), signature=self.package_signer.sign(digest))
            self.state.set_meta("active_package", digest)
            self.state.audit(_actor(link), "package.set_active", address=link.peer, id=digest, name=name)
        log.info("compute package %s (%s) is now active", name, digest[:12])
        self.hub.publish(m.ActiveChanged(what="package", id=digest, name=name))
        await self.commands.package_changed(digest, name)  # connected clients fetch it before their next task
        return {"id": digest, "name": name, "size": len(blob)}, None

    async def _package_get(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], Hashed]:
        digest = self.state.get_meta("active_package")
        if digest is None:
            raise NotFoundError("package", "active", text="no compute package is active yet; an admin must run: scaleout package set-active FILE")
        row = self.state.package(digest)
        # Every joining client fetches it: read and checked once (in a thread), then kept.
        if self._package_cache is None or self._package_cache[0] != digest:
            self._package_cache = (digest, await asyncio.to_thread(self.blobs.get, PACKAGE[0], digest, PACKAGE[1]))
        signature = row.get("signature")
        if not signature:  # activated before packages were signed: signed now, once
            signature = self.package_signer.sign(digest)
            self.state.add_package(digest, row["name"], row["size"], signature=signature)
        info = {"id": digest, "name": row["name"], "signature": signature, "signing_key": self.package_signer.public_pem().decode()}
        return info, Hashed(self._package_cache[1], digest)

    async def _model_set_seed(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        if not blob:
            raise ProtocolError("model.set_seed needs the model bytes")
        specs = payload.describe(blob)
        if self.session is not None:
            raise ConflictError(f"session {self.session.id} is running; stop it before setting a new seed model")
        await asyncio.to_thread(lambda: payload.check_finite(payload.views(blob)))
        digest = await asyncio.to_thread(self.blobs.put, MODEL[0], blob, MODEL[1])
        with self.state.transaction():
            self.state.commit_model(digest, len(blob), aggregator="seed")
            self.state.audit(_actor(link), "model.set_seed", address=link.peer, id=digest)
        log.info("seed model %s set (%d tensors, %d bytes)", digest[:12], len(specs), len(blob))
        self.hub.publish(m.ActiveChanged(what="model", id=digest, name="seed"))
        self.hub.publish(m.ModelCommitted(model_id=digest, aggregator="seed", size=len(blob)))
        return {"id": digest, "tensors": len(specs), "size": len(blob)}, None

    async def _model_bytes(self, model_id: str) -> bytes:
        """A model's bytes, read and sha256-checked once (in a thread): every combiner fetches
        the round's global model, and the round itself needs it, so keep the latest one in
        memory. A round's new model is put here as it is committed: never read back."""
        if self._model_cache is None or self._model_cache[0] != model_id:
            data = await asyncio.to_thread(self.blobs.get, MODEL[0], model_id, MODEL[1])
            self._model_cache = (model_id, data)
        return self._model_cache[1]

    async def _model_ls(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        active = self.state.get_meta("active_model")
        session_id = args.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            raise ProtocolError("model.ls: session_id must be a session id (text)")
        rows = self.state.models(session_id)
        for row in rows:
            row["active"] = row["id"] == active
        return {"models": rows}, None

    async def _model_show(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        key = str(args.get("id") or "")
        if key in ("", "active"):  # as model download takes it: the current global model
            key = self.state.get_meta("active_model") or "active"
        row = self.state.model(key)
        data = await self._model_bytes(row["id"])
        row["active"] = row["id"] == self.state.get_meta("active_model")
        row["tensors"] = {k: {"dtype": v.dtype, "shape": list(v.shape)} for k, v in payload.describe(data).items()}
        return {"model": row}, None

    async def _model_get(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], Hashed]:
        key = args.get("id") or self.state.get_meta("active_model")
        if not key:
            raise NotFoundError("model", "active", "set one with: scaleout model set-seed FILE")
        row = self.state.model(str(key))
        data = await self._model_bytes(row["id"])
        if link.claims.role == "admin":  # a model leaving the federation (combiners fetch one every round)
            self.state.audit(_actor(link), "model.download", address=link.peer, id=row["id"])
        return {"id": row["id"]}, Hashed(data, row["id"])  # its id is its sha256

    # -- sessions ---------------------------------------------------------------------------

    async def _session_start(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        cfg = SessionConfig.from_mapping(args)  # checks the aggregator and its kwargs too
        if self.session is not None:
            raise ConflictError(f"session {self.session.id} is still running; stop it first (scaleout session stop {self.session.id})")
        failure = self._record_ends()
        if failure is not None:
            raise failure
        model_id = self.state.get_meta("active_model")
        if model_id is None:
            raise ConflictError("no global model yet: set a seed first (scaleout model set-seed FILE)")
        session = RunningSession(new_id("s-"), cfg)
        with self.state.transaction():  # a full disk must not leave a session row nobody runs
            self.state.add_session(session.id, cfg.to_dict(), model_id)
            self.state.audit(_actor(link), "session.start", address=link.peer, id=session.id, config=cfg.to_dict())
        self.session = session
        self.obs.session_started()
        session.task = asyncio.create_task(self._run_session(session))
        log.info("session %s started: %d rounds, aggregator %s", session.id, cfg.rounds, cfg.aggregator)
        self.hub.publish(m.SessionStarted(session_id=session.id, config=cfg.to_dict()))
        return {"session": self.state.session(session.id)}, None

    async def _session_ls(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        return {"sessions": [self._with_end(row) for row in self.state.sessions()]}, None

    async def _session_show(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        session = self._with_end(self.state.session(self._session_key(args)))
        if args.get("clients"):
            await self.registry.flush()
            reports = await asyncio.to_thread(self.registry.reports, session["id"])
            for r in session["rounds"]:
                r["clients"] = [x for x in reports if x["round_index"] == r["idx"] and x["kind"] in ("train", "validate")]
        return {"session": session}, None

    def _session_key(self, args: dict[str, Any]) -> str:
        key = args.get("id")
        if not key:
            rows = self.state.sessions()
            if not rows:
                raise NotFoundError("session", "latest", "none was started yet")
            return str(rows[-1]["id"])
        return str(key)

    async def _session_stop(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        key = self._session_key(args)
        s = self.session
        if s is None or s.id != key:
            row = self._with_end(self.state.session(key))
            raise ConflictError(f"session {key} is not running (it is {row['status']})")
        self.state.audit(_actor(link), "session.stop", address=link.peer, id=key)
        await self._stop_session(s, "stopped by an admin")
        return {"session": self._with_end(self.state.session(key))}, None

    async def _session_wait(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        """Push round events to this link until the session ends, then return it."""
        key = self._session_key(args)
        s = self.session
        if s is not None and s.id == key:
            self.subscribers.add(link)
            try:
                await s.done.wait()
            finally:
                self.subscribers.discard(link)
        return {"session": self._with_end(self.state.session(key))}, None

    async def _stop_session(self, s: RunningSession, reason: str) -> None:
        if s.stopped:
            return
        s.stopped = True
        s.stop_reason = reason
        s.stop_event.set()
        s.events.put_nowait(("stop", reason))
        for c in list(self.combiners.values()):
            await _quiet_send(c.link, m.SessionStop(session_id=s.id))
        if s.task is not None:
            await asyncio.wait({s.task}, timeout=10)

    def _record_ends(self) -> StorageError | None:
        """Write the ends of sessions that state.db could not take (a full disk); return the
        error if it still cannot, after arranging a retry."""
        for sid, end in list(self._unrecorded.items()):
            try:
                self.state.end_session(sid, end.status, end.end_model, end.reason, end.finished, end.round_reason)
            except StorageError as exc:
                if not end.tried:
                    log.error("could not record the end of session %s (%s); retrying: %s", sid, end.status, exc)
                end.tried = True
                if self._record_retry is None or self._record_retry.done():
                    self._record_retry = asyncio.get_running_loop().create_task(self._retry_record_ends())
                return exc
            del self._unrecorded[sid]
            if end.tried:
                log.info("recorded the end of session %s (%s)", sid, end.status)
        return None

    async def _retry_record_ends(self) -> None:
        delay, longest = RECORD_RETRY_S
        while self._unrecorded:
            await asyncio.sleep(delay)  # a backoff, not a synchronisation: space may come back any time
            if self._record_ends() is None:
                return
            delay = min(delay * 2, longest)

    def _with_end(self, row: dict[str, Any]) -> dict[str, Any]:
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
            self._emitting[link] = asyncio.ensure_future(_quiet_send(link, m.Event(kind=kind, data=data)))
        for link in [k for k, t in self._emitting.items() if t.done() and k not in self.subscribers]:
            del self._emitting[link]

    async def _run_session(self, s: RunningSession) -> None:
        status, reason = "finished", None
        try:
            for index in range(1, s.config.rounds + 1):
                if s.stopped:
                    break
                s.round_index = index
                row = await self._run_round(s, index)
                await self.registry.flush()  # the round's reports are in state.db once it is over
                await self._emit("round", {"session_id": s.id, **row})
                if row["status"] != "succeeded":
                    status, reason = "failed", f"round {index}: {row['reason']}"
                if s.storage_failure is not None:  # the next round would fail the same way
                    status, reason = "failed", f"round {index}: {s.storage_failure}"
                    break
            if s.stopped and s.storage_failure is None:
                status, reason = "stopped", s.stop_reason or reason or "stopped"
        except asyncio.CancelledError:
            status, reason = "stopped", "controller shut down"
            raise
        except StorageError as exc:  # a full disk: say so, and record the end once it can be
            log.error("session %s: %s", s.id, exc)
            s.storage_failure = exc
            status, reason = "failed", f"round {s.round_index}: {exc}"
        except Exception as exc:  # the role edge: a bug must not leave the session "running"
            log.exception("session %s crashed", s.id)
            status, reason = "failed", f"internal error: {exc}"
        finally:
            self.session = None  # first: a failing write below must not block new sessions
            end_model = None
            with contextlib.suppress(StorageError):
                end_model = self.state.get_meta("active_model")
            failure = s.storage_failure
            self._unrecorded[s.id] = SessionEnd(status, reason, end_model, time.time(), str(failure) if failure else None)
            self._record_ends()
            log.info("session %s %s%s", s.id, status, f" ({reason})" if reason else "")
            self.obs.session_finished(status)
            with contextlib.suppress(Exception):  # the role edge: the writer logs its own failures
                await self.registry.flush()
            self.hub.publish(m.SessionEnded(session_id=s.id, status=status, reason=reason))
            await self._emit("session", {"id": s.id, "status": status, "reason": reason})
            s.done.set()

    async def _wait_for_clients(self, s: RunningSession, deadline: float) -> dict[str, list[str]]:
        loop = asyncio.get_running_loop()
        while True:
            selected = select_clients(self.assigner.members, self.assigner.ready)  # each name once, where it is
            n = sum(map(len, selected.values()))
            if n >= s.config.min_clients or s.stopped or loop.time() >= deadline:
                return selected
            log.info("waiting for clients: %d connected, %d needed", n, s.config.min_clients)
            changed = asyncio.ensure_future(self.registry_changed.wait())
            stop = asyncio.ensure_future(s.stop_event.wait())
            await asyncio.wait({changed, stop}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            stop.cancel()

    async def _next_event(self, s: RunningSession, index: int, deadline: float) -> tuple[str, Any] | None:
        """The next event of round ``index``, or None at the deadline; stale ones are dropped."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                # What is queued already counts, even past the deadline (wait_for(get(), 0) would miss it).
                kind, value = s.events.get_nowait() if not s.events.empty() else await asyncio.wait_for(s.events.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None
            if kind in (m.RoundPartial.type, m.ValidateDone.type) and value[1].round_index != index:
                log.info("dropping a late %s for round %d", kind, value[1].round_index)
                continue
            return kind, value

    async def _run_round(self, s: RunningSession, index: int) -> dict[str, Any]:
        from scaleout.core.aggregators import get_aggregator, make_strategy

        loop = asyncio.get_running_loop()
        cfg = s.config
        started, started_at = loop.time(), time.time()  # the round starts now, before it waits for clients
        parent = self.state.get_meta("active_model")
        assert parent is not None
        global_bytes = await self._model_bytes(parent)
        template = payload.describe(global_bytes)
        layout = payload.layout_of(global_bytes)
        selected = await self._wait_for_clients(s, started + cfg.round_timeout)
        self.round_members = {name: frozenset(clients) for name, clients in selected.items()}
        participants = sorted(c for clients in selected.values() for c in clients)
        self.state.start_round(s.id, index, parent, participants, started=started_at)
        log.info("round %d of session %s: %d clients on %d combiners", index, s.id, len(participants), len(selected))
        self.hub.round_started(s.id, index, len(participants), cfg.round_timeout, started + cfg.round_timeout - loop.time(), len(global_bytes))

        def finish(status: str, reason: str | None = None, **extra: Any) -> dict[str, Any]:
            duration = round(loop.time() - started, 3)
            fields = {"status": status, "reason": reason, "duration_s": duration, "finished": time.time(), **extra}
            try:
                self.state.finish_round(s.id, index, **fields)
                row = next(r for r in self.state.rounds(s.id) if r["idx"] == index)
            except StorageError as exc:  # kept in memory; the session's end records it later
                log.error("round %d: could not record its outcome: %s", index, exc)
                s.storage_failure = s.storage_failure or exc
                row = {"session_id": s.id, "idx": index, "parent": parent, "model_id": None, "participants": participants, "started": started_at, "validation": {}, **fields}
            log.info("round %d %s in %.2fs%s", index, status, duration, f": {reason}" if reason else "")
            self.obs.round_finished(status, duration)
            self.hub.round_ended({**row, "session_id": s.id})
            return {**row, "index": index}

        # A round that fails before any task was sent had no participants: nobody trained.
        if s.stopped:
            return finish("failed", "session stopped", participants=[])
        if len(participants) < cfg.min_clients:
            return finish("failed", f"only {len(participants)} clients connected; at least {cfg.min_clients} needed", participants=[])
        # A combiner reports at its own deadline at the latest; then it encodes its partial: time that grows with the model.
        grace = PARTIAL_GRACE_S + len(global_bytes) / PARTIAL_ENCODE_RATE
        tracker = ControllerRound.start({k: len(v) for k, v in selected.items()}, cfg.min_clients, loop.time(), cfg.round_timeout + grace)
        strategy = make_strategy(cfg.aggregator, cfg.aggregator_kwargs)
        agg = get_aggregator(cfg.aggregator, template)
        for name, clients in selected.items():
            msg = m.RoundStart(
                session_id=s.id, round_index=index, model_id=parent, count=len(clients),
                timeout=cfg.round_timeout, settings=cfg.settings, aggregator=cfg.aggregator,
            )
            if not await _quiet_send(self.combiners[name].link, msg, _names(clients)):
                tracker.on_combiner_lost(name)
        # Events name the link they came from: one from an earlier registration of a combiner
        # (lost and back since) says nothing about this round.
        links = {name: self.combiners[name].link for name in selected if name in self.combiners}
        contributors: list[str] = []
        timings: dict[str, dict[str, Any]] = {}
        reduce_s = 0.0
        decision = tracker.on_tick(loop.time())
        while decision is None:
            event = await self._next_event(s, index, tracker.deadline)
            if event is None:
                decision = tracker.on_tick(loop.time())
                continue
            kind, value = event
            if kind == "stop":
                return finish("failed", "session stopped", participants=contributors)
            if kind == "lost":
                name, link = value
                if links.get(name) is link:
                    decision = tracker.on_combiner_lost(name)
            elif kind == m.RoundPartial.type:
                name, msg, link = value
                if links.get(name) is not link or name not in tracker.waiting_for:
                    log.info("ignoring a partial from combiner %s that this round does not wait for", name)
                    continue
                timings[name] = msg.timing if isinstance(msg.timing, dict) else {}
                if msg.count == 0:
                    decision = tracker.on_partial(name, 0)
                    continue
                began = loop.time()
                try:
                    pulled = await _unless_set(self._pull_partial(name, msg, agg), s.stop_event)
                    if pulled is None:  # stopped while the partial was on its way
                        return finish("failed", "session stopped", participants=contributors)
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
                contributors.extend(who)
                decision = tracker.on_partial(name, count)
        if decision.outcome is Outcome.FAILED:
            return finish("failed", decision.reason, participants=sorted(contributors))
        committing = loop.time()
        try:
            new_bytes, state_bytes, new_state = await asyncio.to_thread(_server_step, strategy, agg, global_bytes, layout, s.server_state)
        except (PayloadError, UpdateRejected) as exc:  # e.g. a mean beyond float32: never commit inf
            log.error("round %d: aggregate not committed: %s", index, exc)
            return finish("failed", str(exc), participants=sorted(contributors))
        try:
            model_id = await asyncio.to_thread(self.blobs.put, MODEL[0], new_bytes, MODEL[1])
            state_id = await asyncio.to_thread(self.blobs.put, STATE[0], state_bytes, STATE[1]) if state_bytes else None
            # The model, its trail entry, the strategy's state and the round's outcome land in one transaction.
            self.state.commit_round(
                s.id, index, model_id, len(new_bytes), parent=parent, aggregator=cfg.aggregator, contributors=sorted(contributors),
                server_state=state_id,
            )
        except StorageError as exc:  # a full disk: the global model stays, the session ends
            log.error("round %d: could not commit the new global model: %s", index, exc)
            s.storage_failure = exc
            return finish("failed", str(exc), participants=sorted(contributors))
        s.server_state = new_state
        self._model_cache = (model_id, new_bytes)  # the next round's global model: no need to read it back
        self.hub.publish(m.ModelCommitted(
            model_id=model_id, parent=parent, session_id=s.id, round_index=index, aggregator=cfg.aggregator,
            contributors=len(contributors), size=len(new_bytes),
        ))
        log.info("round %d: %d updates aggregated into model %s", index, len(contributors), model_id[:12])
        timing = _round_timing(timings, reduce_s, loop.time() - committing)
        validation: dict[str, float] = {}
        if cfg.validate:
            validate_started = loop.time()
            validation = await self._validate(s, index, model_id, choose_validators(selected, contributors))
            timing["validate_s"] = round(loop.time() - validate_started, 4)
            if validation:
                log.info("round %d validation: %s", index, ", ".join(f"{k}={v:.4g}" for k, v in validation.items()))
        return finish("succeeded", None, model_id=model_id, participants=sorted(contributors), validation=validation, timing=timing)

    async def _pull_partial(self, name: str, msg: m.RoundPartial, agg: Any) -> tuple[int, list[str]]:
        """Fetch a combiner's partial when this round can fold it (one at a time, so the
        controller holds one partial, not one per combiner), and fold it in a thread. The
        wait grows with the partial's size, so a large model's partial is never late."""
        c = self.combiners.get(name)
        if c is None:
            raise LinkClosed(name, "combiner gone")
        if not 0 < msg.size <= self.settings.max_payload:
            raise PayloadError(f"partial aggregate of {msg.size} bytes announced; the limit is {self.settings.max_payload}")
        c.link.max_payload = msg.size
        try:
            _, blob = await c.link.request("partial.get", {"session_id": msg.session_id, "round_index": msg.round_index}, timeout=transfer_timeout(msg.size))
        finally:
            c.link.max_payload = SMALL_PAYLOAD
        if blob is None or len(blob) != msg.size:
            raise PayloadError(f"combiner announced a partial of {msg.size} bytes and sent {0 if blob is None else len(blob)}")
        self.obs.moved("in", "partial", len(blob))
        partial = await asyncio.to_thread(_fold_partial, agg, blob, msg.count, self.round_members.get(name, frozenset()))
        return partial.count, partial.contributors  # the partial's bytes go now, not at the round's end

    async def _validate(self, s: RunningSession, index: int, model_id: str, selected: dict[str, list[str]]) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        waiting = set()
        for name, clients in selected.items():
            c = self.combiners.get(name)
            msg = m.RoundValidate(session_id=s.id, round_index=index, model_id=model_id, count=len(clients), timeout=s.config.round_timeout)
            if c is not None and await _quiet_send(c.link, msg, _names(clients)):
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
        await self.registry.flush()  # the reports that came in with the validations
        rows = await asyncio.to_thread(self.registry.reports, s.id, index, "validate")
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


def _server_step(strategy: Any, agg: Any, global_bytes: bytes, layout: str, state: dict[str, Any]) -> tuple[bytes, bytes | None, dict[str, Any]]:
    """The strategy's step from the round's mean to the next global model (off the event
    loop): (model bytes, state bytes or None when the strategy keeps none, state)."""
    model, new_state = strategy.step(payload.views(global_bytes), agg.mean(in_place=True), state)
    state_bytes = payload.encode_named(new_state, "dict") if new_state else None
    return payload.encode_named(model, layout), state_bytes, new_state


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


PAYLOAD_OPS = {"model.get": "model", "model.set_seed": "model", "package.get": "package", "package.set_active": "package"}  # op -> payload kind
REPORT_KINDS = {"train": MAX_RESULT_BYTES, "validate": MAX_RESULT_BYTES, "metric": MAX_METRIC_BYTES}  # kind -> data limit
ADMIN = frozenset({"admin"})
CLIENT = frozenset({"client"})
COMBINER = frozenset({"combiner"})


def _read_state(path: Path, read: Callable[[State], T]) -> T:
    """Run ``read`` on a connection of its own (in a thread: a long audit log is not read on
    the event loop)."""
    st = State(path, migrate=False)
    try:
        return read(st)
    finally:
        st.close()


def _lock_data_dir(path: Path) -> Any:
    """Hold an exclusive lock on the data dir for this process's life: two controllers on
    one state.db would undo each other's sessions."""
    import fcntl
    import os

    fh = open(path / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise ConfigError("data_dir", f"{path} is in use by another running controller (pid {holder}); stop it or use another --data-dir") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _check_package(data: bytes, limits: UnpackLimits) -> None:
    """Refuse a package a client would refuse (the same check_archive, within the same
    limits: it runs before anything is written) or one without a valid scaleout.yaml."""
    import tempfile

    from scaleout.package.archive import extract_archive
    from scaleout.package.project import load_project

    with tempfile.TemporaryDirectory(prefix="scaleout-pkg-") as tmp:
        load_project(extract_archive(data, Path(tmp) / "pkg", limits=limits))


_actor = audit_actor


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


async def _quiet_send(link: Link, msg: m.Message, blob: bytes | None = None) -> bool:
    """Send (with a payload), reporting a closed link as False rather than raising."""
    try:
        await link.send_with_blob(msg, blob) if blob is not None else await link.send(msg)
        return True
    except Exception as exc:  # the role edge: a dead peer must not stop the round
        log.warning("could not send %s to %s: %s", msg.type, link.peer, exc)
        return False


__all__ = ["Controller", "ControllerSettings", "ScaleoutError"]
