"""The controller's desk for tokens and node identities: join tokens, enrolment, token
listing and revocation, removing nodes, and combiner certificates limited to the names
an admin allowed (short-lived, renewed over the controller link)."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from scaleout.core import messages as m
from scaleout.core.errors import AuthError, ConflictError, ProtocolError, RateLimited
from scaleout.core.ratelimit import RateLimiter
from scaleout.roles.common import audit_actor as _actor
from scaleout.roles.common import close_now, new_id
from scaleout.security import jointoken, tls, tokens
from scaleout.store.identities import Identities, used_up
from scaleout.transport.link import Link

if TYPE_CHECKING:
    from scaleout.roles.admin import Caller

log = logging.getLogger("scaleout.controller")

IDENTITY_TTL_S = 365 * 86400  # a node's own credential; renewed when it connects after half of it
JOIN_TTL_S = 86400  # the join tokens `scaleout serve` prints for a first combiner and client
COMBINER_CERT_TTL_S = 7 * 86400
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_SANS = 32
MAX_URLS_IN_TOKEN = 8
DEFAULT_ENROL_RATE = 60.0  # enrolments per minute per join token (a minute's worth at once)
TICKET_TTL_S = 86400  # a client's ticket for its combiner proves its membership this long at most
JOIN_OPS = ("node.enrol", "client.assign", "combiner.register")  # all a join token's link may ask (the last two name an identity)


def canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return name.lower()


class DeskHost(Protocol):
    """What the desk needs of the controller that owns it."""

    settings: Any  # roles.controller.ControllerSettings
    url: str
    state: Any  # store.state.State
    registry: Any  # store.registry.RegistryWriter
    registry_changed: asyncio.Event
    assigner: Any  # core.selection.Assigner
    combiners: dict[str, Any]  # name -> its connection (.link, .name)
    signer: tokens.TokenSigner
    verifier: tokens.TokenVerifier
    ca_fingerprint: str | None
    advertised: str  # --advertise (or url)
    peer_urls: list[str]  # the other controllers on a shared store (active or standby)
    ca_pem: bytes
    ca_key_pem: bytes
    ssl_context: Any

    def write_admin_token(self) -> None: ...

    def combiner_of(self, link: Link) -> Any: ...


class AuditBatch:
    """Audit entries written together (group commit): those that arrive while a batch is
    being written (in a thread) go in the next, in one transaction with one rewrite of the
    audit head, so thousands of nodes enrolling at once are not one write each."""

    def __init__(self, write: Callable[[list[Any]], None]) -> None:
        self.write = write
        self.pending: list[tuple[Any, asyncio.Future[None]]] = []
        self.task: asyncio.Task[None] | None = None

    async def add(self, actor: str, action: str, address: str | None, **detail: Any) -> None:
        """Append an entry; returns once it is committed (raises what its batch's write raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append(((actor, action, address, detail), done))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())
        await done

    async def _run(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            error: BaseException | None = None
            try:
                await asyncio.to_thread(self.write, [entry for entry, _ in batch])
            except Exception as exc:  # noqa: BLE001 - not handled here: each caller of the batch raises it (a full disk, a lost store)
                error = exc
            for _, done in batch:
                if not done.done():
                    done.set_exception(error) if error is not None else done.set_result(None)


class Desk:
    def __init__(self, ctl: DeskHost) -> None:
        self.ctl = ctl
        self.db = Identities(ctl.state)
        self.audits = AuditBatch(ctl.state.audit_many)  # enrolments' entries, written in bursts
        self.links: set[Link] = set()
        self.forgetting: set[asyncio.Future[None]] = set()
        ctl.verifier.revoked |= self.db.revoked_ids()
        rate = getattr(ctl.settings, "max_enrol_rate", DEFAULT_ENROL_RATE)
        self.enrol_rate = RateLimiter(rate / 60, max(1.0, rate)) if rate > 0 else None

    # -- helpers for the controller ----------------------------------------------------------

    def urls(self) -> list[str]:
        """Addresses a join token names, most likely to be dialled first: the names given
        with --san, then the address listened on (every interface's for a wildcard), loopback last."""
        s = self.ctl.settings
        scheme = "ws" if s.insecure else "wss"
        port = urlsplit(self.ctl.url).port
        if s.host in tls.WILDCARD_HOSTS:
            from scaleout.roles.common import cert_names

            hosts = [h for h in cert_names(s.host, s.san) if h not in LOOPBACK]
            hosts = list(dict.fromkeys([*s.san, *hosts]))
        else:
            hosts = [s.host, *s.san]
        hosts = [h for h in hosts if h not in LOOPBACK][: MAX_URLS_IN_TOKEN - 1]
        out = [f"{scheme}://{'[' + h + ']' if ':' in h else h}:{port}" for h in hosts]
        if self.ctl.advertised and self.ctl.advertised != self.ctl.url:
            out.insert(0, self.ctl.advertised)  # --advertise: where nodes dial it, first
        out += self.ctl.peer_urls[: max(0, MAX_URLS_IN_TOKEN - 1 - len(out))]  # the standbys (or the active one)
        loop = urlsplit(self.ctl.url).netloc
        out.append(f"{scheme}://{loop}")
        return list(dict.fromkeys(out))

    def issue(self, role: str, ttl_s: int, *, name: str | None, uses: int | None, sans: list[str], creator: str) -> dict[str, Any]:
        """A new token, recorded for `token ls`, and its join token."""
        jti = new_id("t-")
        token = self.ctl.signer.issue(role, ttl_s, time.time(), jti=jti, sub=name, controller=self.ctl.url, ca=self.ctl.ca_fingerprint)
        claims = tokens.peek(token)
        self.db.add_token(jti, role, name, claims.exp, uses, sans, creator)
        join = jointoken.encode(jointoken.JoinToken(tuple(self.urls()), self.ctl.ca_fingerprint, token))
        return {"token": token, "join_token": join, "role": role, "expires": claims.exp, "jti": jti, "id": jti, "name": name, "uses": uses, "sans": sans}

    def on_link(self, link: Link) -> None:
        self.links.add(link)
        claims = link.claims
        if claims is not None and claims.nid is None and claims.jti.startswith("t-"):
            asyncio.get_running_loop().run_in_executor(None, self._touch, claims.jti, time.time())  # a store write: not on the loop

    def _touch(self, jti: str, now: float) -> None:
        try:
            self.db.touch_token(jti, now)
        except Exception as exc:  # the role edge: a full disk must not refuse the link
            log.debug("could not note the use of token %s: %s", jti, exc)

    def gone(self, link: Link) -> None:
        self.links.discard(link)

    def check_join_link(self, link: Link, op: str) -> None:
        """A join token (no node identity yet) may only enrol (and, naming an identity,
        be assigned or register): it fetches nothing. A used-up one may only finish an
        enrolment it started (Identities.enrol decides)."""
        claims = link.claims
        if claims is None or claims.nid is not None or claims.role == "admin":
            return
        if op != "node.enrol" and used_up(self.db.token(claims.jti)):
            raise AuthError("this join token was used up: it opens nothing any more")
        if op not in JOIN_OPS:
            raise AuthError(f"a join token may only enrol a node (node.enrol), not do {op}: enrol first, as scaleout {'join' if claims.role == 'client' else 'combine'} does")

    def ticket(self, claims: tokens.TokenClaims, combiner: str) -> str:
        """A client's ticket for ``combiner``: what it shows there instead of its own credential
        (useless at the controller and at any other combiner), and what that combiner forwards
        as proof that the client is attached to it."""
        return self.ctl.signer.issue("client", TICKET_TTL_S, time.time(), jti=new_id("k-"), sub=claims.sub, nid=claims.nid, aud=combiner)

    def node_identity(self, link: Link, role: str, name: str, args: dict[str, Any]) -> tokens.TokenClaims:
        """Refuse to act for ``name`` unless the link holds that node's own credential (or
        passes it as ``identity``, as simulated clients sharing one link do); its claims."""
        claims = link.claims
        if claims.nid is None and isinstance(args.get("identity"), str):
            claims = self.ctl.verifier.verify(args["identity"], time.time(), roles={role})
        if claims.nid is None:
            raise AuthError(f"a {role} connects with its own credential: enrol first (node.enrol), as scaleout {'join' if role == 'client' else 'combine'} does")
        if claims.sub != name or claims.role != role:
            raise AuthError(f"this credential belongs to {claims.role} {claims.sub!r}, not {role} {name!r}")
        return claims

    # -- operations ---------------------------------------------------------------------------

    async def enrol(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        """A node shows its join token once and gets its own credential for its name."""
        claims = link.claims
        role = claims.role
        if role not in ("client", "combiner"):  # an admin's credential is its token: no hidden second one
            raise AuthError(f"only a client or combiner join token enrols a node; {'an' if role[0] in 'aeiou' else 'a'} {role} token may not")
        if claims.nid is not None:
            raise ConflictError(f"this node is enrolled already (as {claims.role} {claims.sub!r})")
        name = m.check_name(args.get("name"), f"{role} name")
        secret = args.get("key")  # the node's own secret for this enrolment: it may finish it again
        if secret is not None and (not isinstance(secret, str) or not 16 <= len(secret) <= 256):
            raise ProtocolError("node.enrol: key must be text of 16-256 characters")
        key = hashlib.sha256(secret.encode()).hexdigest() if secret else None
        row, held = await asyncio.to_thread(lambda: (self.db.token(claims.jti), self.db.live(role, name)))
        finishing = held is not None and key is not None and held["token_id"] == claims.jti and held.get("enrol_key") == key
        now = time.time()
        if self.enrol_rate is not None:  # finishing one again counts too: each issues a credential
            wait = self.enrol_rate.take(claims.jti, now)
            if wait > 0:
                log.warning("token %s: enrolment of %s %s refused: more than %g a minute", claims.jti, role, name, self.enrol_rate.rate * 60)
                raise RateLimited(f"this join token enrols at most {self.enrol_rate.rate * 60:g} nodes a minute; try again in {wait:.0f} s")
        sans = list(row["sans"]) if row is not None else []
        # In a thread, as every store call of the controller's (State serialises its transactions).
        nid = await asyncio.to_thread(self.db.enrol, new_id("n-"), role, name, claims.jti, sans, now, key)
        token = self.ctl.signer.issue(role, IDENTITY_TTL_S, now, jti=new_id("i-"), sub=name, controller=self.ctl.url, ca=self.ctl.ca_fingerprint, nid=nid)
        if finishing:
            log.info("%s %s finished its enrolment (identity %s, token %s)", role, name, nid, claims.jti)
        else:
            await self.audits.add(_actor(link), "node.enrol", link.peer, role=role, name=name, identity=nid, token=claims.jti)
            log.info("%s %s enrolled (identity %s, token %s)", role, name, nid, claims.jti)
        return {"id": nid, "name": name, "role": role, "token": token}, None

    def renewed(self, link: Link) -> str | None:
        """A fresh credential for a node past half its credential's life, else None."""
        claims = link.claims
        if claims is None or claims.nid is None or time.time() < (claims.iat + claims.exp) / 2:
            return None
        return self.ctl.signer.issue(claims.role, IDENTITY_TTL_S, time.time(), jti=new_id("i-"), sub=claims.sub, controller=self.ctl.url, ca=self.ctl.ca_fingerprint, nid=claims.nid)

    def token_ls(self) -> dict[str, Any]:
        rows = self.db.tokens()  # one row per token an admin made: small
        now = time.time()
        for r in rows:
            r["status"] = "revoked" if r["revoked"] else "expired" if r["expires"] <= now else "used up" if used_up(r) else "valid"
        # Every node identity is a credential too (until revoked): listed, revocable by id.
        nodes = self.db.identities()
        for n in nodes:
            n["status"] = "revoked" if n["revoked"] else "valid"
        return {"tokens": rows, "identities": nodes}

    async def token_revoke(self, caller: Caller, key: str, with_nodes: bool) -> dict[str, Any]:
        state = self.ctl.state
        if key.startswith("n-"):  # a node identity (token ls lists them): that one credential

            def revoke_identity() -> dict[str, Any]:
                node: dict[str, Any] = self.db.revoke_identity(key, time.time())
                state.audit(caller.actor, "token.revoke", address=caller.address, id=key, nodes=[node["name"]])
                return node

            node = await asyncio.to_thread(revoke_identity)
            closed = await self.revoke([key], "its credential was revoked by an admin", keep=caller.origin)
            if node["role"] in ("client", "combiner"):
                self._forget_soon(node["role"], node["name"])
            log.warning("identity %s (%s %s) revoked", key, node["role"], node["name"])
            return {"id": key, "role": node["role"], "nodes": [{"role": node["role"], "name": node["name"]}], "closed": closed}

        def revoke_token() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            row = self.db.find_token(key)
            nodes = self.db.revoke_token(row["id"], with_nodes, time.time())
            state.audit(caller.actor, "token.revoke", address=caller.address, id=row["id"], nodes=[n["name"] for n in nodes])
            return row, nodes

        row, nodes = await asyncio.to_thread(revoke_token)
        ids = [row["id"], *(n["id"] for n in nodes)]
        closed = await self.revoke(ids, "its token was revoked by an admin", keep=caller.origin)
        for n in nodes:  # gone from client ls / combiner ls, as after client rm
            self._forget_soon(n["role"], n["name"])
        if row["role"] == "admin":
            self.ctl.write_admin_token()  # the data dir's own admin token, if that was it, is replaced at once
        log.warning("token %s revoked%s", row["id"], f" with its nodes {', '.join(n['name'] for n in nodes)}" if nodes else "")
        return {"id": row["id"], "role": row["role"], "nodes": [{"role": n["role"], "name": n["name"]} for n in nodes], "closed": closed}

    async def node_rm(self, role: str, caller: Caller, name: str) -> dict[str, Any]:
        name = m.check_name(name, f"{role} name")

        def remove() -> dict[str, Any]:
            row: dict[str, Any] = self.db.remove(role, name, time.time())
            self.ctl.state.audit(caller.actor, f"{role}.rm", address=caller.address, name=name, identity=row["id"])
            return row

        row = await asyncio.to_thread(remove)
        # A client's link is to its combiner, which closes it as the revocation reaches it: count it.
        at_combiner = role == "client" and name in self.ctl.assigner.where
        closed = await self.revoke([row["id"]], f"{role} {name} was removed by an admin") + int(at_combiner)
        self._forget_soon(role, name)
        log.warning("%s %s removed (identity %s)", role, name, row["id"])
        return {"name": name, "role": role, "id": row["id"], "closed": closed}

    def _forget_soon(self, role: str, name: str) -> None:
        task = asyncio.ensure_future(self._forget(role, name))
        self.forgetting.add(task)
        task.add_done_callback(self.forgetting.discard)

    async def _forget(self, role: str, name: str) -> None:
        """Drop a removed node from the registry once its combiner reported it gone (or 5 s on)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5

        def present() -> bool:
            return name in self.ctl.assigner.where if role == "client" else name in self.ctl.combiners

        while present() and loop.time() < deadline:
            changed = self.ctl.registry_changed
            try:
                await asyncio.wait_for(changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        try:
            await self.ctl.registry.flush()
            await asyncio.to_thread(self.ctl.state.db.execute, f"DELETE FROM {'clients' if role == 'client' else 'combiners'} WHERE name=?", (name,))
        except Exception as exc:  # the role edge: a full disk leaves the row, shown offline
            log.warning("could not drop %s %s from the registry: %s", role, name, exc)

    async def revoke(self, ids: list[str], reason: str, keep: int | None = None) -> int:
        """Refuse ``ids`` (tokens or identities) from now on, close the controller's links
        that hold them and tell every combiner to close its clients' links that do. The
        link asking (``keep``: its id()) gets its answer and closes as the command ends."""
        self.ctl.verifier.revoked.update(ids)
        wanted = set(ids)
        closing = [lk for lk in list(self.links) if id(lk) != keep and lk.claims is not None and (lk.claims.jti in wanted or lk.claims.nid in wanted)]
        await asyncio.gather(*(close_now(lk, m.CLOSE_REVOKED, reason) for lk in closing))
        for c in list(self.ctl.combiners.values()):
            if c.link not in closing:
                try:
                    await c.link.send(m.Revoked(ids=list(ids), reason=reason))
                except Exception as exc:  # the role edge: a dead combiner learns at its next register
                    log.warning("could not tell combiner %s about a revocation: %s", c.name, exc)
        return len(closing)

    # -- combiner certificates ----------------------------------------------------------------

    def allowed_names(self, link: Link) -> list[str]:
        row = self.db.identity(link.claims.nid) if link.claims.nid else None
        return list(dict.fromkeys([*LOOPBACK, *(canonical(n) for n in (row["sans"] if row else []))]))

    def sign(self, link: Link, csr: str, advertise: str | None) -> str:
        """Sign a combiner's request for the names its token allows (loopback always); a
        name asked for beyond them is left out, an advertised one beyond them refused."""
        allowed = self.allowed_names(link)
        if advertise is not None and canonical(advertise) not in allowed:
            raise AuthError(
                f"this combiner may not be reached as {advertise}: its token allows {', '.join(allowed)}; "
                f"create its token with: scaleout token create --role combiner --san {advertise}"
            )
        return tls.sign_csr(self.ctl.ca_pem, self.ctl.ca_key_pem, csr.encode(), role="combiner", lifetime_s=self.ctl.settings.combiner_cert_ttl, allowed=allowed).decode()

    def check_ready_url(self, link: Link, url: str) -> None:
        host = urlsplit(url).hostname or ""
        allowed = self.allowed_names(link)
        if self.ctl.ssl_context is not None and canonical(host) not in allowed:
            raise AuthError(f"this combiner may not advertise {host}: its token allows {', '.join(allowed)}")

    async def combiner_renew(self, link: Link, args: dict[str, Any], blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        if self.ctl.ssl_context is None:
            raise ConflictError("this controller runs without TLS: there is no certificate to renew")
        self.ctl.combiner_of(link)  # registered links only
        cert = self.sign(link, str(args.get("csr") or ""), args.get("advertise") if isinstance(args.get("advertise"), str) else None)
        result: dict[str, Any] = {"cert": cert, "cert_ttl_s": self.ctl.settings.combiner_cert_ttl}
        token = self.renewed(link)
        if token is not None:
            result["token"] = token
        return result, None
