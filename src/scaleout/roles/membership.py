"""Which clients are on which combiner, as the controller knows it: a combiner announces
the clients that attached to it with the proof each showed (the ticket the controller gave
it in client.assign), and reports for them; a client asks which combiner to join.

This module never imports the controller: it gets what it needs through ``MembershipHost``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from scaleout.core import messages as m
from scaleout.core.errors import AuthError, ConflictError, LimitExceeded, ProtocolError
from scaleout.core.limits import MAX_METRIC_BYTES, MAX_RESULT_BYTES, check_size, clip_text
from scaleout.roles.common import audit_actor, close_now
from scaleout.roles.sessions import SMALL_PAYLOAD
from scaleout.security import tokens
from scaleout.transport.link import Link

log = logging.getLogger("scaleout.controller")

REPORT_KINDS = {"train": MAX_RESULT_BYTES, "validate": MAX_RESULT_BYTES, "metric": MAX_METRIC_BYTES}  # kind -> data limit
ROUNDS_KEPT = 4  # the rounds (and kinds) whose reported clients are kept, to catch a repeat in a later page


class CombinerConn(Protocol):
    name: str
    link: Link
    url: str | None
    clients: set[str]


class MembershipHost(Protocol):
    """What membership needs of the controller that owns it."""

    combiners: dict[str, Any]  # name -> CombinerConn
    assigner: Any  # core.selection.Assigner
    hub: Any  # roles.events.EventHub
    registry: Any  # store.registry.RegistryWriter
    state: Any  # store.state.State
    obs: Any  # roles.exporter.Observer
    verifier: tokens.TokenVerifier
    desk: Any  # roles.enrolment.Desk
    round_members: dict[str, frozenset[str]]
    ssl_context: Any
    signer: tokens.TokenSigner
    settings: Any  # roles.controller.ControllerSettings
    sessions: Any  # roles.sessions.SessionService
    boot: str

    def combiner_of(self, link: Link) -> Any: ...

    def combiner_gone(self, link: Link) -> None: ...

    def new_combiner(self, name: str, link: Link) -> Any: ...

    def count_nodes(self) -> None: ...

    def nodes_changed(self) -> None: ...

    def controller_urls(self) -> list[str]: ...


class Membership:
    def __init__(self, ctl: MembershipHost) -> None:
        self.ctl = ctl
        # client -> (issued at, id) of its newest ticket: an older one proves nothing any more.
        self.tickets: dict[str, tuple[int, str]] = {}
        self._unknown_told: set[str] = set()  # combiners told their reports of an unknown session are dropped
        # (session, round, kind) -> the clients whose outcome a Reports message stored: one
        # outcome per client across all pages of a round; the rounds whose repeats were told.
        self._reported: dict[tuple[str, int, str], set[str]] = {}
        self._repeats_told: set[tuple[str, int, str]] = set()
        self.runs: dict[str, str | None] = {}  # combiner -> the run (process) that registered last under its name

    def clients_changed(self, c: CombinerConn, msg: m.ClientsChanged) -> None:
        """A combiner's deltas: O(1) per client; the writes go to state.db in batches, off the loop."""
        if len(msg.joined) > m.MAX_NAMES or len(msg.left) > m.MAX_NAMES:
            raise ProtocolError(f"clients.changed: at most {m.MAX_NAMES} names per list")
        for client in (*msg.joined, *msg.left):  # all checked before any is applied
            m.check_name(client, "client name")
        if len(msg.proofs) != len(msg.joined):
            raise AuthError(f"clients.changed: every client that joined needs its proof (the ticket it connected with): {len(msg.joined)} names, {len(msg.proofs)} proofs")
        proven = self.proven(c, msg.joined, msg.proofs)  # a forged one refuses the whole message
        for client in proven:
            elsewhere = self.ctl.assigner.where.get(client)
            if elsewhere is not None and elsewhere != c.name and elsewhere in self.ctl.combiners:
                # One name, one node: the newest connection counts, once, wherever it is.
                log.warning("client %s is now on combiner %s (it was on %s)", client, c.name, elsewhere)
                self.ctl.combiners[elsewhere].clients.discard(client)
            c.clients.add(client)
            self.ctl.assigner.client_joined(c.name, client)
            self.ctl.hub.publish(m.ClientJoined(client=client, combiner=c.name, package=self.ctl.hub.packages.get(client, "")))
            self.ctl.registry.client(client, "online", c.name)
        for client in msg.left:
            if client not in c.clients:
                continue  # never joined here (or moved on): not this combiner's to remove
            c.clients.discard(client)
            self.ctl.assigner.client_left(c.name, client)
            if client not in self.ctl.assigner.where:  # not already back on another combiner
                self.ctl.registry.client(client, "offline", c.name)
                self.ctl.hub.publish(m.ClientLeft(client=client, combiner=c.name))
        self.ctl.registry.combiner(c.name, "online", clients=len(c.clients))
        self.ctl.nodes_changed()

    def proven(self, c: CombinerConn, names: list[str], proofs: list[str]) -> list[str]:
        """The clients in ``names`` whose proof shows they attached to combiner ``c``: a
        ticket the controller signed for that client and this combiner, the newest it issued
        for the client. A proof not signed here, or naming another client or combiner, is a
        forgery: AuthError (nothing in the message is applied). A revoked, expired or
        superseded one leaves its client out (it counts again once it reconnects)."""
        now = time.time()
        checked = []
        for name, proof in zip(names, proofs):
            try:
                claims = self.ctl.verifier.genuine(proof)
            except AuthError:
                claims = None
            if claims is None or claims.aud != c.name or claims.sub != name or claims.role != "client" or claims.nid is None:
                log.warning("combiner %s announced client %s without a valid proof: refused", c.name, name)
                raise AuthError(f"clients.changed: no valid proof that client {name!r} attached to combiner {c.name} (the ticket it connected with)")
            checked.append((name, claims))
        out = []
        for name, claims in checked:
            newest = self.tickets.get(name)
            if claims.jti in self.ctl.verifier.revoked or claims.nid in self.ctl.verifier.revoked:
                why = "its credential was revoked"
            elif newest is not None and newest[1] != claims.jti and claims.iat <= newest[0]:
                why = "a newer ticket was issued to it since"
            elif (newest is None or newest[1] != claims.jti) and now >= claims.exp:
                why = "its ticket expired"
            else:
                self.tickets[name] = (claims.iat, claims.jti)
                out.append(name)
                continue
            log.info("combiner %s: client %s not counted as attached: %s", c.name, name, why)
        return out

    async def store_report(self, c: CombinerConn, msg: m.Report) -> None:
        """Store one client's report within the limits a combiner applies (core/limits.py):
        a report beyond them is cut down, never allowed to fill state.db."""
        if msg.kind not in REPORT_KINDS:
            raise ProtocolError(f"report: kind must be one of {', '.join(REPORT_KINDS)}, got {msg.kind!r:.40}")
        m.check_name(msg.session_id, "report: session id")
        m.check_name(msg.client, "report: client name")
        if msg.client not in c.clients and msg.client not in self.ctl.round_members.get(c.name, ()):
            raise AuthError(f"combiner {c.name} may not report for client {msg.client!r}: not one of its clients")
        if not await self._session_ran(c, msg.session_id):
            return
        data, error = msg.data, clip_text(msg.error) if msg.error is not None else None
        try:
            check_size(data, REPORT_KINDS[msg.kind], f"{msg.kind} report data")
        except LimitExceeded as exc:
            log.warning("combiner %s: client %s: %s: stored without it", c.name, msg.client, exc)
            data = {}
        self.ctl.registry.report(msg.kind, msg.session_id, msg.round_index, msg.client, data, error)
        if msg.kind == "train":
            self.ctl.obs.update_reported(error)
        self.ctl.hub.report(msg.kind, msg.session_id, msg.round_index, msg.client, data, error)
        if error:
            log.warning("client %s: %s: %s", msg.client, msg.kind, error.removeprefix(f"{msg.kind} "))

    async def _session_ran(self, c: CombinerConn, session_id: str) -> bool:
        """Outcomes are stored only for a session the store knows (this controller ran it, or
        one before a restart): a combiner reporting under a session id it made up would fill
        the reports table (told once per combiner)."""
        if await self.ctl.sessions.known(session_id):
            return True
        if c.name not in self._unknown_told:
            self._unknown_told.add(c.name)
            log.warning("combiner %s reported for session %r, which this controller did not run: dropped (and any more such)", c.name, session_id[:40])
        return False

    async def store_reports(self, c: CombinerConn, msg: m.Reports) -> None:
        """A combiner's clients' outcomes of a round, in one message (a page of them): each
        stored as store_report would, within the same limits; the round's progress and the
        failures are told once per message, not once per client. Any entry for a client not
        the combiner's refuses the whole message before anything is stored."""
        if msg.kind not in ("train", "validate"):
            raise ProtocolError(f"reports: kind must be train or validate, got {msg.kind!r:.40}")
        m.check_name(msg.session_id, "reports: session id")
        if len(msg.entries) > m.MAX_NAMES:
            raise ProtocolError(f"reports: at most {m.MAX_NAMES} entries per message")
        members = self.ctl.round_members.get(c.name, frozenset())
        rows: list[tuple[str, dict[str, Any], str | None]] = []
        named: set[str] = set()
        repeated: list[str] = []
        for entry in msg.entries:  # all checked before any is stored
            if not isinstance(entry, dict):
                raise ProtocolError("reports: each entry is {client, data (an object), error (text or null)}")
            client, data, error = entry.get("client"), entry.get("data", {}), entry.get("error")
            m.check_name(client, "reports: client name")
            if client not in c.clients and client not in members:
                raise AuthError(f"combiner {c.name} may not report for client {client!r}: not one of its clients")
            if not isinstance(data, dict) or not (error is None or isinstance(error, str)):
                raise ProtocolError("reports: each entry is {client, data (an object), error (text or null)}")
            if client in named:  # one outcome per client: the first (a repeat is not counted or stored twice)
                repeated.append(client)
                continue
            named.add(client)
            rows.append((client, data, clip_text(error) if error is not None else None))
        if not await self._session_ran(c, msg.session_id):
            return
        key = (msg.session_id, msg.round_index, msg.kind)
        stored = self._round_reported(key)
        repeated += [client for client, _, _ in rows if client in stored]  # in an earlier page of the round
        rows = [row for row in rows if row[0] not in stored]
        stored.update(client for client, _, _ in rows)
        if repeated and key not in self._repeats_told:  # said once per round, however many
            self._repeats_told.add(key)
            log.warning("combiner %s named client %s more than once in round %d's %s reports (%d repeats): the first kept", c.name, repeated[0], msg.round_index, msg.kind, len(repeated))
        failed: list[tuple[str, str]] = []
        for i, (client, data, error) in enumerate(rows):
            try:
                check_size(data, REPORT_KINDS[msg.kind], f"{msg.kind} report data")
            except LimitExceeded as exc:
                log.warning("combiner %s: client %s: %s: stored without it", c.name, client, exc)
                rows[i] = (client, {}, error)
            self.ctl.registry.report(msg.kind, msg.session_id, msg.round_index, client, rows[i][1], error)
            if msg.kind == "train":
                self.ctl.obs.update_reported(error)
            if error:
                failed.append((client, error))
        self.ctl.hub.reports(msg.kind, msg.session_id, msg.round_index, rows)
        if failed:
            shown = "; ".join(f"{client}: {error.removeprefix(f'{msg.kind} ')[:200]}" for client, error in failed[:3])
            more = f" (and {len(failed) - 3} more)" if len(failed) > 3 else ""
            log.warning("round %d: %d of %d %s outcomes from combiner %s failed: %s%s", msg.round_index, len(failed), len(rows), msg.kind, c.name, shown, more)

    def _round_reported(self, key: tuple[str, int, str]) -> set[str]:
        """The clients whose outcome of round ``key`` (session, round, kind) a Reports message
        stored, kept for the last ROUNDS_KEPT rounds reported."""
        stored = self._reported.pop(key, set())
        self._reported[key] = stored  # the newest
        while len(self._reported) > ROUNDS_KEPT:
            oldest = next(iter(self._reported))
            del self._reported[oldest]
            self._repeats_told.discard(oldest)
        return stored

    async def ready(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        c = self.ctl.combiner_of(link)
        url = args.get("url")
        scheme = "ws://" if self.ctl.ssl_context is None else "wss://"
        if not isinstance(url, str) or not url.startswith(scheme):
            raise ProtocolError(f"combiner.ready needs the {scheme} url clients should dial")
        self.ctl.desk.check_ready_url(link, url)
        c.url = url
        self.ctl.assigner.combiner_ready(c.name)
        await asyncio.to_thread(self.ctl.state.upsert_combiner, c.name, "online", url=url)
        log.info("combiner %s ready at %s", c.name, url)
        self.ctl.hub.publish(m.CombinerJoined(combiner=c.name, url=url))
        self.ctl.nodes_changed()
        return {}, None

    async def assign(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        name = m.check_name(args.get("name"), "client name")
        claims = self.ctl.desk.node_identity(link, "client", name, args)
        if isinstance(args.get("package"), str):  # which package it runs, for watchers (tui)
            self.ctl.hub.packages[name] = args["package"][:200]
        prefer = args.get("prefer")
        best = self.ctl.assigner.assign(name, asyncio.get_running_loop().time(), prefer if isinstance(prefer, str) else None)
        c = self.ctl.combiners[best]
        if self.ctl.assigner.where.get(name) != best:
            log.info("client %s assigned to combiner %s", name, best)
        # The client shows its combiner this ticket, never its own credential (enrolment.py).
        ticket = self.ctl.desk.ticket(claims, c.name)
        self.tickets[name] = (tokens.peek(ticket).iat, tokens.peek(ticket).jti)
        package = await asyncio.to_thread(self.ctl.state.get_meta, "active_package")
        reply: dict[str, Any] = {"combiner": c.name, "url": c.url, "package": package, "ticket": ticket}
        if urls := self.ctl.controller_urls():  # every controller on the store: the client dials them too when it asks again
            reply["controllers"] = urls
        renewed = self.ctl.desk.renewed(link)
        if renewed is not None:
            reply["token"] = renewed
        return reply, None

    async def register(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        """combiner.register: the newest registration of a name wins; a round that gave this
        combiner a grace hears whether it is the same process back (its round still held)."""
        ctl = self.ctl
        name = m.check_name(args.get("name"), "combiner name")
        ctl.desk.node_identity(link, "combiner", name, args)
        csr = args.get("csr")
        advertise = args.get("advertise") if isinstance(args.get("advertise"), str) else None
        # Refused before any takeover; signed in a thread (a store read and a signature).
        cert = await asyncio.to_thread(ctl.desk.sign, link, str(csr), advertise) if csr and ctl.ssl_context is not None else None
        old = ctl.combiners.get(name)
        if old is not None and old.link is not link:
            # The newest registration wins: the old link is usually dead (a restart after a
            # network loss); a live twin learns why from the close code and stops.
            log.warning("combiner %s registered again: closing its older connection", name)
            ctl.combiner_gone(old.link)
            await close_now(old.link, m.CLOSE_SUPERSEDED, f"another combiner registered as {name}")
        # "boot": which run of this controller (a combiner that sees it change drops its old rounds).
        result: dict[str, Any] = {"token_public_key": ctl.signer.public_pem().decode(), "revoked": sorted(ctl.verifier.revoked), "boot": ctl.boot}
        if urls := ctl.controller_urls():  # every controller on the store: the combiner dials them too after losing this one
            result["controllers"] = urls
        if csr:
            if ctl.ssl_context is None:
                raise ConflictError("this controller runs without TLS (--insecure); start the combiner with --insecure too")
            result["cert"] = cert
            result["cert_ttl_s"] = ctl.settings.combiner_cert_ttl
        renewed = ctl.desk.renewed(link)
        if renewed is not None:
            result["token"] = renewed
        ctl.combiners[name] = ctl.new_combiner(name, link)
        run, self.runs[name] = self.runs.get(name), args.get("run") if isinstance(args.get("run"), str) else None
        # The same process back (a blip) still holds its round; a restarted one lost it.
        ctl.sessions.on_combiner_back(name, link, same_run=run is not None and run == self.runs[name])
        ctl.count_nodes()
        link.max_payload = SMALL_PAYLOAD  # raised to the size of a partial when a round starts
        actor = audit_actor(link)

        def note() -> None:
            ctl.state.upsert_combiner(name, "registered")
            ctl.state.audit(actor, "combiner.register", address=link.peer, name=name)

        await asyncio.to_thread(note)
        return result, None
