"""What a client does besides training: custom commands, predictions, attributes and
telemetry, and switching to a newly activated compute package.

Commands and predictions run in their own lane, one at a time, beside the training lane,
so a long round does not hold them up (a package's callbacks may therefore run on two
threads at once). Each gets the timeout the job set. Python cannot stop a thread: a
callback still running at its timeout is reported as ``timeout`` and left to finish on
its own (its result is dropped); while MAX_STUCK such callbacks are still running, new
commands are refused as ``busy`` rather than piling up threads.

A new package (PackageChanged from the combiner, or a different active package named when
the client reconnects) is fetched, checked against its sha256, unpacked and started before
the next task: running callbacks finish first and new ones wait (the Gate). A package that
fails to load is reported (``client.status``: ``client ls`` / ``client show`` and the
controller's log) and the client refuses every task and command until a loadable package
is activated. A local package (``-p DIR``) is never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from scaleout.core import commands as cmd
from scaleout.core import messages as m
from scaleout.core.errors import CommandFailed, PackageError, ScaleoutError
from scaleout.core.limits import clip_text
from scaleout.package.project import describe_failure, user_location
from scaleout.roles.common import CallbackExit, LoopFeed, in_daemon_thread

if TYPE_CHECKING:
    from scaleout.edge import EdgeClient
    from scaleout.transport.link import Incoming, Link

log = logging.getLogger("scaleout.client")
MAX_STUCK = 2  # callbacks past their timeout still running before new commands are refused
LOCAL = "local"  # the package id a client running a local package reports


class Gate:
    """Callbacks run under ``use()`` (several at once); a package switch runs under
    ``exclusive()``, which waits for the running ones and holds new ones back."""

    def __init__(self) -> None:
        self._users = 0
        self._switching = False
        self._cond = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._switching)
            self._users += 1
        try:
            yield
        finally:
            async with self._cond:
                self._users -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._switching)
            self._switching = True
            await self._cond.wait_for(lambda: self._users == 0)
        try:
            yield
        finally:
            async with self._cond:
                self._switching = False
                self._cond.notify_all()


class Client(Protocol):
    """What the client's work needs of the client that owns it (roles/client.py)."""

    name: str
    settings: Any  # roles.client.ClientSettings
    edge: EdgeClient
    link: Link | None
    feeds: list[Any]  # LoopFeed: what the package logs, on its way to the link
    package_root: Path
    package_label: str
    package_id: str | None

    def startup_call(self, root: Path, edge: Any) -> Callable[[], None]: ...

    async def fetch_package(self) -> tuple[Path, str, str]: ...

    async def _send(self, msg: m.Message) -> None: ...


class ClientWork:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.gate = Gate()
        self.commands: asyncio.Queue[Incoming] = asyncio.Queue()
        self.stuck: set[asyncio.Future[Any]] = set()
        self.wanted: str | None = None  # the package id to switch to before the next task
        self.package_error: str | None = None  # why the current package could not load
        self._wake = asyncio.Event()
        self._switching = asyncio.Lock()

    # -- wiring ----------------------------------------------------------------------------

    def install(self, edge: EdgeClient) -> None:
        """Send what the package logs with log_attributes / log_telemetry up the current link."""
        feed: LoopFeed[m.ClientLog] = LoopFeed(asyncio.get_running_loop(), lambda msg: asyncio.ensure_future(self.client._send(msg)))
        self.client.feeds.append(feed)

        def sink(kind: str, data: dict[str, Any]) -> bool:
            if feed.stopping() or self.client.link is None:
                return False
            return feed.put(m.ClientLog(kind=kind, data=data))

        edge._log_sink = sink

    async def run(self) -> None:
        """The command lane and the package switcher, until cancelled."""
        switcher = asyncio.ensure_future(self._switcher())
        try:
            while True:
                inc = await self.commands.get()
                await self._run_command(inc)
        finally:
            switcher.cancel()

    async def connected(self, link: Link) -> None:
        """Tell a new combiner link which package this client runs and what it logged about itself."""
        with contextlib.suppress(ScaleoutError):  # the session loop notices a dead link
            await link.send(m.ClientStatus(package=self.client.package_id, error=self.package_error))
            attributes = self.client.edge._attributes
            if attributes:
                await link.send(m.ClientLog(kind="attributes", data=dict(attributes)))

    def on_message(self, inc: Incoming) -> None:
        msg = inc.msg
        if isinstance(msg, m.CommandTask):
            self.commands.put_nowait(inc)
        elif isinstance(msg, m.PackageChanged):
            self.active_package(msg.package_id)

    def active_package(self, package_id: str | None) -> None:
        """The controller's active package is ``package_id``: switch to it before the next task."""
        if not package_id or self.client.settings.package is not None:
            return  # none yet, or a local package: never replaced
        if package_id == self.client.package_id and self.package_error is None:
            self.wanted = None
            return
        if package_id != self.wanted:
            log.info("compute package %s is now active: switching to it before the next task", package_id[:12])
        self.wanted = package_id
        self._wake.set()

    # -- package switch --------------------------------------------------------------------

    async def before_task(self) -> None:
        """Switch package first if a new one is wanted; raise PackageError while the
        client has no loadable package (it takes no work then)."""
        if self.wanted is not None:
            await self.switch()
        if self.package_error is not None:
            raise PackageError(f"this client's compute package {(self.client.package_id or '?')[:12]} failed to load ({self.package_error}); it takes no work until a loadable package is activated")

    async def _switcher(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.wanted is not None:
                try:
                    await self.switch()
                except (ScaleoutError, OSError) as exc:  # fetching failed: the next task or reconnect tries again
                    log.warning("could not fetch the new compute package: %s", exc)

    async def switch(self) -> None:
        """Fetch, check and unpack the wanted package, then restart the package runtime on it
        (once the running callbacks returned)."""
        from scaleout.edge import EdgeClient

        async with self._switching:
            wanted = self.wanted
            if wanted is None:
                return
            client = self.client
            root, package_id, name = await client.fetch_package()
            async with self.gate.exclusive():
                old_root, old = client.package_root, client.edge
                edge = EdgeClient(name=client.name)
                edge._metric_sink, edge._log_sink = old._metric_sink, old._log_sink
                _move(old_root, root)
                client.package_id = package_id
                try:
                    await in_daemon_thread(client.startup_call(root, edge))
                    self.package_error = None
                    client.edge = edge
                    client.package_root = root
                    client.package_label = f"{name} ({package_id[:12]})"  # what the next client.assign shows watchers
                    log.info("now running compute package %s (%s); startup() registered: %s", name, package_id[:12], ", ".join(edge.registered()) or "no callbacks")
                except PackageError as exc:
                    self.package_error = clip_text(str(exc))
                    log.error("the new compute package %s (%s) cannot be loaded: %s; this client takes no work until a loadable package is activated", name, package_id[:12], exc)
                finally:
                    if self.wanted == wanted:
                        self.wanted = None
            link = client.link
            if link is not None:
                with contextlib.suppress(ScaleoutError):
                    await link.send(m.ClientStatus(package=client.package_id, error=self.package_error))

    # -- commands and predictions ----------------------------------------------------------

    async def _run_command(self, inc: Incoming) -> None:
        task = inc.msg
        assert isinstance(task, m.CommandTask)
        loop = asyncio.get_running_loop()
        started = loop.time()
        what = "predict" if task.kind == "predict" else f"command {cmd.command_key(task.name)!r}"
        result = m.CommandResult(job_id=task.job_id, ok=False)
        try:
            blob = inc.take_blob()
            if self.package_error is not None:
                raise CommandFailed(cmd.NO_PACKAGE, f"its compute package failed to load: {self.package_error}")
            if task.kind == "predict" and blob is None:
                raise CommandFailed(cmd.FAILED, inc.blob_error or "no model came with the prediction")
            if task.kind not in cmd.KINDS:
                raise CommandFailed(cmd.FAILED, f"unknown job kind {task.kind!r:.40}")
            if len(self.stuck) >= MAX_STUCK:
                raise CommandFailed(cmd.BUSY, f"{len(self.stuck)} earlier callbacks are still running past their timeout; try again once they return")
            log.info("%s %s: running the %s callback", task.kind, task.job_id, what)
            async with self.gate.use():
                edge = self.client.edge
                fn, args = (edge.run_predict, (blob, task.params)) if task.kind == "predict" else (edge.run_custom, (task.name, task.params))
                del blob
                future = asyncio.ensure_future(in_daemon_thread(fn, *args))
                del args
                done, _ = await asyncio.wait({future}, timeout=task.timeout)
                if not done:
                    self.stuck.add(future)
                    future.add_done_callback(self._returned)
                    raise CommandFailed(cmd.TIMEOUT, f"the {what} callback did not return within {task.timeout:g} s (left running; its result will be dropped)")
                result.data = future.result()
            result.ok = True
            log.info("%s %s: done in %.2fs", task.kind, task.job_id, loop.time() - started)
        except asyncio.CancelledError:
            raise
        except CommandFailed as exc:
            result.error, result.code = clip_text(str(exc)), exc.reason
        except CallbackExit as wrapped:  # sys.exit() or KeyboardInterrupt in the callback
            original = wrapped.original
            where = user_location(original, self.client.package_root)
            how = f"called sys.exit({original.code!r})" if isinstance(original, SystemExit) else f"raised {type(original).__name__}"
            result.error, result.code = f"the {what} callback {how}" + (f" ({where})" if where else ""), cmd.RAISED
        except ScaleoutError as exc:
            result.error, result.code = clip_text(str(exc)), cmd.FAILED
        except Exception as exc:  # the role edge: a failing callback is reported, never fatal
            result.error, result.code = clip_text(f"{what} failed: {describe_failure(exc, self.client.package_root)}"), cmd.RAISED
        if not result.ok:
            log.error("%s %s: %s", task.kind, task.job_id, result.error)
        result.duration_s = round(loop.time() - started, 4)
        await self.client._send(result)

    def _returned(self, future: asyncio.Future[Any]) -> None:
        """A callback that outlived its timeout returned at last: its result is dropped."""
        self.stuck.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.info("a callback that timed out ended later with: %s", type(future.exception()).__name__)
        else:
            log.info("a callback that timed out returned later; its result was dropped")


def _move(old_root: Path, root: Path) -> None:
    """Make ``root`` the package's folder: first on sys.path, the working directory; the old
    package's modules are forgotten so the new one imports its own."""
    old = str(old_root)
    while old in sys.path:
        sys.path.remove(old)
    for key, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(old_root.resolve()):
            del sys.modules[key]
    os.chdir(root)
    sys.path.insert(0, str(root))
