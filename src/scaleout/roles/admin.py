"""The admin service: every operation an operator (the CLI, the TUI, a Python program) asks
of the controller, as one plain async method with typed keyword arguments that returns a
dict (and the bytes, where a model or package leaves).

No websocket inside: who asks is a ``Caller`` (role, actor for the audit log, address);
the doors (roles/door.py for the websocket link) decode a request, check the role with
core/permissions.py, call a method here and encode its answer. Each method checks its
arguments itself too (the same checks and words as the wire always had), so a direct call
is as safe as one over the link. ``Annotated`` metadata on a parameter tells a door what a
value of the wrong type is told: a sentence, or a check to run (it raises the error).

This module never imports the controller: it gets what it needs through ``AdminHost``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.core.errors import ConflictError, CorruptModelError, IntegrityError, NotFoundError, ProtocolError
from scaleout.package.limits import UnpackLimits
from scaleout.security import tokens
from scaleout.store.blobs import release
from scaleout.store.state import AUDIT_ANCHOR, AUDIT_HEAD, State
from scaleout.transport.link import Hashed, Pieces

log = logging.getLogger("scaleout.controller")
T = TypeVar("T")

MODEL = ("models", ".safetensors")
PACKAGE = ("packages", ".tgz")

# What a value of the wrong type is told (the same words the operations always used).
TTL = f"token.create needs ttl_s, a whole number of seconds from 1 to {tokens.MAX_TTL_S} (100 years)"
ROLE = f"token.create: role must be one of {', '.join(tokens.ROLES)}"
USES = "token.create: uses must be a whole number from 1 to 1000000"
SANS = "token.create: sans must be a list of at most 32 names or addresses"
SET_ACTIVE = "model.set_active needs the id of a model of the trail"
MODEL_LS = "model.ls: session_id must be a session id (text)"
WAIT = "client.wait needs count (int) and timeout (seconds)"
SINCE = "audit.ls: since must be unix seconds"
AUDIT_LIMIT = "audit.ls: limit must be a whole number from 0 (all) to 1000000"
HEAD = "audit.verify: head must be the text of an audit head file"
SNAPSHOT = "events.snapshot: session_id must be a session id (text)"
REVOKE = "token.revoke needs the token's id (see scaleout token ls)"
CONTINUE_ROUNDS = "session.continue: rounds must be a whole number >= 1"
START_MODEL = "session.start: model must be a model id"
COMMAND_WAIT = "command.wait: id must be a job id"
METRIC_TEXT = "metric.ls: {} must be text of 1-256 characters"
METRIC_NUMBER = "metric.ls: {} must be a whole number >= 0"
TRAIL_LIMIT = "client.attributes: limit must be a whole number >= 0"
VALIDATION_TEXT = "validation.ls: {} must be text of 1-256 characters"
VALIDATION_LIMIT = "validation.ls: limit must be a whole number from 0 (all) to 1000000"


def client_name(value: Any) -> str:
    return m.check_name(value, "client name")


def combiner_name(value: Any) -> str:
    return m.check_name(value, "combiner name")


def token_name(value: Any) -> str | None:
    return None if value is None else m.check_name(value, "token name")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Caller:
    """Who asks: the role that may (core/permissions.py), who it is for the audit log, from
    where; ``origin`` tells one connection from another (a revocation spares the one asking
    until it has its answer), nothing more."""

    role: str
    actor: str
    address: str | None = None
    origin: int | None = None

    def auditor(self, state: Any) -> Callable[..., None]:
        return lambda action, **detail: state.audit(self.actor, action, address=self.address, **detail)


class AdminHost(Protocol):
    """What the admin service needs of the controller that owns it."""

    dir: Path
    store: Path | str  # state.db or a postgresql:// URL
    url: str
    advertised: str  # the address nodes dial (--advertise, else url)
    state: Any  # store.state.State
    registry: Any  # store.registry.RegistryWriter
    blobs: Any  # store.blobs.BlobStore
    hub: Any  # roles.events.EventHub
    obs: Any  # roles.exporter.Observer
    combiners: dict[str, Any]  # name -> its connection (.clients, .url)
    registry_changed: asyncio.Event
    sessions: Any  # roles.sessions.SessionService
    commands: Any  # roles.command_service.CommandService
    desk: Any  # roles.enrolment.Desk
    audit_head: Any  # store.audithead.HeadFile
    package_signer: Any  # security.packages.PackageSigner
    settings: Any  # roles.controller.ControllerSettings (package_limits)

    @property
    def session(self) -> Any: ...


class AdminService:
    def __init__(self, host: AdminHost) -> None:
        self.host = host
        self._model_cache: tuple[str, bytes] | None = None  # the one model kept (mapped, for files)
        self._trusted = ""  # a model this process wrote from bytes it hashed: mapped without hashing it again
        self._package_cache: tuple[str, bytes] | None = None  # the active package, as clients fetch it

    # -- status, registry, metrics -------------------------------------------------------------

    async def status(self, caller: Caller) -> dict[str, Any]:
        h = self.host
        model, package = await asyncio.to_thread(lambda: (h.state.get_meta("active_model"), h.state.get_meta("active_package")))
        return {
            "url": h.url,
            "role": "active",  # a standby answers status itself (roles/controller.py)
            "active": h.advertised or h.url,
            "active_model": model,
            "active_package": package,
            "session": h.session.id if h.session else None,
            "combiners": len(h.combiners),
            "clients": sum(len(c.clients) for c in h.combiners.values()),
            "metrics_url": h.obs.url,  # None without --metrics-port
        }

    async def client_ls(self, caller: Caller) -> dict[str, Any]:
        await self.host.registry.flush()  # what was queued a moment ago is shown too
        return {"clients": await asyncio.to_thread(self.host.registry.read, "clients")}

    async def client_attributes(
        self, caller: Caller, *, name: Annotated[str, client_name], limit: Annotated[int, TRAIL_LIMIT] = 0,
    ) -> dict[str, Any]:
        """Client ``name``'s attribute trail: each change log_attributes made, one row per key
        ({"client", "key", "value", "created"}), oldest first; the latest ``limit`` (0: all)."""
        from scaleout.store.commands import attribute_trail

        name = client_name(name)
        if not _whole(limit) or limit < 0:
            raise ProtocolError(TRAIL_LIMIT)
        h = self.host
        await h.registry.flush()
        await h.commands.flush()  # what came in a moment ago is listed too
        rows, total = await asyncio.to_thread(h.registry.query, lambda st: attribute_trail(st, name, limit))
        return {"attributes": rows, "total": total}

    async def combiner_ls(self, caller: Caller) -> dict[str, Any]:
        await self.host.registry.flush()
        return {"combiners": await asyncio.to_thread(self.host.registry.read, "combiners")}

    async def client_wait(self, caller: Caller, *, count: Annotated[int, WAIT] = 1, timeout: Annotated[float, WAIT] = 60) -> dict[str, Any]:
        """Return once at least ``count`` clients are connected, or fail at ``timeout``."""
        if not isinstance(count, int) or not isinstance(timeout, (int, float)):
            raise ProtocolError(WAIT)
        h = self.host
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (n := sum(len(c.clients) for c in h.combiners.values() if c.url)) < count:
            if loop.time() >= deadline:
                raise ConflictError(f"only {n} of {count} clients connected within {timeout}s")
            try:
                await asyncio.wait_for(h.registry_changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                pass
        return {"clients": n}

    async def client_rm(self, caller: Caller, *, name: Annotated[str, client_name]) -> dict[str, Any]:
        return await self.host.desk.node_rm("client", caller, name)

    async def combiner_rm(self, caller: Caller, *, name: Annotated[str, combiner_name]) -> dict[str, Any]:
        return await self.host.desk.node_rm("combiner", caller, name)

    async def metric_ls(
        self, caller: Caller, *, kind: str = "metric", session_id: Annotated[str | None, METRIC_TEXT.format("session_id")] = None,
        round_index: Annotated[int | None, METRIC_NUMBER.format("round_index")] = None, client: Annotated[str | None, METRIC_TEXT.format("client")] = None,
        key: Annotated[str | None, METRIC_TEXT.format("key")] = None, limit: Annotated[int, METRIC_NUMBER.format("limit")] = 0,
    ) -> dict[str, Any]:
        """What clients logged with log_metric, one row per value, oldest first: the latest
        ``limit`` (0: all) matching ``session_id`` ("latest" too), ``round_index``, and the
        globs ``client`` and ``key``; with how many match in all."""
        from scaleout.store.metrics import KINDS, dropped_metrics, logged_metrics

        if kind not in KINDS:  # telemetry (issue 9) is listed the same way once it is a report kind
            raise ProtocolError(f"metric.ls: kind must be one of {', '.join(KINDS)}")
        for name, value in (("session_id", session_id), ("client", client), ("key", key)):
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 256):
                raise ProtocolError(METRIC_TEXT.format(name))
        for name, number in (("round_index", round_index), ("limit", limit)):
            if number is not None and (not _whole(number) or number < 0):
                raise ProtocolError(METRIC_NUMBER.format(name))
        h = self.host
        if session_id is not None:
            session_id = await asyncio.to_thread(h.sessions.key, {"id": None if session_id == "latest" else session_id})
            await asyncio.to_thread(h.state.session, session_id)  # no such session: say so, rather than list nothing
        await h.registry.flush()  # what came in a moment ago is listed too
        rows, total = await asyncio.to_thread(
            h.registry.query,
            lambda st: logged_metrics(st, kind=kind, session_id=session_id, round_index=round_index, client=client, key=key, limit=limit or 0),
        )
        dropped = await asyncio.to_thread(
            h.registry.query, lambda st: dropped_metrics(st, kind=kind, session_id=session_id, round_index=round_index, client=client),
        )
        return {"metrics": rows, "total": total, "dropped": dropped}

    async def validation_ls(
        self, caller: Caller, *, session_id: Annotated[str | None, VALIDATION_TEXT.format("session_id")] = None,
        model_id: Annotated[str | None, VALIDATION_TEXT.format("model_id")] = None,
        sender_name: Annotated[str | None, VALIDATION_TEXT.format("sender_name")] = None, limit: Annotated[int, VALIDATION_LIMIT] = 0,
    ) -> dict[str, Any]:
        """Each client's validation of each round's model, one record per client and round,
        oldest first: the latest ``limit`` (0: all) of ``session_id`` ("latest" too), of
        ``model_id`` (an id or a unique prefix) and of client ``sender_name``; with how many
        match in all. A round's mean over its clients is its ``validation`` (session.show)."""
        from scaleout.store.validations import client_validations

        for name, value in (("session_id", session_id), ("model_id", model_id), ("sender_name", sender_name)):
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 256):
                raise ProtocolError(VALIDATION_TEXT.format(name))
        if not _whole(limit) or not 0 <= limit <= 1_000_000:
            raise ProtocolError(VALIDATION_LIMIT)
        h = self.host
        if session_id == "latest":
            session_id = await asyncio.to_thread(h.sessions.key, {"id": None})
        await h.registry.flush()  # what came in a moment ago is listed too

        def read(st: State) -> tuple[list[dict[str, Any]], int]:
            # An unknown session or model says so (NotFoundError), rather than list nothing.
            if session_id is not None and st.db.execute("SELECT 1 FROM sessions WHERE id=?", (session_id,)).fetchone() is None:
                raise NotFoundError("session", session_id)
            model = None if model_id is None else str(st.model(model_id)["id"])  # a unique prefix too
            return client_validations(st, session_id=session_id, model_id=model, client=sender_name, limit=limit)

        rows, total = await asyncio.to_thread(h.registry.query, read)
        return {"validations": rows, "total": total}

    async def events_snapshot(self, caller: Caller, *, session_id: Annotated[str | None, SNAPSHOT] = None) -> dict[str, Any]:
        from scaleout.roles.events import snapshot

        return await snapshot(self.host, {} if session_id is None else {"session_id": session_id})

    # -- audit ------------------------------------------------------------------------------------

    async def audit_ls(self, caller: Caller, *, since: Annotated[float | None, SINCE] = None, limit: Annotated[int, AUDIT_LIMIT] = 100) -> dict[str, Any]:
        if since is not None and (not isinstance(since, (int, float)) or isinstance(since, bool) or not math.isfinite(since)):
            raise ProtocolError(SINCE)
        if not _whole(limit) or not 0 <= limit <= 1_000_000:
            raise ProtocolError(AUDIT_LIMIT)
        rows = await asyncio.to_thread(read_state, self.host.store, lambda st: st.audit_log(limit or -1, since))
        return {"entries": rows[::-1]}  # oldest first, as a log reads

    async def audit_verify(self, caller: Caller, *, head: Annotated[str | None, HEAD] = None, head_name: str | None = None) -> dict[str, Any]:
        """Check the chain, against the signed head beside state.db and a copy the operator
        kept (``head``, the text of that file; ``head_name`` says where it was)."""
        from scaleout.store.audithead import verify

        if head is not None and (not isinstance(head, str) or len(head) > 4096):
            raise ProtocolError(HEAD)
        signed = self.host.audit_head

        def check(st: State) -> dict[str, Any]:
            with st.transaction(immediate=False):  # one snapshot: the rows and state.db's head agree
                rows = st.db.execute("SELECT id, time, actor, action, address, detail, hash FROM audit ORDER BY id").fetchall()
                stored = st.get_meta(AUDIT_HEAD)
                in_store = st.get_meta(AUDIT_ANCHOR) if st.postgres else None  # the head every controller on the store shares
            return verify(rows, stored, signed.in_store(in_store) if st.postgres else signed, head, str(head_name or "--head"))

        return await asyncio.to_thread(read_state, self.host.store, check)

    # -- tokens -----------------------------------------------------------------------------------

    async def token_create(
        self, caller: Caller, *, role: Annotated[str, ROLE], ttl_s: Annotated[int, TTL], name: Annotated[str | None, token_name] = None,
        uses: Annotated[int | None, USES] = None, sans: Annotated[list[str] | None, SANS] = None,
    ) -> dict[str, Any]:
        if not _whole(ttl_s) or not 0 < ttl_s <= tokens.MAX_TTL_S:
            raise ProtocolError(TTL)
        if role not in tokens.ROLES:
            raise ProtocolError(ROLE)
        sans = sans or []
        token_name(name)
        if uses is not None and (not _whole(uses) or not 0 < uses <= 1_000_000):
            raise ProtocolError(USES)
        if not isinstance(sans, list) or len(sans) > 32 or not all(isinstance(x, str) and 0 < len(x) <= 253 for x in sans):
            raise ProtocolError(SANS)
        if sans and role != "combiner":
            raise ProtocolError("token.create: only a combiner token allows certificate names (--san)")
        from scaleout.roles.enrolment import canonical

        h = self.host

        def issue() -> dict[str, Any]:
            result: dict[str, Any] = h.desk.issue(str(role), ttl_s, name=name, uses=uses, sans=[canonical(x) for x in sans], creator=caller.actor)
            h.state.audit(
                caller.actor, "token.create", address=caller.address, role=role, jti=result["jti"], exp=result["expires"], name=name, uses=uses, sans=result["sans"],
            )
            return result

        return await asyncio.to_thread(issue)

    async def token_ls(self, caller: Caller) -> dict[str, Any]:
        return await asyncio.to_thread(self.host.desk.token_ls)  # type: ignore[no-any-return]

    async def token_revoke(self, caller: Caller, *, id: Annotated[str, REVOKE], with_nodes: bool = False) -> dict[str, Any]:
        if not isinstance(id, str) or not id:
            raise ProtocolError(REVOKE)
        return await self.host.desk.token_revoke(caller, id, bool(with_nodes))  # type: ignore[no-any-return]

    # -- packages ---------------------------------------------------------------------------------

    async def package_set_active(self, caller: Caller, data: bytes | None, *, name: str | None = None) -> dict[str, Any]:
        if not data:
            raise ProtocolError("package.set_active needs the package bytes")
        h = self.host
        if h.session is not None:
            raise ConflictError(f"session {h.session.id} is running; its clients run the current package (stop it first)")
        await asyncio.to_thread(check_package, data, h.settings.package_limits)
        digest = await asyncio.to_thread(h.blobs.put, PACKAGE[0], data, PACKAGE[1])
        name = str(name or "package.tgz")

        def commit() -> None:
            with h.state.transaction():
                h.state.add_package(digest, name, len(data), signature=h.package_signer.sign(digest))
                h.state.set_meta("active_package", digest)
                h.state.audit(caller.actor, "package.set_active", address=caller.address, id=digest, name=name)

        await asyncio.to_thread(commit)
        log.info("compute package %s (%s) is now active", name, digest[:12])
        h.hub.publish(m.ActiveChanged(what="package", id=digest, name=name))
        await h.commands.package_changed(digest, name)  # connected clients fetch it before their next task
        return {"id": digest, "name": name, "size": len(data)}

    async def package_ls(self, caller: Caller) -> dict[str, Any]:
        """Every package ever activated, oldest first; ``active`` marks the current one."""
        h = self.host
        active = await asyncio.to_thread(h.state.get_meta, "active_package")
        rows = await asyncio.to_thread(
            h.registry.query, lambda st: [dict(r) for r in st.db.execute("SELECT id, name, size, created FROM packages ORDER BY created, id")],
        )
        return {"packages": [{**row, "active": row["id"] == active} for row in rows]}

    async def package_get(self, caller: Caller) -> tuple[dict[str, Any], Hashed]:
        h = self.host

        def active() -> tuple[str, dict[str, Any]]:
            digest = h.state.get_meta("active_package")
            if digest is None:
                raise NotFoundError("package", "active", text="no compute package is active yet; an admin must run: scaleout package set-active FILE")
            return digest, h.state.package(digest)

        digest, row = await asyncio.to_thread(active)
        # Every joining client fetches it: read and checked once (in a thread), then kept.
        if self._package_cache is None or self._package_cache[0] != digest:
            self._package_cache = (digest, await asyncio.to_thread(h.blobs.get, PACKAGE[0], digest, PACKAGE[1]))
        signature = row.get("signature")
        if not signature:  # activated before packages were signed: signed now, once
            signature = h.package_signer.sign(digest)
            await asyncio.to_thread(h.state.add_package, digest, row["name"], row["size"], signature=signature)
        info = {"id": digest, "name": row["name"], "signature": signature, "signing_key": h.package_signer.public_pem().decode()}
        return info, Hashed(self._package_cache[1], digest)

    # -- models -----------------------------------------------------------------------------------

    async def model_set_seed(self, caller: Caller, data: bytes | None) -> dict[str, Any]:
        if not data:
            raise ProtocolError("model.set_seed needs the model bytes")
        specs = payload.describe(data)
        h = self.host
        if h.session is not None:
            raise ConflictError(f"session {h.session.id} is running; stop it before setting a new seed model")
        await asyncio.to_thread(lambda: payload.check_finite(payload.views(data)))
        digest = await asyncio.to_thread(h.blobs.put, MODEL[0], data, MODEL[1])

        def commit() -> None:
            with h.state.transaction():
                h.state.commit_model(digest, len(data), aggregator="seed")
                h.state.audit(caller.actor, "model.set_seed", address=caller.address, id=digest)

        await asyncio.to_thread(commit)
        log.info("seed model %s set (%d tensors, %d bytes)", digest[:12], len(specs), len(data))
        h.hub.publish(m.ActiveChanged(what="model", id=digest, name="seed"))
        h.hub.publish(m.ModelCommitted(model_id=digest, aggregator="seed", size=len(data)))
        return {"id": digest, "tensors": len(specs), "size": len(data)}

    async def model_set_active(self, caller: Caller, *, id: Annotated[str, SET_ACTIVE]) -> dict[str, Any]:
        """Roll the global model back (or forward) to any model of the trail (audited)."""
        if not isinstance(id, str) or not id:
            raise ProtocolError(SET_ACTIVE)
        h = self.host
        if h.session is not None:
            raise ConflictError(f"session {h.session.id} is running; stop it before changing the global model")
        row = await asyncio.to_thread(h.state.model, id)
        data = await self.model_bytes(row["id"])  # its file is there, intact
        await asyncio.to_thread(lambda: payload.check_finite(payload.views(data)))
        if isinstance(data, mmap.mmap):
            release(data)  # read once to check it: not held in memory for it

        def commit() -> None:
            with h.state.transaction():
                h.state.set_meta("active_model", row["id"])
                h.state.audit(caller.actor, "model.set_active", address=caller.address, id=row["id"])

        await asyncio.to_thread(commit)
        log.info("model %s is now the global model (set by an admin)", row["id"][:12])
        h.hub.publish(m.ActiveChanged(what="model", id=row["id"], name=row.get("aggregator") or ""))
        return {"model": {**row, "active": True}}

    async def model_ls(self, caller: Caller, *, session_id: Annotated[str | None, MODEL_LS] = None) -> dict[str, Any]:
        if session_id is not None and not isinstance(session_id, str):
            raise ProtocolError(MODEL_LS)
        st = self.host.state
        active, rows = await asyncio.to_thread(lambda: (st.get_meta("active_model"), st.models(session_id)))
        for row in rows:
            row["active"] = row["id"] == active
        return {"models": rows}

    async def model_show(self, caller: Caller, *, id: str | None = None) -> dict[str, Any]:
        st = self.host.state
        key = str(id or "")

        def read() -> tuple[dict[str, Any], str | None]:
            active = st.get_meta("active_model")
            return st.model((active or "active") if key in ("", "active") else key), active  # "active": as model download takes it

        row, active = await asyncio.to_thread(read)
        data = await self.model_bytes(row["id"])
        row["active"] = row["id"] == active
        row["tensors"] = {k: {"dtype": v.dtype, "shape": list(v.shape)} for k, v in payload.describe(data).items()}
        return {"model": row}

    async def model_get(self, caller: Caller, *, id: str | None = None) -> tuple[dict[str, Any], Hashed]:
        st = self.host.state

        def read() -> dict[str, Any]:
            key = id or st.get_meta("active_model")
            if not key:
                raise NotFoundError("model", "active", "set one with: scaleout model set-seed FILE")
            return st.model(str(key))  # type: ignore[no-any-return]

        row = await asyncio.to_thread(read)
        data = await self.model_bytes(row["id"])
        if caller.role == "admin":  # a model leaving the federation (combiners fetch one every round)
            await asyncio.to_thread(st.audit, caller.actor, "model.download", address=caller.address, id=row["id"])
        if isinstance(data, mmap.mmap):
            # Sent from a mapping of its own (checked when first mapped): the pages the send
            # touches are let go with it, so a model served to combiners does not stay in this
            # process's memory through the round's fold (the kept mapping stays untouched).
            data = await asyncio.to_thread(self.host.blobs.map, MODEL[0], row["id"], MODEL[1], check=False)
        return {"id": row["id"]}, Hashed(data, row["id"])  # its id is its sha256

    async def model_bytes(self, model_id: str) -> bytes:
        """A model's bytes, read and sha256-checked once (in a thread): every combiner fetches
        the round's global model, and the round itself needs it, so keep the latest one. Files
        are kept mapped (`BlobStore.map`: in the page cache, not the heap); other stores' in
        memory. A round's new model is put here as it is committed: never read back."""
        if self._model_cache is None or self._model_cache[0] != model_id:
            blobs = self.host.blobs
            mapped = getattr(blobs, "map", None)
            trusted = self._trusted == model_id  # written by this process from the bytes it hashed
            try:
                if mapped is not None:
                    data = await asyncio.to_thread(mapped, MODEL[0], model_id, MODEL[1], check=not trusted)
                else:
                    data = await asyncio.to_thread(blobs.get, MODEL[0], model_id, MODEL[1])
            except IntegrityError as exc:  # which model, where, and what to do: not an internal error
                raise CorruptModelError(model_id, str(blobs.root / MODEL[0]), exc.actual) from None
            self._model_cache = (model_id, data)
        return self._model_cache[1]

    def keep_model(self, model_id: str, data: bytes | Pieces) -> None:
        """The model a round just committed (``data``: its bytes or pieces, already in the
        store under ``model_id``): kept as `model_bytes` keeps one, without reading it back."""
        if getattr(self.host.blobs, "map", None) is not None:
            self._trusted, self._model_cache = model_id, None  # mapped when first asked for, unhashed
        else:
            self._model_cache = (model_id, data if isinstance(data, bytes) else b"".join(data.parts))

    # -- sessions (roles/sessions.py) -------------------------------------------------------------

    async def session_start(self, caller: Caller, *, model: Annotated[str | None, START_MODEL] = None, **config: Any) -> dict[str, Any]:
        """Start a session from the global model, or from ``model`` (any model of the trail);
        ``config``: the session's settings (core/config.py SessionConfig)."""
        args = {**config, "model": model} if model is not None else config
        return await self.host.sessions.start(args, caller.auditor(self.host.state))  # type: ignore[no-any-return]

    async def session_continue(
        self, caller: Caller, *, id: str | None = None, rounds: Annotated[int | None, CONTINUE_ROUNDS] = None, round_timeout: float | None = None,
    ) -> dict[str, Any]:
        args = {"id": id, "rounds": rounds, "round_timeout": round_timeout}
        return await self.host.sessions.continue_(args, caller.auditor(self.host.state))  # type: ignore[no-any-return]

    async def session_ls(self, caller: Caller) -> dict[str, Any]:
        return await self.host.sessions.ls()  # type: ignore[no-any-return]

    async def session_show(self, caller: Caller, *, id: str | None = None, clients: bool = False) -> dict[str, Any]:
        return await self.host.sessions.show({"id": id, "clients": clients})  # type: ignore[no-any-return]

    async def session_stop(self, caller: Caller, *, id: str | None = None) -> dict[str, Any]:
        return await self.host.sessions.stop_op({"id": id}, caller.auditor(self.host.state))  # type: ignore[no-any-return]

    # -- commands and predictions (roles/command_service.py) --------------------------------------

    async def command_run(
        self, caller: Caller, *, kind: str, name: str | None = None, params: dict[str, Any] | None = None, timeout: float | None = None,
        clients: list[str] | None = None, model: str | None = None,
    ) -> dict[str, Any]:
        return await self.host.commands.run(caller, kind=kind, name=name, params=params, timeout=timeout, clients=clients, model=model)  # type: ignore[no-any-return]

    async def command_ls(self, caller: Caller, *, kind: str = "command", limit: int = 100) -> dict[str, Any]:
        return await self.host.commands.ls(kind=kind, limit=limit)  # type: ignore[no-any-return]

    async def command_show(self, caller: Caller, *, kind: str = "command", id: str | None = None) -> dict[str, Any]:
        return await self.host.commands.show(kind=kind, id=id)  # type: ignore[no-any-return]

    async def command_wait(self, caller: Caller, *, kind: str = "command", id: Annotated[str, COMMAND_WAIT]) -> dict[str, Any]:
        return await self.host.commands.wait(kind=kind, id=id)  # type: ignore[no-any-return]

    async def client_show(self, caller: Caller, *, name: Annotated[str, client_name]) -> dict[str, Any]:
        return await self.host.commands.client_show(name=name)  # type: ignore[no-any-return]

    async def telemetry_ls(self, caller: Caller, *, client: Annotated[str | None, client_name] = None, key: str | None = None, limit: int = 100) -> dict[str, Any]:
        return await self.host.commands.telemetry_ls(client=client, key=key, limit=limit)  # type: ignore[no-any-return]


def read_state(path: Path | str, read: Callable[[State], T]) -> T:
    """Run ``read`` on a connection of its own (in a thread: a long audit log is not read on
    the event loop)."""
    st = State(path, migrate=False)
    try:
        return read(st)
    finally:
        st.close()


def check_package(data: bytes, limits: UnpackLimits) -> None:
    """Refuse a package a client would refuse (the same check_archive, within the same
    limits: it runs before anything is written) or one without a valid scaleout.yaml."""
    import tempfile

    from scaleout.package.archive import extract_archive
    from scaleout.package.project import load_project

    with tempfile.TemporaryDirectory(prefix="scaleout-pkg-") as tmp:
        load_project(extract_archive(data, Path(tmp) / "pkg", limits=limits))
