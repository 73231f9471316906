"""Drive a federation from Python: ``from scaleout import Scaleout`` (issue 16, first step).

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
coroutines. A refusal raises the project's ``RemoteError`` with the controller's one-line
message (its ``code`` says which: ``not_found``, ``unauthorized``, ``conflict``...).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from scaleout.core.errors import ConfigError

T = TypeVar("T")
DEFAULT_PORT = 8090
FINISHED = ("finished", "failed", "stopped", "interrupted")  # a session in one of these is over


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
        if "://" in host:  # a URL: wss://host:port
            scheme, _, rest = host.partition("://")
            secure = scheme == "wss" if secure is None else secure
            url_host, _, url_port = rest.rstrip("/").rpartition(":")
            host, port = (url_host, int(url_port)) if url_port.isdigit() else (rest.rstrip("/"), port)
        secure = True if secure is None else secure
        self.url = f"{'wss' if secure else 'ws'}://{host}:{port or DEFAULT_PORT}"
        self.token = token
        self._secure = secure
        ca = os.environ.get("SCALEOUT_CA") if verify is True else None
        self._ca: str | None = str(verify) if isinstance(verify, (str, os.PathLike)) else ca
        self._verify = verify is not False
        self._link: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None

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
        from scaleout.transport.link import LinkClosed

        if self._lock is None:
            self._lock = asyncio.Lock()
        for attempt in (1, 2):
            link = await self._connected()
            try:
                return await link.request(op, {k: v for k, v in (args or {}).items() if v is not None}, blob, timeout=None)
            except LinkClosed:
                self._link = None  # the controller restarted or the link dropped: once more on a new one
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _connected(self) -> Any:
        assert self._lock is not None
        async with self._lock:
            if self._link is None or self._link.ws.close_code is not None:
                from scaleout.security.tls import client_context
                from scaleout.transport.net import connect

                ctx = (client_context(self._ca) if self._verify else client_context(insecure=True)) if self._secure else None
                self._link = await connect(self.url, self.token, ctx, max_payload=1 << 40)
                self._reader = asyncio.get_running_loop().create_task(self._link.run())
            return self._link

    async def close(self) -> None:
        if self._link is not None:
            await self._link.ws.close()
            self._link = None
        if self._reader is not None:
            self._reader.cancel()

    # -- clients and combiners --------------------------------------------------------------

    async def get_clients(self, n_max: int | None = None) -> dict[str, Any]:
        return _listing((await self._call("client.ls"))[0]["clients"], n_max)

    async def get_clients_count(self) -> int:
        return len((await self._call("client.ls"))[0]["clients"])

    async def get_active_clients(self) -> dict[str, Any]:
        return _listing([c for c in (await self._call("client.ls"))[0]["clients"] if c.get("status") == "online"])

    async def get_client(self, name: str) -> dict[str, Any]:
        return dict((await self._call("client.show", {"name": name}))[0]["client"])

    async def get_current_attributes(self, client_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each client's attributes as it last logged them (log_attributes)."""
        return {name: (await self.get_client(name)).get("attributes") or {} for name in client_ids}

    async def get_combiners(self) -> dict[str, Any]:
        return _listing((await self._call("combiner.ls"))[0]["combiners"])

    async def get_combiner(self, name: str) -> dict[str, Any]:
        from scaleout.core.errors import NotFoundError

        for row in (await self.get_combiners())["result"]:
            if row["name"] == name:
                return dict(row)
        raise NotFoundError("combiner", name)

    async def get_controller_status(self) -> dict[str, Any]:
        return (await self._call("status"))[0]

    # -- packages and models -------------------------------------------------------------------

    async def set_active_package(self, path: str | os.PathLike[str], helper: str = "numpyhelper", name: str | None = None, description: str = "") -> dict[str, Any]:
        """Activate a compute package: a folder (packed as `scaleout package create` does) or a .tgz."""
        from scaleout.package.archive import package_bytes

        data, label = await asyncio.to_thread(package_bytes, Path(path))
        return (await self._call("package.set_active", {"name": name or label}, data))[0]

    async def get_active_package(self) -> dict[str, Any]:
        status = await self.get_controller_status()
        return {"id": status.get("active_package")}

    async def set_active_model(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Set the seed (global) model from a .npz written by numpyhelper or a .safetensors file."""
        from scaleout.package.seed import read_model_file

        data = await asyncio.to_thread(read_model_file, Path(path))
        return (await self._call("model.set_seed", {}, data))[0]

    async def get_active_model(self) -> dict[str, Any]:
        return dict((await self._call("model.show", {"id": "active"}))[0]["model"])

    async def get_model(self, id: str) -> dict[str, Any]:
        return dict((await self._call("model.show", {"id": id}))[0]["model"])

    async def get_models(self, session_id: str | None = None, n_max: int | None = None) -> dict[str, Any]:
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
    ) -> dict[str, Any]:
        if server_functions is not None or requested_clients is not None:
            raise ConfigError("server_functions", "server functions and client sampling are not in this release yet (issue 15)")
        config = {
            "name": name, "aggregator": aggregator, "aggregator_kwargs": aggregator_kwargs or {}, "round_timeout": round_timeout,
            "rounds": rounds, "validate": validate, "min_clients": min_clients, "settings": settings or {}, "model": model_id,
        }
        return dict((await self._call("session.start", config))[0]["session"])

    async def continue_session(self, session_id: str, rounds: int = 5, round_timeout: float = 180) -> dict[str, Any]:
        return dict((await self._call("session.continue", {"id": session_id, "rounds": rounds, "round_timeout": round_timeout}))[0]["session"])

    async def get_session(self, id: str) -> dict[str, Any]:
        return dict((await self._call("session.show", {"id": id}))[0]["session"])

    async def get_sessions(self) -> dict[str, Any]:
        return _listing((await self._call("session.ls"))[0]["sessions"])

    async def get_session_status(self, id: str) -> str:
        return str((await self.get_session(id))["status"])

    async def session_is_finished(self, id: str) -> bool:
        return await self.get_session_status(id) in FINISHED

    async def wait_for_session(self, id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the session is over (or ``timeout`` seconds pass: TimeoutError); returns it."""
        waiting = self._call("session.wait", {"id": id})
        return dict((await asyncio.wait_for(waiting, timeout))[0]["session"])

    async def stop_session(self, id: str) -> dict[str, Any]:
        return dict((await self._call("session.stop", {"id": id}))[0]["session"])

    async def get_rounds(self, session_id: str) -> dict[str, Any]:
        return _listing(list((await self.get_session(session_id))["rounds"]))

    async def get_validations(self, session_id: str | None = None) -> dict[str, Any]:
        """Each round's mean validation metrics, as {"session_id", "round_index", "model_id", **metrics}."""
        sessions = [session_id] if session_id else [s["id"] for s in (await self.get_sessions())["result"]]
        out = []
        for sid in sessions:
            for r in (await self.get_rounds(sid))["result"]:
                if r.get("validation"):
                    out.append({"session_id": sid, "round_index": r["idx"], "model_id": r.get("model_id"), **r["validation"]})
        return _listing(out)


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

    def __exit__(self, *exc: object) -> None:
        self.close()



def _blocking(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """Scaleout's form of one AsyncScaleout method: the same name, arguments and docstring."""

    @functools.wraps(method)
    def call(self: Scaleout, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._async, name)(*args, **kwargs))

    return call


for _name, _method in list(vars(AsyncScaleout).items()):
    if not _name.startswith("_") and _name != "close" and asyncio.iscoroutinefunction(_method):
        setattr(Scaleout, _name, _blocking(_name, _method))


APIClient = Scaleout  # FEDn's name for it
