"""The controller: its links, the registry of combiners, and the wiring of its services:
admin operations (roles/admin.py, behind roles/door.py and HTTP /api/v1, roles/httpapi.py), sessions (roles/sessions.py),
membership (roles/membership.py), tokens and identities (roles/enrolment.py), commands."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from scaleout.core import messages as m
from scaleout.core import permissions
from scaleout.core.errors import AuthError, ConfigError, ProtocolError, ScaleoutError, Standby, StorageError
from scaleout.core.ratelimit import DEFAULT_RATE
from scaleout.core.selection import Assigner
from scaleout.package.limits import UnpackLimits
from scaleout.roles.admin import AdminService, Caller
from scaleout.roles.command_service import CommandService
from scaleout.roles.common import announce, audit_actor, bracket, cert_names, close_server, dial_urls, fix_mmap_threshold, quietly, raise_file_limit, url_host
from scaleout.roles.door import Door
from scaleout.roles.enrolment import Desk
from scaleout.roles.events import EventHub
from scaleout.roles.exporter import Observer
from scaleout.roles.httpapi import Claimed, HttpDoor
from scaleout.roles.membership import Membership
from scaleout.roles.sessions import RunningSession, SessionService
from scaleout.security import tls, tokens
from scaleout.security.packages import KEY_FILE as PACKAGE_KEY
from scaleout.security.packages import PackageSigner
from scaleout.store.blobs import BlobStore, lock_data_dir, secure_data_dir
from scaleout.store.lease import IDLE_S, POLL_S, Lease, is_postgres
from scaleout.store.pg import Outages
from scaleout.store.pgblobs import PgBlobStore
from scaleout.store.registry import RegistryWriter
from scaleout.store.state import AUDIT_HEAD, TERM, State
from scaleout.transport.link import DEFAULT_MAX_PAYLOAD, SEND_TIMEOUT_S, Hashed, Incoming, Link, Pieces
from scaleout.transport.net import HANDSHAKE_TIMEOUT, serve

log = logging.getLogger("scaleout.controller")
T = TypeVar("T")

ASSIGNMENT_TTL_S = 30.0
EXIT_LEASE_LOST = 75  # the active controller lost the store's lock: it stops at once (a standby takes over)
HELLO_TIMEOUT_S = 10.0  # a combiner-token link that has not registered by then is closed
CLIENT_IDLE_S = 60.0  # a client-token link that asks nothing for this long is closed
BURST_FACTOR = 10  # connections an address may open at once: this many seconds' worth


@dataclass
class ControllerSettings:
    data_dir: Path
    store: str | None = None  # a postgresql:// URL (store/pg.py); None: state.db in data_dir
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
    resume: bool = True  # a session running when the controller stopped resumes at the next start (serve --no-resume: off)
    send_timeout: float = SEND_TIMEOUT_S  # a peer that takes nothing we send for this long is dropped
    max_enrol_rate: float = 60.0  # enrolments per minute per join token (0: no limit)
    key_file: Path | None = None  # seals the CA and signing keys in a postgresql store (store/vault.py)
    advertise: str | None = None  # the address nodes dial, named by standbys (None: this controller's url)
    lease_poll: float = POLL_S  # seconds between a standby's tries of the store's lock, and the holder's checks
    lease_idle: float = IDLE_S  # a lock session idle this long (a frozen holder) is ended by the server
    store_wait: float | None = None  # how long a session's write waits for an unreachable store; None: its round_timeout


@dataclass
class CombinerConn:
    name: str
    link: Link
    url: str | None = None
    clients: set[str] = field(default_factory=set)  # those that proved they are attached to it (a ticket naming it)


Handler = Callable[[Link, dict[str, Any], bytes | None], Awaitable[tuple[dict[str, Any], bytes | Hashed | None]]]


def _sqlite_held(path: Path) -> str:
    """What a data dir's own state.db holds ("2 sessions, 5 models"), "" if nothing (or none)."""
    import sqlite3
    from contextlib import closing

    if not path.is_file() or path.stat().st_size == 0:
        return ""
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            counts = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("sessions", "models", "audit")}
    except sqlite3.Error:
        return ""  # not one of ours, or no such tables yet: nothing to lose
    return ", ".join(f"{n} {t if t != 'audit' else 'audit entries'}" for t, n in counts.items() if n)


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.dir = settings.data_dir
        self.store: Path | str = settings.store or self.dir / "state.db"  # what State opens: state.db or a postgresql:// URL
        self.combiners: dict[str, CombinerConn] = {}
        self.hub = EventHub()  # the typed event stream to subscribed admin links
        self.outages = Outages()  # what its connections to a PostgreSQL store see of it, said once between them (store/pg.py)
        self.sessions = SessionService(self, store_wait=settings.store_wait)  # session.* and the runner of the running session (roles/sessions.py)
        self.boot = secrets.token_hex(8)  # this run of the controller (combiners compare it when they register again)
        self.registry_changed = asyncio.Event()
        self.assigner = Assigner(ASSIGNMENT_TTL_S)  # who is where, and where a new client should go
        # The clients each combiner was given in the current round: it may report and
        # aggregate for those (and for the clients attached to it), no others.
        self.round_members: dict[str, frozenset[str]] = {}
        self._registering: set[Link] = set()  # combiner links whose combiner.register is being handled
        self.url = ""
        self.obs = Observer()  # counts for Prometheus with --metrics-port (roles/exporter.py)
        self.members = Membership(self)  # which clients are on which combiner, proven; their reports
        self.admin = AdminService(self)  # every admin operation (roles/admin.py)
        self.door = Door(self.admin)  # requests on a link -> calls of it (roles/door.py)
        self.desk: Desk  # tokens and node identities (roles/enrolment.py), made by prepare()
        self.commands = CommandService(self)  # custom commands, predictions, clients' attributes and telemetry
        # With a postgresql store, the holder of the store's lock is active; the others are
        # standbys, which answer status (naming the active one) and refuse everything else.
        self.lease: Lease | None = None
        self.standby = False
        self.advertised = ""  # the address nodes dial: --advertise, else self.url
        self._standby_links: set[Link] = set()
        self._last_active: str | None = None  # what a standby last read as the active address
        self.peer_urls: list[str] = []  # the other controllers on the store, for join tokens (Desk.urls)
        self._peers_at = 0.0
        self._telling: set[asyncio.Future[None]] = set()  # sends of ControllersChanged under way
        self._keys_ready = False
        self._lease_thread: ThreadPoolExecutor | None = None  # the lease's polls (_leased)
        # The operations that are about the link itself. Who may call any operation is
        # core/permissions.py's to say (the one table), not this map's.
        self._ops: dict[str, Handler] = {
            "session.wait": self._session_wait,
            "client.assign": lambda *a: self.members.assign(*a),
            "combiner.register": lambda *a: self.members.register(*a),
            "combiner.ready": lambda *a: self.members.ready(*a),
            "node.enrol": lambda *a: self.desk.enrol(*a),
            "combiner.renew": lambda *a: self.desk.combiner_renew(*a),
        }

    # -- lifecycle --------------------------------------------------------------------

    def prepare_keys(self) -> None:
        """Create the data directory, TLS material and signing keys; with a postgresql store,
        those every controller on it shares are unsealed from it (or sealed into it by the first)."""
        # Only this user reads what the controller writes: the data dir is 0700, and
        # state.db (with its -wal and -shm), models and packages 0600 (see secure_data_dir).
        os.umask(0o077)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        secure_data_dir(self.dir)
        self._lock = lock_data_dir(self.dir)
        s = self.settings
        if is_postgres(s.store):
            from scaleout.store import vault

            from scaleout.store.migrate import MIGRATED

            held = "" if (self.dir / MIGRATED).exists() else _sqlite_held(self.dir / "state.db")
            if held:  # its state would be ignored, and its signed audit head rewritten for an empty log
                raise ConfigError("data dir", f"{self.dir} holds a SQLite store ({held}) that a postgresql store would ignore: move it there first (scaleout store migrate --from {self.dir} --to URL), or use another --data-dir")
            if s.key_file is None:
                raise ConfigError("key file", "a postgresql store needs --key-file PATH (the same for every controller on it; create one with: scaleout store keygen --out PATH)")
            key = vault.load_key(Path(s.key_file))
            unsealed, sealed = vault.sync(str(s.store), key, self.dir, self._load_keys)
            log.info("secrets: %d unsealed from the store, %d sealed into it", unsealed, sealed)
        else:
            from scaleout.store.migrate import MIGRATED

            moved = self.dir / MIGRATED
            if moved.exists():  # its old state.db would start a second history beside the store's, with the same keys
                where = moved.read_text(errors="replace").strip() or "a postgresql store"
                raise ConfigError(
                    "data dir", f"{self.dir} was moved into {where} (scaleout store migrate): run serve with --store {where if where.startswith('postgres') else 'URL'} "
                    f"--key-file KEY, or, to go back to its state.db as it was before the move, remove {moved}",
                )
            self._load_keys()
        self._keys_ready = True

    def _load_keys(self) -> None:
        from scaleout.store.audithead import HeadFile

        self.audit_head = HeadFile.load_or_create(self.dir)
        self.signer = tokens.TokenSigner.load_or_create(self.dir / "token.key")
        self.verifier = tokens.TokenVerifier(self.signer.public_pem())
        self.package_signer = PackageSigner.load_or_create(self.dir / PACKAGE_KEY)
        self.ssl_context = None
        self.ca_fingerprint: str | None = None
        s = self.settings
        if s.insecure:
            log.warning("TLS is OFF (--insecure): tokens and models travel in clear text")
        else:
            advertised = [urlsplit(s.advertise).hostname or ""] if s.advertise else []  # nodes dial it: the certificate names it
            files = tls.ensure_controller_tls(self.dir, cert_names(s.host, [*s.san, *filter(None, advertised)]))
            self.ca_pem = files.ca_cert.read_bytes()
            self.ca_key_pem = files.ca_key.read_bytes()
            self.ca_fingerprint = tls.fingerprint(self.ca_pem)
            cert, key = (s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else (files.cert, files.key)
            self.ssl_context = tls.server_context(cert, key)
            if cert == files.cert:
                log.info("TLS certificate valid for %s (add names with --san)", ", ".join(tls.names_in(cert)))

    def prepare(self) -> None:
        """Create the data directory, TLS material, signing key, admin token and state."""
        if not self._keys_ready:
            self.prepare_keys()
        self.state = State(self.store, outages=self.outages)
        if self.lease is not None:  # the active one on a shared store: fence out the one before
            log.info("active term %d on this store", self.state.take_term())
        why = self.state.anchor_audit(self.audit_head)
        if why and self.state.get_meta(AUDIT_HEAD):
            # Nothing tells a first start with it from a removed or replaced one: the gap stays in the chain.
            log.warning("the signed audit head %s was %s: rewrote it for the log as it is, and recorded that in the log", self.state.audit_head_where, why)
            self.state.audit("controller", "audit.head_rewritten", reason=why)
        self.registry = RegistryWriter(self.store, outages=self.outages)
        self.blobs = BlobStore(self.dir) if isinstance(self.store, Path) else PgBlobStore(self.store, self.dir, outages=self.outages)
        # A kill between writing a model (or package, or strategy state) and committing the row
        # that names it leaves a file nobody names: removed at the next start, and said.
        for kind, removed in self.blobs.sweep_unnamed(self.state.blob_ids()).items():
            log.warning("removed %d file(s) from %s that no committed row names (left by an interrupted write): %s",
                        len(removed), self.dir / kind, ", ".join(n[:16] for n in removed[:5]))
        self.commands.prepare()
        self.desk = Desk(self)  # after the verifier: it loads the revoked ids into it
        # Nobody is connected to a controller that is just starting.
        for row in self.state.combiners():
            self.state.upsert_combiner(row["name"], "offline", clients=0)
            self.state.set_clients_offline(row["name"], keep=set())
        # A session that was running when this controller stopped resumes (run() starts it).
        self.sessions.recover(resume=self.settings.resume)

    def write_admin_token(self) -> None:
        from scaleout.roles.welcome import write_admin_token

        write_admin_token(self)  # the data dir's admin.token, unless the one there is valid

    async def run(self, stop: asyncio.Event) -> None:
        raise_file_limit()
        fix_mmap_threshold()
        s = self.settings
        if is_postgres(s.store):
            await asyncio.to_thread(self.prepare_keys)
            self.lease = Lease(str(s.store), idle_s=s.lease_idle)
            self.standby = not await self._leased(self.lease.try_acquire)
        if not self.standby:
            self.prepare()
        if s.metrics_port is not None:
            from scaleout.roles import exporter

            self.obs = await asyncio.to_thread(exporter.start, s.metrics_host, s.metrics_port)
            log.info("Prometheus metrics at %s", self.obs.url)
        public = {"/ca.pem": self.ca_pem.decode()} if self.ssl_context is not None else None
        http = HttpDoor(self.door, self._authenticate, self._http_authorize, max_payload=s.max_payload, upload_dir=self.dir, call=self._http_call)
        server, port = await serve(
            self._on_link, self._authenticate, s.host, s.port, self.ssl_context, max_payload=s.max_payload, public=public,
            connect_rate=(s.max_connect_rate, s.max_connect_rate * BURST_FACTOR) if s.max_connect_rate > 0 else None,
            handshake_timeout=s.handshake_timeout, send_timeout=s.send_timeout, http=self._http(http),
        )
        scheme = "ws" if s.insecure else "wss"
        self.url = f"{scheme}://{url_host(s.host)}:{port}"
        self.advertised = s.advertise or self.url
        info = {"url": self.url, "ca": str((self.dir / "ca.pem").resolve()) if not s.insecure else None, "metrics_url": self.obs.url}
        tls.write_public(self.dir / "controller.json", (json.dumps(info) + "\n").encode())
        holding: asyncio.Task[None] | None = None
        started = announced = False
        try:
            if self.standby:
                announced = True
                announce(f"{scheme}://{bracket(s.host)}:{port}", dial_urls(scheme, s.host, port))
                log.info("standby: another controller holds the store's lock (active is %s); taking over when it goes", await self._active())
                if not await self._await_lease(stop):
                    return
                self.prepare()  # the state as the last active one left it: a session it ran resumes below
            if self.lease is not None:
                await self._leased(self.lease.set_active, self.advertised)
                await self._see_peers(every_s=0)  # the join tokens shown below name the standbys too
                holding = asyncio.create_task(self._hold_lease())
                log.info("active: this controller holds the store's lock (nodes dial %s)", self.advertised)
            self.standby = False
            for link in list(self._standby_links):  # links of the standby's time: they dial again and find the active one
                await link.close_now(1012, "this controller became active: connect again")
            self.write_admin_token()
            self.registry.start()
            started = True
            from scaleout.roles.welcome import show_join_commands

            show_join_commands(self)  # its files are written before the ready line
            if not announced:
                announce(f"{scheme}://{bracket(s.host)}:{port}", dial_urls(scheme, s.host, port))
            self.sessions.resume()
            await stop.wait()
        finally:
            log.info("controller shutting down")
            if holding is not None:
                holding.cancel()
            if started:
                await self.sessions.shutdown()  # a running session stays running in state.db: the next start resumes it
            close_server(server)
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
            await self.hub.close()
            if started:
                await self.registry.close()
                await self.commands.close()
                self.state.close()
            if self.lease is not None:
                await self._leased(self.lease.close)
            if self._lease_thread is not None:
                self._lease_thread.shutdown(wait=False)
            await asyncio.to_thread(self.obs.close)

    # -- active and standby (a postgresql store: store/lease.py) -----------------------------

    async def _await_lease(self, stop: asyncio.Event) -> bool:
        """A standby's wait: try the store's lock every lease_poll seconds; True once held, False when stopped."""
        assert self.lease is not None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.settings.lease_poll)  # the poll interval, or a stop
            except asyncio.TimeoutError:
                pass
            await self._see_peers()
            if not stop.is_set() and await self._leased(self.lease.try_acquire):
                log.info("took over: this controller now holds the store's lock; loading the state")
                return True
        return False

    async def _hold_lease(self) -> None:
        """The active one's check that it still holds the lock. Lost (its database session
        ended), it takes it again; if another controller has taken it meanwhile, this one stops
        at once (exit EXIT_LEASE_LOST), so two controllers never act as active. While the store
        cannot be reached at all, it goes on waiting for it (its writes fail meanwhile)."""
        assert self.lease is not None
        while True:
            await asyncio.sleep(self.settings.lease_poll)  # the poll interval
            await self._see_peers()
            if await self._leased(self.lease.check):
                continue
            log.warning("lost the store's lock (its database session ended): taking it again unless another controller has")
            said = False
            while (outcome := await self._leased(self.lease.retake)) == "unreachable":
                if not said:
                    log.warning("cannot reach the store to take its lock again: waiting for it (writes fail until it is back)")
                    said = True
                await asyncio.sleep(self.settings.lease_poll)  # the poll interval
            if outcome == "held":
                log.critical("another controller holds the store's lock now: this controller stops acting as active (exit %d)", EXIT_LEASE_LOST)
                logging.shutdown()
                os._exit(EXIT_LEASE_LOST)
            if await asyncio.to_thread(self.state.get_meta, TERM) != str(self.state.fence):
                log.critical("another controller was active on the store while this one had lost its lock: this controller stops (exit %d)", EXIT_LEASE_LOST)
                logging.shutdown()
                os._exit(EXIT_LEASE_LOST)
            log.warning("took the store's lock again: still the active controller")
            await self._leased(self.lease.set_active, self.advertised)

    async def _leased(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the lease's own thread: a poll never waits behind other work in the
        shared worker threads (a late poll would let the lock's session idle out, IDLE_S)."""
        if self._lease_thread is None:
            self._lease_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scaleout-lease")
        return await asyncio.get_running_loop().run_in_executor(self._lease_thread, fn, *args)

    async def _see_peers(self, every_s: float = 5.0) -> None:
        """Say this controller is up, and note the others on the store (at most every ``every_s``)."""
        assert self.lease is not None
        if time.monotonic() - self._peers_at >= every_s:
            self._peers_at = time.monotonic()
            before = set(self.peer_urls)
            self.peer_urls = await asyncio.to_thread(self.lease.peers, self.advertised)
            if not self.standby and set(self.peer_urls) - before:
                self._tell_controllers()

    def controller_urls(self) -> list[str]:
        """Every controller on the store as nodes dial them, this one first (empty without a
        shared store): in the replies to combiner.register and client.assign, and pushed to
        combiners when one appears, so nodes follow a standby started after they enrolled."""
        if self.lease is None:
            return []
        return list(dict.fromkeys([self.advertised, *self.peer_urls]))

    def _tell_controllers(self) -> None:
        """Tell every registered combiner the controllers' addresses (it tells its clients), in
        the background: a combiner slow to read must not hold up the lease's checks."""
        urls = self.controller_urls()
        log.info("controllers on the store: %s; telling %d combiner(s)", ", ".join(urls), len(self.combiners))
        for c in list(self.combiners.values()):
            task = asyncio.ensure_future(quietly(c.link.send(m.ControllersChanged(urls=urls)), "telling combiners of the controllers", log))
            self._telling.add(task)
            task.add_done_callback(self._telling.discard)

    async def _active(self) -> str | None:
        """The active controller's address as its holder recorded it (this one's when active)."""
        if not self.standby:
            return self.advertised
        return await asyncio.to_thread(self.lease.active) if self.lease is not None else None

    def _http(self, http: HttpDoor) -> Callable[[Any], Awaitable[Any]]:
        """HTTP: /api/v1/health for probes (no token), the rest to /api/v1 when active; a
        standby refuses it with error code standby, naming the active one."""
        from scaleout.roles.httpapi import PREFIX
        from scaleout.transport.httpd import error_response, json_response

        async def handle(request: Any) -> Any:
            if request.path.rstrip("/") == f"{PREFIX}/health":
                if request.method != "GET":
                    return error_response(405, "method_not_allowed", f"{request.path} takes GET", {"Allow": "GET"})
                active = await self._active()
                return json_response(503 if self.standby else 200, {"role": "standby" if self.standby else "active", "active": active})
            if self.standby:
                exc = Standby(await self._active())
                return error_response(503, exc.code, str(exc))
            return await http.handle(request)

        return handle

    async def _standby_link(self, link: Link) -> None:
        """A link to a standby: status (naming the active one) and nothing else."""
        self._standby_links.add(link)
        role = link.claims.role
        link.max_payload = 0
        link.drop_payloads = True

        def authorize(req: m.Request) -> None:
            # By op, before the payload is looked at: an upload (a package, a seed model) is
            # refused as standby, naming the active one, not as a payload over the limit of 0 B,
            # so the caller's dialer goes on to the active controller.
            if req.op != "status":
                raise Standby(self._last_active)
            permissions.check_request(role, req.op)

        async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], None]:
            authorize(req)
            active = await self._active()
            self._last_active = active
            return {"role": "standby", "active": active, "url": self.url}, None

        async def on_message(inc: Incoming) -> None:
            raise Standby(self._last_active)

        link.authorize = authorize
        self._last_active = await self._active()
        try:
            await link.run(on_message=on_message, on_request=on_request)
        finally:
            self._standby_links.discard(link)

    def _authenticate(self, token: str | None) -> tokens.TokenClaims:
        if not token:
            raise AuthError("no token given: pass one with --token (see scaleout token create)")
        claims = self.verifier.verify(token, time.time())
        if claims.aud is not None:
            raise AuthError("a ticket is good only at the combiner it names, not at the controller")
        return claims

    # -- links --------------------------------------------------------------------------

    async def _on_link(self, link: Link) -> None:
        if self.standby:
            return await self._standby_link(link)
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
            if req.op not in self._ops and not self.door.knows(req.op):
                raise ProtocolError(f"unknown operation {req.op!r}")
            permissions.check_request(role, req.op)  # the one table (core/permissions.py), before any handler
            self.desk.check_join_link(link, req.op)  # a join token enrols, nothing more
            if role == "combiner" and req.op not in ("combiner.register", "node.enrol") and not self._registered(link):
                raise AuthError(f"register first: a combiner may do {req.op} once it has registered (combiner.register)")

        async def on_request(req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | Hashed | None]:
            authorize(req)  # done by the link already; kept here so no path skips it
            registering = req.op == "combiner.register"
            if registering:
                self._registering.add(link)  # the hello timeout waits for a registration under way
            try:
                if req.op in self._ops:
                    result = await self._ops[req.op](link, req.args, blob)
                else:
                    result = await self.door.call(Caller(role, audit_actor(link), link.peer, id(link)), req.op, req.args, blob)
            finally:
                if registering:
                    self._registering.discard(link)
            self._count_payloads(req.op, blob, result)
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
            self.sessions.gone(link)
            self.hub.unsubscribe(link)
            self.desk.gone(link)
            if role == "combiner":
                self.combiner_gone(link)

    def _count_payloads(self, op: str, blob: bytes | None, result: tuple[dict[str, Any], bytes | Hashed | None]) -> None:
        kind = PAYLOAD_OPS.get(op)
        if kind is not None:  # models and packages in and out, for --metrics-port
            self.obs.moved("in", kind, len(blob or b""))
            out = result[1]
            self.obs.moved("out", kind, len(out.data) if isinstance(out, Hashed) else len(out or b""))

    # -- HTTP /api/v1 (roles/httpapi.py): the same service, roles and tokens as a link ----------

    def _http_authorize(self, claims: tokens.TokenClaims, op: str) -> None:
        """What a link's authorize checks beyond the roles table, for a request over HTTP."""
        self.desk.check_join_link(Claimed(claims), op)  # type: ignore[arg-type]  # a join token only enrols: it reads link.claims alone
        if claims.role == "combiner":  # a combiner asks over its own link, once registered
            raise AuthError(f"a combiner token does {op} over its websocket link once registered, not over HTTP")

    async def _http_call(self, caller: Caller, op: str, args: Any, blob: bytes | None) -> tuple[dict[str, Any], bytes | Hashed | None]:
        result = await self.door.call(caller, op, args, blob)
        self._count_payloads(op, blob, result)
        return result

    def _admin_message(self, link: Link) -> Callable[[Incoming], Awaitable[None]]:
        async def handle(inc: Incoming) -> None:
            if not isinstance(inc.msg, m.Subscribe):
                raise ProtocolError(f"an admin may not send {inc.msg.type}")
            self.hub.subscribe(link, inc.msg)

        return handle

    async def _session_wait(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], None]:
        return await self.sessions.wait(link, args), None  # pushes the round events to this link

    def _registered(self, link: Link) -> bool:
        return any(c.link is link for c in self.combiners.values())

    def new_combiner(self, name: str, link: Link) -> CombinerConn:
        return CombinerConn(name, link)

    def combiner_of(self, link: Link) -> CombinerConn:
        for c in self.combiners.values():
            if c.link is link:
                return c
        raise ProtocolError("register first (combiner.register)")

    def combiner_gone(self, link: Link) -> None:
        for name, c in list(self.combiners.items()):
            if c.link is link:
                del self.combiners[name]
                self.assigner.combiner_gone(name)
                log.warning("combiner %s disconnected (%d clients were attached)", name, len(c.clients))
                self.hub.publish(m.CombinerLeft(combiner=name, clients=len(c.clients)))
                self.sessions.on_combiner_lost(name, link)
                self.nodes_changed()
                self.registry.combiner(name, "offline", clients=0)
                self.commands.combiner_gone(name)

    def nodes_changed(self) -> None:
        self.registry_changed.set()
        self.registry_changed = asyncio.Event()
        self.count_nodes()

    def count_nodes(self) -> None:
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
            c = self.combiner_of(link)
            self.obs.combiner_message(msg.type)
            if isinstance(msg, m.ClientsChanged):
                self.members.clients_changed(c, msg)
            elif isinstance(msg, m.Report):
                await self.members.store_report(c, msg)
            elif isinstance(msg, m.Reports):
                await self.members.store_reports(c, msg)
            elif isinstance(msg, (m.CommandResult, m.ClientLog, m.ClientStatus)):
                self.commands.on_message(c, msg)
            elif isinstance(msg, (m.RoundPartial, m.RoundUpdate, m.ValidateDone)):
                self.sessions.on_round_message(c.name, msg, link)
            else:
                raise ProtocolError(f"a combiner may not send {msg.type}")

        return handle

    # -- combiner and client registry -----------------------------------------------------

    # -- what the session service needs (roles/sessions.py SessionHost) ----------------------

    @property
    def session(self) -> RunningSession | None:
        return self.sessions.running

    @property
    def max_payload(self) -> int:
        return self.settings.max_payload

    def registry_event(self) -> asyncio.Event:
        return self.registry_changed

    def keep_model(self, model_id: str, data: bytes | Pieces) -> None:
        self.admin.keep_model(model_id, data)

    async def model_bytes(self, model_id: str) -> bytes:
        return await self.admin.model_bytes(model_id)


PAYLOAD_OPS = {"model.get": "model", "model.set_seed": "model", "package.get": "package", "package.set_active": "package"}  # op -> payload kind


__all__ = ["Controller", "ControllerSettings", "ScaleoutError"]
