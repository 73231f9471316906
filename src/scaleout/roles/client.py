"""The client: runs the user's compute package next to the data; only weights leave.

It dials out only: to the controller (to be assigned a combiner and fetch the package),
then to its combiner, where it serves train and validate tasks one at a time.

The package's code runs on daemon threads: on SIGINT/SIGTERM the running callback is
aborted (``check_task_abort()`` raises) and given ABORT_GRACE_S to return, then the
client exits whether or not it did.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaleout.core import messages as m
from scaleout.core.errors import AuthError, ConfigError, NotFoundError, PackageError, ProtocolError, RemoteError, ScaleoutError, Superseded, TaskAborted
from scaleout.core.limits import clip_text
from scaleout.core.units import fmt_bytes
from scaleout.package.limits import UnpackLimits
from scaleout.package.project import describe_failure, user_location
from scaleout.roles.common import CallbackExit, LoopFeed, in_daemon_thread, new_id, private_tempdir, unless_stopped
from scaleout.security import tls
from scaleout.transport.link import DEFAULT_MAX_PAYLOAD, Hashed, Incoming, Link, Pieces
from scaleout.transport.dialer import Controllers
from scaleout.transport.net import RECONNECT_SPREAD_S, TrustError, backoff, connect

log = logging.getLogger("scaleout.client")
ABORT_GRACE_S = 2.0
ANSWERED_RETRY_S = 3.0  # the longest wait before asking a controller that answered again
SHUTTING_DOWN = "the client is shutting down"
KEEP_PACKAGES = 3


@dataclass
class ClientSettings:
    controller: str
    token: str
    ca: Path | None = None
    name: str = ""
    package: Path | None = None  # a local compute package; None: download the active one
    data_dir: Path | None = None
    insecure: bool = False
    max_payload: int = DEFAULT_MAX_PAYLOAD
    dispatcher: bool = False  # run the entry points as commands (join --dispatcher)
    managed_env: bool = False  # run the package in a venv made from its python_env.yaml
    command_timeout: float | None = None  # a dispatcher command's time limit (default: 1 h)
    env_cache: Path | None = None  # where managed venvs are kept (default: ~/.cache/scaleout/envs)
    state_dir: Path | None = None  # where its identity is kept (default: the work dir, else ~/.local/state/scaleout)
    package_limits: UnpackLimits = field(default_factory=UnpackLimits)
    keep_packages: int = KEEP_PACKAGES  # unpacked packages kept in the work dir (the newest ones)


class Client:
    def __init__(self, settings: ClientSettings) -> None:
        from scaleout.edge import EdgeClient

        from scaleout.roles.joining import choose_name, controller_key
        from scaleout.security.identity import default_state_dir

        self.settings = settings
        self.state_dir = settings.state_dir or settings.data_dir or default_state_dir()
        self.name = choose_name("client", settings.name, settings.token, self.state_dir, controller_key(settings.controller, settings.ca)) or f"{socket.gethostname()}-{new_id()[:6]}"
        self.enrolled: Any = None  # its identity (roles/joining.py), once enrolled
        os.environ["SCALEOUT_CLIENT_NAME"] = self.name
        self.edge = EdgeClient(name=self.name)
        self.ctx = None if settings.insecure else tls.client_context(settings.ca)
        self.tasks: asyncio.Queue[Incoming] = asyncio.Queue()
        self.link: Link | None = None
        self.current_task: str | None = None
        self.held: m.TaskResult | None = None  # a result we could not send yet
        # The update the combiner will pull: (task id, bytes and their sha256, the result that announced it).
        self.update: tuple[str, Hashed, m.TaskResult] | None = None
        self.combiner: str | None = None  # where we were: reconnect there if it is still up
        self.served = False  # the current combiner link got as far as Hello
        self._callback: asyncio.Task[Any] | None = None  # the package callback running now
        self.feeds: list[LoopFeed[Any]] = []  # what the package logs, on its way to the link
        self._stopped_at: float | None = None  # loop time of the stop signal
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.cache: Path | None = None  # where unpacked packages are kept (bounded: prune_packages)
        self.package_dir: Path | None = None  # the one in use
        self.package_root = Path.cwd()  # where the package's files are: set by prepare()
        self.package_label = ""  # which package it runs, as the controller shows it
        self.package_id: str | None = None  # sha256 of the package archive, or "local"
        from scaleout.roles.client_work import ClientWork

        self.work = ClientWork(self)  # commands, predictions, attributes, telemetry, package switches
        self.controllers = Controllers(settings.controller)  # --controller's addresses, the active one first

    async def _ask(self, op: str, args: dict[str, Any] | None = None, timeout: float = 30) -> tuple[dict[str, Any], bytes | None]:
        """One request to the active controller (of --controller's addresses: transport/dialer.py)."""
        s = self.settings
        return await self.controllers.ask(self.enrolled.token if self.enrolled else s.token, self.ctx, op, args, max_payload=s.max_payload, timeout=timeout)

    async def _enrol(self, stop: asyncio.Event) -> None:
        """Take this client's identity from its state dir, or enrol with the join token."""
        from scaleout.roles.joining import controller_key, enrolled, remember_unnamed

        s = self.settings
        self.enrolled = await enrolled("client", self.name, s.controller, s.token, s.ca, self.ctx, self.state_dir)
        from scaleout.roles.joining import learned_controllers

        if kept := self.controllers.add(await asyncio.to_thread(learned_controllers, self.enrolled)):
            log.info("also dialling the controller(s) learned before: %s", ", ".join(kept))
        if not s.name:
            remember_unnamed("client", self.name, self.state_dir, controller_key(s.controller, s.ca))

    async def prepare(self, stop: asyncio.Event | None = None) -> None:
        """Get the compute package (local or the controller's active one) and run startup()."""
        from scaleout.roles.client_work import LOCAL

        s = self.settings
        if s.package is not None:
            root = s.package.resolve()
            self.package_id = LOCAL
            log.info("using the local compute package in %s", root)
            self.package_label = f"local {root.name}"
        else:
            root, self.package_id, name = await self.fetch_package()
            self.package_label = f"{name} ({self.package_id[:12]})"
        # The package's own modules and data files are found relative to its folder.
        os.chdir(root)
        sys.path.insert(0, str(root))
        self.package_root = root
        try:
            await in_daemon_thread(self.startup_call(root, self.edge))
        except PackageError as exc:
            if exc.__cause__ is not None:
                _log_traceback("the compute package failed to start", exc.__cause__)
            raise
        from scaleout.package.interpreter import export_shims

        export_shims()  # processes the package's code starts can import FEDn's helpers too
        callbacks = self.edge.registered()
        log.info("startup() registered: %s", ", ".join(callbacks) or "no callbacks")
        if "train" not in callbacks:
            log.warning("no train callback: this client will refuse training tasks (call client.set_train_callback in startup)")

    def startup_call(self, root: Path, edge: Any) -> Callable[[], None]:
        """How this client starts a package's runtime on ``edge`` (its start and every package
        switch share it): ``startup(client)`` of the package at ``root``."""

        from scaleout.package.loader import load_startup

        edge.package_path = str(root)
        s = self.settings
        return functools.partial(
            load_startup, root, edge, dispatcher=s.dispatcher, managed_env=s.managed_env,
            command_timeout=s.command_timeout, env_cache=s.env_cache,
        )

    async def fetch_package(self) -> tuple[Path, str, str]:
        """Download the controller's active package, check its sha256 and unpack it (once per
        package): (its folder, its id, its name)."""
        from scaleout.package.archive import extract_archive

        s = self.settings
        info, data = await self._ask("package.get", timeout=600)
        if data is None or (digest := await asyncio.to_thread(_sha256, data)) != info.get("id"):
            raise PackageError("the downloaded compute package does not match its sha256; refusing to run it")
        _verify_signature(info, digest, s.data_dir)
        base = s.data_dir or Path(self._tempdir())
        self.cache = base / "package"
        self.cache.mkdir(parents=True, exist_ok=True, mode=0o700)  # the package's code: this user's alone
        dest = self.cache / digest[:16]
        if dest.exists() and (dest / ".complete").exists():
            root = Path((dest / ".complete").read_text().strip())
            os.utime(dest / ".complete")  # the newest used: the cache keeps it
        else:
            import shutil

            shutil.rmtree(dest, ignore_errors=True)
            root = await asyncio.to_thread(extract_archive, data, dest, limits=s.package_limits)
            (dest / ".complete").write_text(str(root))
        self.package_dir = dest
        await asyncio.to_thread(prune_packages, self.cache, s.keep_packages, dest)
        log.info("compute package %s (%s) unpacked in %s (signature verified)", info.get("name"), digest[:12], root)
        return root, str(info["id"]), str(info.get("name"))

    def _tempdir(self) -> str:
        if self._tmp is None:
            self._tmp = private_tempdir("scaleout-client-")  # swept at a next start if this one is killed
        return self._tmp.name

    async def run(self, stop: asyncio.Event) -> None:
        self.work.install(self.edge)
        closer = asyncio.ensure_future(self._close_feeds(stop))
        if not await self._retrying(self._enrol, stop) or not await self._retrying(self.prepare, stop):
            return
        worker = asyncio.create_task(self._work())
        commands = asyncio.create_task(self.work.run())
        try:
            while not stop.is_set():
                await self._retrying(self._session, stop)
            await self._abort_callback()
        finally:
            closer.cancel()
            worker.cancel()
            commands.cancel()
            self.edge._stop_task(SHUTTING_DOWN)
            if self._tmp is not None:
                self._tmp.cleanup()
            elif self.cache is not None:  # a work dir: keep what the next start may reuse, no more
                prune_packages(self.cache, self.settings.keep_packages, self.package_dir)

    async def _close_feeds(self, stop: asyncio.Event) -> None:
        """Once stopping, the running callback is told at once (its grace runs while the
        links close) and what the package logs is dropped: a package logging in a tight loop
        must not keep the loop busy while it drains."""
        await stop.wait()
        self._stopped_at = asyncio.get_running_loop().time()
        self.edge._stop_task(SHUTTING_DOWN)
        for feed in self.feeds:
            feed.close()

    async def _abort_callback(self) -> None:
        """Abort the running callback and give it ABORT_GRACE_S (from the signal) to notice;
        never wait longer."""
        self.edge._stop_task(SHUTTING_DOWN)
        callback = self._callback
        if callback is None:
            return
        loop = asyncio.get_running_loop()
        left = ABORT_GRACE_S - (loop.time() - self._stopped_at) if self._stopped_at is not None else ABORT_GRACE_S
        done, _ = await asyncio.wait({callback}, timeout=max(left, 0.1))
        if not done:
            log.warning(
                "the running callback did not return within %.0fs of the abort (it should call client.check_task_abort()); "
                "exiting without it", ABORT_GRACE_S,
            )

    async def _retrying(self, step: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event) -> bool:
        """Run ``step`` until it succeeds or we are stopped; passing troubles are retried
        with backoff, while a refused token, an untrusted certificate or a broken package
        end the client with their message."""
        delays = backoff()
        told = ""  # the same trouble again (every retry) is said once, then only at debug level
        while not stop.is_set():
            answered = False
            try:
                # A step stalled on a peer (package.get, client.assign) must not delay exit.
                return await unless_stopped(step(stop), stop)
            except (AuthError, TrustError, PackageError, Superseded, ConfigError):
                raise
            except RemoteError as exc:
                if exc.code == AuthError.code:
                    raise
                told = _say_once(exc, told)
                answered = True
            except (ConnectionError, ScaleoutError) as exc:
                told = _say_once(exc, told)
            if self.served:
                # The link had been working: this is a fresh trouble, not the next failure
                # of the same one, so start again from short waits (a blip is short), the
                # first spread out: the combiner's other clients lost it at the same moment.
                self.served = False
                delays = backoff(spread=RECONNECT_SPREAD_S)
            delay = next(delays)
            if answered:
                # The controller is up and answered (no combiner for us yet, say while one
                # restarts): ask again soon, so the client is back shortly after the combiner.
                delay = min(delay, ANSWERED_RETRY_S)
            log.info("retrying in %.1fs", delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        return False

    async def _session(self, stop: asyncio.Event) -> None:
        """One stay with a combiner: assign, connect, serve tasks until either side stops."""
        info, _ = await self._ask("client.assign", {"name": self.name, "prefer": self.combiner, "package": self.package_label})
        s = self.settings
        self.enrolled.renew(info.get("token"))
        await self._learn_controllers(info.get("controllers"))
        ticket = info.get("ticket")
        if not isinstance(ticket, str):  # never its own credential: the combiner could act as this client with it
            raise ProtocolError("the controller gave no ticket for the combiner (it is older than this client): upgrade the controller")
        link = await connect(str(info["url"]), ticket, self.ctx, max_payload=s.max_payload, peer_role="combiner")
        working_on = self.held.task_id if self.held else self.current_task or (self.update[0] if self.update else None)
        await link.send(m.Hello(name=self.name, task_id=working_on))
        self.link = link
        self.served = True
        await self.work.connected(link)
        self.work.active_package(info.get("package") if isinstance(info.get("package"), str) else None)
        self.combiner = str(info["combiner"])
        log.info("connected to combiner %s at %s as %s", info["combiner"], info["url"], self.name)
        run = asyncio.create_task(link.run(on_message=self._on_message, on_request=self._on_request))
        if self.held is not None:
            held, self.held = self.held, None
            log.info("sending the result of task %s kept while disconnected", held.task_id)
            await self._send(held)
        elif self.update is not None:  # announced, maybe not pulled before the link dropped
            await self._send(self.update[2])
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({run, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            self.link = None
            await link.ws.close()
            run.cancel()
        # The running task goes on: if we are back soon, the combiner still wants its result.
        # Tasks not started yet are sent again on reconnect if they are still wanted.
        while not self.tasks.empty():
            self.tasks.get_nowait()
        if not stop.is_set():
            reason = link.ws.close_reason or "connection closed"
            if link.ws.close_code == m.CLOSE_SUPERSEDED:
                raise Superseded(f"{reason}: this client stops (give each client its own --name)")
            if link.ws.close_code == m.CLOSE_REVOKED:
                raise AuthError(f"the combiner closed this client's link: {link.ws.close_reason or 'credential revoked'}")
            raise ConnectionError(f"lost the combiner at {info['url']}: {reason}")

    async def _learn_controllers(self, urls: object) -> None:
        """Dial the controllers the active one told of too (a standby started after this client
        enrolled): asked when the combiner goes, after those given with --controller."""
        from scaleout.roles.joining import learn

        await learn(self.controllers, urls, self.enrolled, log)

    async def _on_request(self, req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], Hashed]:
        """The combiner pulls the update we announced, when it has room to fold it."""
        if req.op != "update.get":
            raise ProtocolError(f"unknown operation {req.op!r}")
        task_id = req.args.get("task_id")
        if self.update is None or self.update[0] != task_id:
            raise NotFoundError("update", str(task_id), "this client holds no update for that task")
        log.info("sending the update of task %s (%s)", task_id, fmt_bytes(len(self.update[1].data)))
        return {}, self.update[1]

    async def _on_message(self, inc: Incoming) -> None:
        msg = inc.msg
        if isinstance(msg, m.Task):
            await self.tasks.put(inc)
        elif isinstance(msg, (m.CommandTask, m.PackageChanged)):
            self.work.on_message(inc)
        elif isinstance(msg, m.ControllersChanged):
            # Passed on by the combiner: with TLS a learned address must show a controller's
            # certificate of this CA before this client's credential is sent (dialer.py), so a
            # combiner cannot point it at itself; without TLS nothing would check that.
            if self.ctx is not None:
                await self._learn_controllers(msg.urls)
        elif isinstance(msg, m.TaskAbort):
            if msg.reason:
                log.info("aborting the current task: %s", msg.reason)
            elif msg.task_id is None:
                log.info("session %s stopped: aborting the current task", msg.session_id)
            else:
                log.info("the combiner no longer waits for task %s: aborting it", msg.task_id)
            if msg.task_id is None or msg.task_id == self.current_task:
                self.edge._stop_task(msg.reason or ("the session was stopped" if msg.task_id is None else "the combiner no longer waits for this task"))
            if self.update is not None and (msg.task_id is None or msg.task_id == self.update[0]):
                self.update = None  # nobody will pull it
            kept = []
            while not self.tasks.empty():
                queued = self.tasks.get_nowait()
                if msg.task_id is not None and getattr(queued.msg, "task_id", None) != msg.task_id:
                    kept.append(queued)
            for queued in kept:
                self.tasks.put_nowait(queued)

    async def _work(self) -> None:
        """Run tasks one at a time in a worker thread so the link stays responsive."""
        loop = asyncio.get_running_loop()

        feed: LoopFeed[m.Metric] = LoopFeed(loop, lambda metric: asyncio.ensure_future(self._send(metric)))
        self.feeds.append(feed)

        def sink(metrics: dict[str, Any], step: int | None) -> bool:
            task_id = self.current_task
            if feed.stopping() or task_id is None or self.link is None:
                return False  # outside a task, or offline: log_metric returns False
            return feed.put(m.Metric(task_id=task_id, metrics=metrics, step=step))

        self.edge._metric_sink = sink
        while True:
            inc = await self.tasks.get()
            task = inc.msg
            assert isinstance(task, m.Task)
            self.edge._abort.clear()
            self.current_task = task.task_id
            self.update = None  # a new task: the combiner no longer wants the last update
            result = m.TaskResult(task_id=task.task_id, ok=False)
            update: bytes | memoryview | None = None  # a memoryview: payload.encode_buffer's, sent as it is
            try:
                await self.work.before_task()  # a newly activated package first; none loadable: no work
                if inc.blob is None:
                    raise ScaleoutError(inc.blob_error or "task carried no model")
                started = loop.time()
                if task.kind == "train":
                    log.info("round %d: training on model %s", task.round_index, task.model_id[:12])
                    update, metadata = await self._call(self.edge.run_train, inc.blob, task.settings)
                    result.data = {"metadata": metadata}
                    log.info("round %d: trained in %.2fs; sending the update", task.round_index, loop.time() - started)
                elif task.kind == "validate":
                    log.info("round %d: validating the new global model %s", task.round_index, task.model_id[:12])
                    result.data = await self._call(self.edge.run_validate, inc.blob)
                    log.info("round %d: validation done in %.2fs", task.round_index, loop.time() - started)
                else:
                    raise ScaleoutError(f"unknown task kind {task.kind!r}")
                result.ok = True
            except asyncio.CancelledError:
                raise
            except CallbackExit as wrapped:  # sys.exit() (e.g. argparse in a reused training script) or KeyboardInterrupt
                exc = wrapped.original
                where = user_location(exc, self.package_root)
                what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"raised {type(exc).__name__}"
                result.error = f"the {task.kind} callback {what}" + (f" ({where})" if where else "")
                log.error("round %d: %s", task.round_index, result.error)
                _log_traceback(f"round {task.round_index}: {task.kind}", exc)
            except TaskAborted as exc:
                result.error = str(exc)
                log.info("round %d: %s stopped (%s)", task.round_index, task.kind, exc)
            except ScaleoutError as exc:  # the runtime refused what a callback returned
                result.error = clip_text(str(exc))
                log.error("round %d: %s failed: %s", task.round_index, task.kind, result.error)
            except Exception as exc:  # the role edge: a failing callback is reported, not fatal
                # One short line for the controller, naming the user's line (startup.py:42).
                result.error = clip_text(f"{task.kind} failed: {describe_failure(exc, self.package_root)}")
                log.error("round %d: %s", task.round_index, result.error)
                _log_traceback(f"round {task.round_index}: {task.kind}", exc)
            finally:
                self.edge._flush_metrics()  # held with commit=False: they belong to this task's round
                self.current_task = None
            if update is not None and result.ok:
                result.size = len(update)
                # Hashed now, while the combiner may still be busy: its pull then streams at once.
                digest = await asyncio.to_thread(_sha256, update)
                self.update = (task.task_id, Hashed(Pieces([update]), digest), result)
            await self._send(result)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a package callback on a daemon thread, kept where shutdown can wait for it."""
        async with self.work.gate.use():  # a package switch waits for it
            self._callback = asyncio.ensure_future(in_daemon_thread(fn, *args))
            try:
                return await self._callback
            finally:
                self._callback = None

    async def _send(self, msg: m.Message) -> None:
        link = self.link
        try:
            if link is None:
                raise ConnectionError("not connected")
            await link.send(msg)
        except Exception as exc:  # the role edge: the session loop reconnects
            if isinstance(msg, m.TaskResult):
                # Keep it for the combiner: it waits a while for a client whose link dropped.
                self.held = msg
                log.warning("could not send the result of task %s (%s): keeping it until we reconnect", msg.task_id, exc)
            else:
                log.debug("dropping %s: %s", msg.type, exc)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _verify_signature(info: dict[str, Any], digest: str, work_dir: Path | None) -> None:
    """Refuse a package the controller did not sign (security/packages.py); with a work
    dir, also one signed by another key than the first one this client saw."""
    from scaleout.security.packages import PIN_FILE, check_pin, verify_package

    signature, key = info.get("signature"), info.get("signing_key")
    if not isinstance(signature, str) or not isinstance(key, str):
        raise PackageError("the controller sent the compute package without its signature; refusing to run it")
    verify_package(key.encode(), digest, signature)
    if work_dir is not None:
        check_pin(work_dir / PIN_FILE, key.encode())


def prune_packages(cache: Path, keep: int, current: Path | None) -> None:
    """Keep the ``keep`` most recently used unpacked packages in ``cache`` (always the one in
    use); remove the rest, and anything half unpacked, so the cache never grows without bound."""
    import shutil

    try:
        entries = [p for p in cache.iterdir() if p.is_dir()]
    except OSError:
        return
    complete = sorted((p for p in entries if (p / ".complete").exists()), key=lambda p: (p / ".complete").stat().st_mtime, reverse=True)
    kept = set(complete[: max(keep, 1)])
    if current is not None:
        kept.add(current)
    for path in entries:
        if path not in kept:
            log.info("removing the unpacked package %s from the cache", path.name)
            shutil.rmtree(path, ignore_errors=True)


def _log_traceback(what: str, exc: BaseException) -> None:
    """The whole traceback of package code, at debug level (the error line names its place)."""
    if log.isEnabledFor(logging.DEBUG):
        import traceback

        # Each line cut to the error-text limit: a package may raise with a huge message.
        lines = "".join(traceback.format_exception(exc)).splitlines()
        log.debug("%s: traceback of the package code\n%s", what, "\n".join(clip_text(line) for line in lines))
    else:
        log.info("%s: run with --log-level debug to see the whole traceback", what)


def _say_once(exc: BaseException, told: str) -> str:
    """Log ``exc`` as a warning unless it is what was said last (a retry meets the same trouble)."""
    text = str(exc)
    log.log(logging.DEBUG if text == told else logging.WARNING, "%s", text)
    return text
