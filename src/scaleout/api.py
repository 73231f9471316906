"""Drive a federation from Python: ``from scaleout import Scaleout`` (issue 16).

    client = Scaleout("127.0.0.1", port=8090, verify="scaleout-data/ca.pem", token=ADMIN)
    client.set_active_package("client.tgz")
    client.set_active_model("seed.npz")
    session = client.start_session(rounds=3)
    client.wait_for_session(session["id"])

Method names and keyword arguments are Scaleout Edge's; results are plain dicts, lists as
``{"count": N, "result": [...]}``. Every call goes through the controller's admin service
over one TLS websocket link per object, reused. ``Scaleout`` runs that link on a private
event loop in a daemon thread, so its calls work from plain code, from threads and inside a
running event loop (a Jupyter kernel); ``AsyncScaleout`` offers the same methods as
coroutines. ``verify`` is True (the system's CAs, or ``SCALEOUT_CA``), a CA file, False
(no check: local experiments only), or the CA fingerprint a join token carries,
``"sha256:<64 hex>"``: the CA is then fetched from the controller without trusting it,
kept only if its fingerprint is that one, and the controller's certificate checked against
it, as ``scaleout join`` does with a join token.

When the link drops (the controller restarted), the next call opens a new one. A call
whose request had gone out when the link dropped is sent again only if it changes
nothing (a read: get_*, wait_for_*...); any other (start_session, set_active_package...)
may have been done, so it raises ConnectionFailed saying the outcome is unknown and what
shows it (get_sessions()...), rather than risk doing it twice.

Errors are the project's (scaleout.core.errors, exported here too), with the controller's
one-line message: ``NotFoundError`` (an unknown id), ``PermissionDenied`` (a token whose
role may not do that: a client token), ``ConflictError`` (a session is running),
``ProtocolError`` and ``ConfigError`` (a bad argument), ``LimitExceeded``...; each is also
a ``RemoteError`` whose ``code`` is the controller's. ``AuthError`` when the controller
refuses the token; ``ConnectionFailed`` when it cannot be reached or its certificate not
trusted, saying what to check; ``NotSupported`` for what this release does not do yet.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import re
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from scaleout.core.errors import (
    AuthError,
    ConfigError,
    ConflictError,
    ConnectionFailed,
    LimitExceeded,
    NotFoundError,
    NotSupported,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    ScaleoutError,
    ShuttingDown,
    Standby,
    remote_error,
)

log = logging.getLogger("scaleout")

__all__ = [
    "APIClient", "AsyncScaleout", "AuthError", "ConfigError", "ConflictError", "ConnectionFailed", "LimitExceeded", "NotFoundError",
    "NotSupported", "PermissionDenied", "ProtocolError", "RemoteError", "Scaleout", "ScaleoutError",
]

T = TypeVar("T")
RoundCallback = Callable[[dict[str, Any]], object]
DEFAULT_PORT = 8090
FINISHED = ("finished", "failed", "stopped", "interrupted")  # a session in one of these is over
# How to tell whether a write whose link dropped was done (see AsyncScaleout._call).
CHECK = {
    "session.start": "get_sessions()", "session.continue": "get_session(id)", "session.stop": "get_session(id)",
    "package.set_active": "get_active_package()", "model.set_seed": "get_active_model()", "model.set_active": "get_active_model()",
    "command.run": "get_predictions() or `scaleout command ls`",
}


def _listing(rows: list[Any], n_max: int | None = None) -> dict[str, Any]:
    """Edge's list shape: the newest ``n_max`` (all when None) and how many there are."""
    shown = rows if n_max is None else rows[-n_max:] if n_max > 0 else []
    return {"count": len(rows), "result": shown}


class AsyncScaleout:
    """The admin API as coroutines (see the module's docstring for ``Scaleout``)."""

    def __init__(
        self, host: str | None = None, *, port: int | None = None, secure: bool | None = None,
        verify: bool | str | os.PathLike[str] = True, token: str | None = None,
    ) -> None:
        host = host or os.environ.get("SCALEOUT_CONTROLLER")
        token = token or os.environ.get("SCALEOUT_TOKEN")
        if not host:
            raise ConfigError("host", "name the controller: Scaleout(host, port=..., token=...), or set SCALEOUT_CONTROLLER")
        if not token:
            raise ConfigError("token", "pass an admin token: Scaleout(..., token=...), or set SCALEOUT_TOKEN")
        from scaleout.transport.dialer import Controllers

        urls = []
        for one in host.split(","):  # several: the active controller and its standbys
            one = one.strip()
            if "://" in one:  # a URL: wss://host:port
                scheme, _, rest = one.partition("://")
                secure = scheme == "wss" if secure is None else secure
                url_host, _, url_port = rest.rstrip("/").rpartition(":")
                one, one_port = (url_host, int(url_port)) if url_port.isdigit() else (rest.rstrip("/"), port)
            else:
                one_port = port
            urls.append(f"{'wss' if secure is not False else 'ws'}://{one}:{one_port or DEFAULT_PORT}")
        secure = True if secure is None else secure
        self._controllers = Controllers(urls)
        self.url = self._controllers.current
        self.token = token
        self._secure = secure
        ca = os.environ.get("SCALEOUT_CA") if verify is True else None
        self._ca: str | None = str(verify) if isinstance(verify, (str, os.PathLike)) else ca
        self._verify = verify is not False
        self._pin: str | None = None  # verify="sha256:HEX", as a join token pins the CA
        self._ca_pem: bytes | None = None  # the CA fetched and found to be the pinned one
        if isinstance(verify, str) and verify[:7].lower() == "sha256:":
            self._pin, self._ca = "sha256:" + verify[7:].lower(), None
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", self._pin):
                raise ConfigError("verify", f"verify={verify[:80]!r} is not a CA fingerprint: sha256: and 64 hex digits, as a join token carries")
        self._link: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._listeners: set[Callable[[str, dict[str, Any]], None]] = set()

    @classmethod
    def from_data_dir(cls, path: str | os.PathLike[str]) -> AsyncScaleout:
        """The controller started with ``scaleout serve --data-dir PATH`` on this machine."""
        import json

        folder = Path(path)
        try:
            info = json.loads((folder / "controller.json").read_text())
            token = (folder / "admin.token").read_text().strip()
        except OSError as exc:
            raise ConfigError("data_dir", f"{folder} is not the data directory of a started controller ({exc.strerror})") from None
        return cls(info["url"], verify=info.get("ca") or False, token=token, secure=str(info["url"]).startswith("wss://"))

    # -- the link ------------------------------------------------------------------------

    async def _call(self, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None) -> tuple[dict[str, Any], bytes | None]:
        """One request on this object's link (opened, or opened again, as needed); a refusal
        raises the error class of its code (see the module's docstring).

        A link found closed before the request is sent is replaced first (the controller
        restarted between calls): nothing was sent on it. One that drops after the request
        went out is retried on a new link only for an operation that changes nothing
        (core/permissions.py READS); for any other, whether the controller did it is
        unknown, and ConnectionFailed says how to check rather than risk doing it twice
        (a second session started)."""
        from scaleout.core.permissions import READS
        from scaleout.transport.link import LinkClosed

        if self._lock is None:
            self._lock = asyncio.Lock()
        for attempt in (1, 2):
            link = await self._connected()
            try:
                # With a payload: not the whole upload to a standby first (the dialer asks its status).
                return await self._controllers.request(link, op, {k: v for k, v in (args or {}).items() if v is not None}, blob, timeout=None)
            except LinkClosed as exc:
                self._link = None
                why = exc.reason or "no reason given"
                if op not in READS:
                    raise ConnectionFailed(
                        f"the link to the controller at {self.url} closed after {op} was sent ({why}): whether it was done is unknown; "
                        f"check with {CHECK.get(op, 'get_controller_status()')} before repeating it"
                    ) from None
                if attempt == 2:  # a read: once more on a new link, then give up
                    raise ConnectionFailed(f"the link to the controller at {self.url} closed during {op} ({why}); is it still running?") from None
            except (RemoteError, Standby) as exc:
                from scaleout.transport.dialer import refused_by_standby

                standby, active = refused_by_standby(exc)
                if standby and attempt == 1 and active in self._controllers.urls and active != self.url:
                    # Nothing was done there: the same request at the active one it names.
                    await self.close()
                    self._link, self._controllers.current = None, active
                    continue
                # The token was accepted at the handshake: a role refusal ("a client token may
                # not do session.start") is a permission, not an authentication, failure.
                code = "forbidden" if exc.code == "unauthorized" else exc.code
                raise remote_error(code, exc.message) from None
        raise AssertionError("unreachable")

    async def _connected(self) -> Any:
        assert self._lock is not None
        async with self._lock:
            from websockets.protocol import State

            if self._link is None or self._link.closed or self._link.ws.state is not State.OPEN:
                from scaleout.security.tls import client_context
                from scaleout.transport.net import ConnectError, TrustError, connect

                if self._pin is not None and self._secure:
                    await self._fetch_pinned_ca()
                if not self._secure:
                    ctx = None
                elif self._ca_pem is not None:
                    ctx = client_context(ca_pem=self._ca_pem)
                else:
                    ctx = client_context(self._ca) if self._verify else client_context(insecure=True)
                try:
                    self._link = await self._controllers.dial(lambda url: connect(url, self.token, ctx, max_payload=1 << 40))
                    self.url = self._controllers.current
                except AuthError as exc:
                    raise AuthError(f"{exc}; check token= (or SCALEOUT_TOKEN): an admin token of this controller (DATA_DIR/admin.token)") from None
                except TrustError as exc:
                    reason = str(exc).split("; ")[0]
                    raise ConnectionFailed(
                        f"{reason}; check verify=: the controller's CA file (DATA_DIR/ca.pem, or SCALEOUT_CA), and that {self.url} is that controller"
                    ) from None
                except ConnectError as exc:
                    raise ConnectionFailed(f"{exc}; check that the controller is running and that host, port and secure= name it") from None
                self._reader = asyncio.get_running_loop().create_task(self._link.run(on_message=self._on_message))
            return self._link

    async def _fetch_pinned_ca(self) -> None:
        """The controller's CA, fetched from its /ca.pem without trusting it and kept once its
        fingerprint is the one ``verify=`` pins (as `scaleout join` does with a join token's)."""
        from scaleout.transport.discovery import fetch_ca
        from scaleout.transport.net import ConnectError, TrustError

        if self._ca_pem is not None:
            return
        assert self._pin is not None
        try:
            self._ca_pem = await fetch_ca(self.url, self._pin, pinned_by="verify=")
        except TrustError as exc:
            raise ConnectionFailed(f"{exc}; check verify=: the fingerprint a join token of this controller carries") from None
        except ConnectError as exc:
            raise ConnectionFailed(f"{exc}; check that the controller is running and that host, port and secure= name it") from None

    async def _on_message(self, inc: Any) -> None:
        """Events the controller pushes on this link (a session's rounds, while waiting for it)."""
        from scaleout.core import messages as m

        if isinstance(inc.msg, m.Event):
            for listener in list(self._listeners):
                listener(inc.msg.kind, inc.msg.data)

    async def close(self) -> None:
        """Close the link (a later call opens a new one)."""
        if self._link is not None:
            await self._link.ws.close()
            self._link = None
        if self._reader is not None:
            self._reader.cancel()

    # -- clients and combiners --------------------------------------------------------------

    async def get_clients(self, n_max: int | None = None) -> dict[str, Any]:
        """The clients the controller knows ({"name", "status", "combiner", "attributes", ...}); the latest ``n_max``."""
        return _listing((await self._call("client.ls"))[0]["clients"], n_max)

    async def get_clients_count(self) -> int:
        """How many clients the controller knows."""
        return len((await self._call("client.ls"))[0]["clients"])

    async def get_active_clients(self) -> dict[str, Any]:
        """The clients connected now."""
        return _listing([c for c in (await self._call("client.ls"))[0]["clients"] if c.get("status") == "online"])

    async def get_client(self, name: str) -> dict[str, Any]:
        """One client: its status, package, attributes and recent commands (NotFoundError: no such client)."""
        return dict((await self._call("client.show", {"name": name}))[0]["client"])

    async def get_current_attributes(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each client's attributes as it last logged them (log_attributes)."""
        return {name: (await self.get_client(name)).get("attributes") or {} for name in client_ids}

    async def get_attribute_trail(self, client_id: str, n_max: int | None = None) -> dict[str, Any]:
        """Each change the client's log_attributes made, oldest first: rows of
        {"client", "key", "value", "created"} (unix seconds); the latest ``n_max``."""
        info = (await self._call("client.attributes", {"name": client_id, "limit": n_max or 0}))[0]
        return {"count": info["total"], "result": info["attributes"]}

    async def wait_for_clients(self, count: int = 1, timeout: float = 60) -> int:
        """Return once at least ``count`` clients are connected (ConflictError after
        ``timeout`` seconds); how many are."""
        return int((await self._call("client.wait", {"count": count, "timeout": timeout}))[0]["clients"])

    async def get_combiners(self) -> dict[str, Any]:
        """The combiners the controller knows."""
        return _listing((await self._call("combiner.ls"))[0]["combiners"])

    async def get_combiner(self, name: str) -> dict[str, Any]:
        """One combiner by name (NotFoundError: no such combiner)."""
        from scaleout.core.errors import NotFoundError

        for row in (await self.get_combiners())["result"]:
            if row["name"] == name:
                return dict(row)
        raise NotFoundError("combiner", name)

    async def get_controller_status(self) -> dict[str, Any]:
        """The controller's address, global model, active package, running session and counts."""
        return (await self._call("status"))[0]

    # -- packages and models -------------------------------------------------------------------

    async def set_active_package(self, path: str | os.PathLike[str], helper: str = "numpyhelper", name: str | None = None, description: str = "") -> dict[str, Any]:
        """Activate a compute package: a folder (packed as `scaleout package create` does) or a .tgz."""
        from scaleout.package.archive import package_bytes

        data, label = await asyncio.to_thread(package_bytes, Path(path))
        return (await self._call("package.set_active", {"name": name or label}, data))[0]

    async def get_active_package(self) -> dict[str, Any]:
        """The active compute package: {"id", "name", "size", "created", "active"} (NotFoundError: none yet)."""
        for row in (await self.get_packages())["result"]:
            if row["active"]:
                return dict(row)
        raise NotFoundError("package", "active", text="no compute package is active yet: set_active_package(PATH) first")

    async def get_packages(self, n_max: int | None = None) -> dict[str, Any]:
        """Every package activated so far, oldest first; ``active`` marks the current one."""
        return _listing((await self._call("package.ls"))[0]["packages"], n_max)

    async def set_active_model(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Set the seed (global) model from a .npz written by numpyhelper or a .safetensors file."""
        from scaleout.package.seed import read_model_file

        data = await asyncio.to_thread(read_model_file, Path(path))
        return (await self._call("model.set_seed", {}, data))[0]

    async def get_active_model(self) -> dict[str, Any]:
        """The global model ({"id", "parent", "session_id", "round_index", "tensors", ...})."""
        return dict((await self._call("model.show", {"id": "active"}))[0]["model"])

    async def get_model(self, id: str) -> dict[str, Any]:
        """A model by id or unique prefix (NotFoundError: no such model)."""
        return dict((await self._call("model.show", {"id": id}))[0]["model"])

    async def get_models(self, session_id: str | None = None, n_max: int | None = None) -> dict[str, Any]:
        """Every model of the trail, or a session's (``session_id``); the latest ``n_max``."""
        return _listing((await self._call("model.ls", {"session_id": session_id}))[0]["models"], n_max)

    async def get_model_trail(self, id: str | None = None) -> dict[str, Any]:
        """The model ``id`` (default: the global model) and its ancestors, the seed first."""
        rows = {m["id"]: m for m in (await self.get_models())["result"]}
        key = id or (await self.get_controller_status()).get("active_model")
        if key is not None and key not in rows:
            key = (await self.get_model(key))["id"]  # a unique prefix
        trail: list[dict[str, Any]] = []
        while key is not None and key in rows and len(trail) <= len(rows):
            trail.append(rows[key])
            key = rows[key].get("parent")
        return _listing(trail[::-1])

    async def download_model(self, id: str, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Save a model ("active" for the global one): .npz as numpyhelper writes it, else .safetensors bytes."""
        info, blob = await self._call("model.get", {"id": None if id == "active" else id})
        assert blob is not None
        target = Path(path)
        await asyncio.to_thread(_write_model, blob, target)
        return {"id": info["id"], "path": str(target), "size": len(blob)}

    async def load_model(self, id: str) -> dict[str, Any]:
        """A model's tensors, by name."""
        from scaleout.core import payload

        _, blob = await self._call("model.get", {"id": None if id == "active" else id})
        assert blob is not None
        return dict((await asyncio.to_thread(payload.read, blob))[0])

    # -- sessions ----------------------------------------------------------------------------

    async def start_session(
        self, *, name: str | None = None, aggregator: str = "fedavg", aggregator_kwargs: dict[str, Any] | None = None,
        model_id: str | None = None, round_timeout: float = 180, rounds: int = 5, validate: bool = True, min_clients: int = 1,
        requested_clients: int | None = None, server_functions: Any = None, settings: dict[str, Any] | None = None,
        clients_per_round: int | float | None = None, seed: int | None = None, clients: list[str] | None = None,
    ) -> dict[str, Any]:
        """Start a session from the global model (or ``model_id``, any model of the trail):
        ``rounds`` rounds of ``aggregator`` (fedavg, fedprox, fedadam, fedyogi, fedadagrad,
        fedavgm, fedmedian, trimmedmean, krum, multikrum, bulyan, dpfedavg; Edge's ``fedopt``
        with ``{"serveropt": "adam"|"yogi"|"adagrad"}`` too) with ``aggregator_kwargs``,
        each waiting up to ``round_timeout`` seconds for at least ``min_clients`` clients;
        ``settings`` reach the train callback; ``validate`` has clients validate each new
        model. Returns the session ({"id", "status", ...}); wait_for_session(id) follows it.

        Client sampling: ``requested_clients`` (Edge's name) or ``clients_per_round`` (a count,
        or a fraction of the connected clients such as 0.1) clients are drawn each round with
        ``seed`` (drawn and recorded on the session when not given); ``clients`` fixes the set.

        ``server_functions``: Edge's ServerFunctions class (its module's source is sent; in a
        notebook, the class's own source), or the path of a file defining it."""
        if requested_clients is not None and clients_per_round is not None and requested_clients != clients_per_round:
            raise ConfigError("clients_per_round", f"give requested_clients ({requested_clients}) or clients_per_round ({clients_per_round}), not both")
        config = {
            "name": name, "aggregator": aggregator, "aggregator_kwargs": aggregator_kwargs or {}, "round_timeout": round_timeout,
            "rounds": rounds, "validate": validate, "min_clients": min_clients, "settings": settings or {}, "model": model_id,
            "clients_per_round": clients_per_round if clients_per_round is not None else requested_clients, "seed": seed, "clients": clients,
        }
        if server_functions is not None:
            config.update(server_functions_source(server_functions))
        return dict((await self._call("session.start", config))[0]["session"])

    async def continue_session(self, session_id: str, rounds: int = 5, round_timeout: float = 180) -> dict[str, Any]:
        """Carry on a session that ended (finished, stopped, failed, interrupted) for ``rounds``
        more rounds, from its last model, with its settings."""
        return dict((await self._call("session.continue", {"id": session_id, "rounds": rounds, "round_timeout": round_timeout}))[0]["session"])

    async def get_session(self, id: str) -> dict[str, Any]:
        """A session with its config and rounds (NotFoundError: no such session)."""
        return dict((await self._call("session.show", {"id": id}))[0]["session"])

    async def get_sessions(self) -> dict[str, Any]:
        """Every session, oldest first."""
        return _listing((await self._call("session.ls"))[0]["sessions"])

    async def get_session_status(self, id: str) -> str:
        """A session's status: running, finished, failed, stopped or interrupted."""
        return str((await self.get_session(id))["status"])

    async def session_is_finished(self, id: str) -> bool:
        """Whether the session is over (finished, failed, stopped or interrupted)."""
        return await self.get_session_status(id) in FINISHED

    async def wait_for_session(self, id: str, timeout: float | None = None, callback: RoundCallback | None = None) -> dict[str, Any]:
        """Block until the session is over (or ``timeout`` seconds pass: TimeoutError); returns it.
        ``callback`` gets each of its rounds once it is over, in order, as get_rounds lists
        them plus "session_id" (rounds over before the call first); what it raises ends the wait."""
        return await asyncio.wait_for(self._follow(id, callback or (lambda r: None)), timeout)

    async def _follow(self, id: str, callback: RoundCallback) -> dict[str, Any]:
        """Follow session ``id`` to its end (transport/follow.py); a controller lost on the way
        (stopped, SIGKILLed, a standby taking over) is dialled again through the addresses
        given, for up to a minute (5 s given one address), and the session followed on there,
        no round told twice."""
        from scaleout.transport.follow import SessionFollower
        from scaleout.transport.net import ConnectError

        async def wait(key: str | None, wake: Callable[[], None]) -> dict[str, Any]:
            def on_event(kind: str, data: dict[str, Any]) -> None:
                if kind == "round" and data.get("session_id") == id:
                    wake()

            self._listeners.add(on_event)
            try:
                return dict((await self._call("session.wait", {"id": id}))[0]["session"])
            finally:
                self._listeners.discard(on_event)

        def on_lost(exc: ScaleoutError, seconds: float) -> None:
            log.warning("lost the controller while following session %s (%s); dialling %s again", id, exc, ",".join(self._controllers.urls))

        def give_up(exc: ScaleoutError) -> ConnectionFailed:
            return ConnectionFailed(f"lost the controller while following session {id} ({exc}); it is still running there")

        return await SessionFollower(
            id, show=lambda key: self.get_session(id), wait=wait, on_round=callback, urls=lambda: self._controllers.urls,
            is_loss=lambda exc: isinstance(exc, (ConnectionFailed, ConnectError)) or exc.code in (ShuttingDown.code, Standby.code),
            on_lost=on_lost, give_up=give_up, reset=self.close,
        ).follow(patient_start=True)

    async def stop_session(self, id: str) -> dict[str, Any]:
        """Stop a running session; returns it (ConflictError: it is not running)."""
        return dict((await self._call("session.stop", {"id": id}))[0]["session"])

    async def get_rounds(self, session_id: str) -> dict[str, Any]:
        """A session's rounds, in order: participants, model, validation, duration, reason."""
        return _listing(list((await self.get_session(session_id))["rounds"]))

    async def get_validations(
        self, session_id: str | None = None, model_id: str | None = None, sender_name: str | None = None, n_max: int | None = None,
    ) -> dict[str, Any]:
        """Each client's validation of each round's model, as Scaleout Edge lists them, oldest
        first: {"id", "model_id", "session_id", "round_index", "sender": {"name": CLIENT,
        "role": "client"}, "data": {metric: value, ...} (the quickstart's
        ``validation_accuracy``...), "created"} (unix seconds). Filtered by ``session_id``
        ("latest" too), ``model_id`` (an id or a unique prefix) and ``sender_name`` (a
        client); the latest ``n_max``. Each round's mean over its clients is its
        ``validation`` in get_rounds(session_id)."""
        args = {"session_id": session_id, "model_id": model_id, "sender_name": sender_name, "limit": n_max or 0}
        info = (await self._call("validation.ls", args))[0]
        return {"count": info["total"], "result": info["validations"]}

    async def get_metrics(self, session_id: str | None = None, key: str | None = None, n_max: int | None = None) -> dict[str, Any]:
        """What clients logged with log_metric, one row per value, oldest first:
        {"session_id", "round_index", "client", "step", "key", "value", "created"}.
        ``session_id`` ("latest" too) and ``key`` (a glob: "train_*") filter; the latest ``n_max``."""
        info = (await self._call("metric.ls", {"session_id": session_id, "key": key, "limit": n_max or 0}))[0]
        return {"count": info["total"], "result": info["metrics"]}

    # -- custom commands and inference ----------------------------------------------------------

    async def run_custom_command(
        self, command_type: str, blocking: bool = False, timeout: float | None = None, client_ids: list[str] | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Run the custom callback ``command_type`` (Edge's ``Custom_`` prefix optional) on
        ``client_ids`` (default: every connected client) with ``parameters``; each client has
        ``timeout`` seconds (default 60). Returns the job as it started (its ``id``, for
        ``scaleout command show``), at once; with ``blocking=True`` the job once every client
        answered, with ``results``: one {"client", "status" ("ok" or "error"), "data",
        "error", "code"} each. The keywords, their order and ``blocking=False`` are Scaleout
        Edge's APIClient's."""
        job = (await self._call("command.run", {"kind": "command", "name": command_type, "params": parameters or {}, "clients": client_ids, "timeout": timeout}))[0]["job"]
        if not blocking:
            return dict(job)
        return dict((await self._call("command.wait", {"kind": "command", "id": job["id"]}))[0]["job"])

    async def start_inference(
        self, model_id: str | None = None, client_ids: list[str] | None = None, parameters: dict[str, Any] | None = None,
        timeout: float | None = None, blocking: bool = False,
    ) -> dict[str, Any]:
        """Have ``client_ids`` (default: every connected client) run their predict callback on
        ``model_id`` (default: the global model) with ``parameters``. Returns the job as it
        started ({"id", "model_id", ...}; its id is the predictions' ``correlation_id``);
        ``blocking=True`` waits for every client's answer and returns the job with ``results``."""
        args = {"kind": "predict", "model": model_id, "params": parameters or {}, "clients": client_ids, "timeout": timeout}
        job = (await self._call("command.run", args))[0]["job"]
        if not blocking:
            return dict(job)
        return dict((await self._call("command.wait", {"kind": "predict", "id": job["id"]}))[0]["job"])

    async def get_predictions(
        self, model_id: str | None = None, correlation_id: str | None = None, client_id: str | None = None, n_max: int | None = None,
    ) -> dict[str, Any]:
        """Clients' predictions, oldest first, one row each: {"correlation_id", "model_id",
        "client", "status" ("ok", "error", or "pending" while it runs), "data", "error",
        "created"}. Filtered by ``model_id`` (an id or a unique prefix), ``correlation_id``
        (what start_inference returned as ``id``) and ``client_id``; the latest ``n_max``."""
        if model_id is not None:
            model_id = str((await self.get_model(model_id))["id"])
        if correlation_id is not None:
            listed = [(await self._call("command.show", {"kind": "predict", "id": correlation_id}))[0]["job"]]
        else:
            listed = (await self._call("command.ls", {"kind": "predict", "limit": 100_000}))[0]["jobs"]
        listed = [j for j in listed if model_id in (None, j["model_id"])]
        # Without a client filter the listing's counts say how many rows there are, and
        # n_max reads only the newest jobs it shows.
        total = sum(len(j["results"]) if "results" in j else j["ok"] + j["error"] + j["pending"] for j in listed) if client_id is None else None
        rows: list[dict[str, Any]] = []
        for brief in reversed(listed):
            job = brief if "results" in brief else (await self._call("command.show", {"kind": "predict", "id": brief["id"]}))[0]["job"]
            rows[:0] = [
                {
                    "correlation_id": job["id"], "model_id": job["model_id"], "client": r["client"], "status": r["status"], "data": r["data"],
                    "error": r["error"], "code": r["code"], "created": job["created"], "finished": r["finished"],
                }
                for r in job["results"]
                if client_id in (None, r["client"])
            ]
            if total is not None and n_max is not None and len(rows) >= n_max:
                break
        shown = _listing(rows, n_max)
        return {"count": len(rows) if total is None else total, "result": shown["result"]}


def _write_model(blob: bytes, target: Path) -> None:
    if target.suffix == ".npz":
        from scaleout.core import payload
        from scaleoututil.helpers.helpers import get_helper

        get_helper("numpyhelper").save(list(payload.decode(blob)) if payload.layout_of(blob) == "list" else list(payload.read(blob)[0].values()), str(target))
    else:
        target.write_bytes(blob)


class Scaleout:
    """The admin API as plain calls (see the module's docstring); ``Scaleout.from_data_dir(DIR)``
    for a controller on this machine. Each method is AsyncScaleout's, run on a private loop."""

    def __init__(
        self, host: str | None = None, *, port: int | None = None, secure: bool | None = None,
        verify: bool | str | os.PathLike[str] = True, token: str | None = None,
    ) -> None:
        self._async = AsyncScaleout(host, port=port, secure=secure, verify=verify, token=token)
        self._start()

    @classmethod
    def from_data_dir(cls, path: str | os.PathLike[str]) -> Scaleout:
        self = cls.__new__(cls)
        self._async = AsyncScaleout.from_data_dir(path)
        self._start()
        return self

    def _start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scaleout-api", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)

    def __enter__(self) -> Scaleout:
        return self

    def wait_for_session(self, id: str, timeout: float | None = None, callback: RoundCallback | None = None) -> dict[str, Any]:
        # AsyncScaleout's, with ``callback`` run in the calling thread rather than on the
        # private loop: it may call this object (a download per round) and print to its cell.
        if callback is None:
            return self._run(self._async.wait_for_session(id, timeout))
        rounds: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self._async.wait_for_session(id, timeout, rounds.put), self._loop)
        future.add_done_callback(lambda _: rounds.put(None))
        while (row := rounds.get()) is not None:
            try:
                callback(row)
            except BaseException:
                future.cancel()
                raise
        return future.result()

    wait_for_session.__doc__ = AsyncScaleout.wait_for_session.__doc__

    def __exit__(self, *exc: object) -> None:
        self.close()



def _blocking(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """Scaleout's form of one AsyncScaleout method: the same name, arguments and docstring."""

    @functools.wraps(method)
    def call(self: Scaleout, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._async, name)(*args, **kwargs))

    return call


for _name, _method in list(vars(AsyncScaleout).items()):
    if not _name.startswith("_") and _name not in vars(Scaleout) and asyncio.iscoroutinefunction(_method):
        setattr(Scaleout, _name, _blocking(_name, _method))


APIClient = Scaleout  # FEDn's name for it


def server_functions_source(server_functions: Any) -> dict[str, Any]:
    """``start_session(server_functions=...)``'s part of the session config: the source of the
    class's module (a notebook's class: the class's own source, with Edge's imports above it),
    or of the file a path names. The controller compiles it in its server-functions worker."""
    import inspect
    from pathlib import Path

    if isinstance(server_functions, (str, Path)):
        path = Path(server_functions)
        return {"server_functions": path.read_text(encoding="utf-8"), "server_functions_file": path.name}
    cls = server_functions if inspect.isclass(server_functions) else type(server_functions)
    module = inspect.getmodule(cls)
    try:
        source = inspect.getsource(module) if module is not None and module.__name__ != "__main__" else None
    except (OSError, TypeError):
        source = None
    if source is None and module is not None and getattr(module, "__file__", None):
        try:
            source = inspect.getsource(module)  # a script run as __main__
        except (OSError, TypeError):
            source = None
    name = Path(getattr(module, "__file__", None) or "server_functions.py").name
    if source is None:  # a notebook cell: the class alone, with the imports Edge's example uses
        try:
            body = inspect.getsource(cls)
        except (OSError, TypeError) as exc:
            raise ValueError(f"start_session(server_functions={cls.__name__}): its source cannot be found ({exc}); pass the path of its file") from None
        source = (
            "from scaleoututil.serverfunctions.allowed_import import Dict, List, Optional, ServerFunctionsBase, Tuple, api_client, logger, np, random\n"
            "from scaleoututil.serverfunctions.serverfunctionsbase import RoundType\n\n" + body
        )
        name = "server_functions.py"
    if cls.__name__ != "ServerFunctions":
        source += f"\n\nServerFunctions = {cls.__name__}\n"
    return {"server_functions": source, "server_functions_file": name}
