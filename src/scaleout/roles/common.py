"""What every role shell shares: the ready line, signal handling, stopping, ids."""

from __future__ import annotations

import asyncio
import os
import collections
import contextlib
import contextvars
import logging
import secrets
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger("scaleout")
T = TypeVar("T")
STOP_GRACE_S = 2.0
FEED_WAIT_S = 5.0  # longest a package thread waits for room in a full LoopFeed before the item is dropped


def announce(url: str, dial: Sequence[str] = ()) -> None:
    """Print the one line that tells users and tests where a role listens; for a wildcard
    bind (0.0.0.0, ::: not an address to dial) a second line with the ones that are."""
    print(f"listening on {url}", flush=True)
    log.info("listening on %s", url)
    if dial:
        print(f"dial it at {', '.join(dial)}", flush=True)


def dial_urls(scheme: str, host: str, port: int) -> list[str]:
    """The URLs others can dial a role listening on ``host``:``port`` at: [] unless ``host``
    is a wildcard, then loopback and this machine's interface addresses of that family."""
    import ipaddress

    from scaleout.security.tls import WILDCARD_HOSTS
    from scaleout.transport.interfaces import local_addresses

    if host not in WILDCARD_HOSTS:
        return []
    versions = {"0.0.0.0": {4}, "::": {6}}.get(host, {4, 6})
    found = [a for a in local_addresses() if ipaddress.ip_address(a).version in versions]
    hosts = dict.fromkeys(f"[{a}]" if ":" in a else a for a in ["127.0.0.1" if 4 in versions else "::1", *found])
    return [f"{scheme}://{h}:{port}" for h in hosts]


def raise_file_limit() -> None:
    """Raise the soft limit on open files to the hard one: a controller or combiner holds a
    socket per link, and the usual soft limit of 1,024 is soon reached by a large fleet (or
    by idle connections someone opens to run it out of them)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.debug("open files limit raised from %d to %d", soft, target)
    except (ValueError, OSError) as exc:
        log.debug("cannot raise the open files limit: %s", exc)


MMAP_THRESHOLD = 8 << 20  # bytes: model-sized buffers (the 1 MiB frames stay in the heaps, reused: mapping each cost 20% of a 1M-param round)


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Have glibc map every allocation of ``size`` bytes or more on its own and unmap it when
    freed. By default glibc raises that threshold (up to 32 MiB) each time such a block is
    freed, so model-sized buffers (a received update, a partial) and 1 MiB frames then come
    from the heaps of the (worker) threads that made them, which keep them: a combiner's peak
    RSS grew with the number of clients a model went out to and came back from (5M params,
    `scaleout simulate`: 40 clients 280 MB; with this 194-196 MB). Setting it fixes it (glibc
    no longer raises it). At 8 MiB, not 1 MiB: mapping and unmapping every 1 MiB frame made a
    10 x 1M-param round 20% slower (collect 0.30 -> 0.48 s, benchmarks/round.py --scenario b),
    and the frames' memory is reused from the heaps, not grown. True if set."""
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        return False
    return bool(mallopt(-3, size))  # M_MMAP_THRESHOLD


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_hex(6)


def install_stop_signals(stop: asyncio.Event, on_first: Callable[[signal.Signals], None] | None = None) -> list[signal.Signals]:
    """SIGINT/SIGTERM set ``stop`` so the role drains; a second signal exits at once
    (with 128 + its number). ``on_first`` is called in the signal handler itself (not on
    the loop, which may be busy) at the first signal. Returns the list the signals
    received are appended to."""
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []
    first: list[bool] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            sys.exit(128 + sig)
        log.info("%s received: shutting down", sig.name)
        stop.set()

    def python_handler(signum: int, frame: Any) -> None:
        # Runs in the main thread between two bytecodes, even when the loop's wakeup socket
        # was full and asyncio lost the signal's byte (a package's thread calling the loop
        # thousands of times a second fills it): so the signal is never missed.
        if on_first is not None and not first:
            first.append(True)
            on_first(signal.Signals(signum))
        loop.call_soon_threadsafe(on_signal, signal.Signals(signum))

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # asyncio's handler only points the signal's wakeup byte at the loop (so a loop
            # asleep in select() wakes up); the Python-level handler does the work, once.
            loop.add_signal_handler(sig, _woken)
            signal.signal(sig, python_handler)
    return received


def _woken() -> None:
    """The loop was woken by a signal: python_handler in install_stop_signals handles it."""


class LoopFeed(Generic[T]):
    """Items from worker threads (a package's log_metric calls) handed to ``deliver`` on the
    loop in batches: the loop is woken once per batch, not once per item, so a package
    logging in a tight loop cannot fill the loop's wakeup socket (where signals arrive too).
    At most ``limit`` items wait; past that, or once closed (the role is stopping: the loop
    has better things to do), ``put`` drops the item and returns False. After close, a thread
    that puts again (it ignored the False and the abort: a package logging in a loop that never
    checks) is parked for good, so it no longer takes the GIL from the shutdown; the process
    exits without it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[T], object], limit: int = 1000) -> None:
        self._loop = loop
        self._deliver = deliver
        self._limit = limit
        self._items: collections.deque[T] = collections.deque()
        self._scheduled = False
        self._closed = False
        self._told: set[int] = set()  # threads told once that the feed is closed
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a batch was taken, or the feed closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._items.clear()
            self._room.notify_all()

    def stopping(self) -> bool:
        """True once closed (the caller drops what it had to put); a thread asking a second
        time is parked instead."""
        with self._lock:
            if not self._closed:
                return False
            # Never the event loop's thread (a log record emitted there after close): parking
            # it would stop the very shutdown this makes room for.
            park = threading.get_ident() in self._told and threading.current_thread() is not threading.main_thread()
            self._told.add(threading.get_ident())
        if park:
            threading.Event().wait()  # never set: this thread waits for the process to exit
        return True

    def put(self, item: T) -> bool:
        if self.stopping():
            return False
        with self._lock:
            # Full: a worker thread waits for the loop to take a batch (a package logging faster
            # than its link carries is slowed, not silently cut), never the loop's own thread,
            # and never past close.
            if len(self._items) >= self._limit and threading.current_thread() is not threading.main_thread():
                self._room.wait_for(lambda: len(self._items) < self._limit or self._closed, timeout=FEED_WAIT_S)
            if self._closed or len(self._items) >= self._limit:
                return False
            self._items.append(item)
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the client has exited
            return False
        return True

    def _drain(self) -> None:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._scheduled = False
            self._room.notify_all()
        for item in items:
            self._deliver(item)


class CallbackExit(Exception):
    """User code raised SystemExit or KeyboardInterrupt on a worker thread; ``original`` is it."""

    def __init__(self, original: BaseException) -> None:
        self.original = original
        self.__traceback__ = original.__traceback__
        super().__init__(f"{type(original).__name__}({getattr(original, 'code', '')!r})" if isinstance(original, SystemExit) else type(original).__name__)


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on a daemon thread and await its result.

    Unlike ``asyncio.to_thread`` the thread does not hold up exit (``asyncio.run`` waits for
    its executor's threads), so user code that ignores an abort cannot delay shutdown.
    Cancelling the await abandons the thread; its result is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(error: BaseException | None, result: Any) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        error: BaseException | None = None
        result = None
        try:
            result = context.run(fn, *args)
        except (SystemExit, KeyboardInterrupt) as exc:
            # Raised into the awaiting task these would end the whole process (asyncio lets
            # them through): user code calling sys.exit() fails its call instead.
            error = CallbackExit(exc)
        except BaseException as exc:  # handed to the awaiting task, which raises it
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, error, result)

    threading.Thread(target=work, name=f"scaleout-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future


async def unless_stopped(step: Awaitable[None], stop: asyncio.Event, grace: float = STOP_GRACE_S) -> bool:
    """Await ``step`` unless ``stop`` is set first, which cancels it; True if it completed.

    A cancelled step gets ``grace`` seconds to unwind (close its connections); past that it
    is left to the loop's shutdown, so a stalled peer cannot delay exit.
    """
    task = asyncio.ensure_future(step)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        stopped = not task.done()
        if stopped:
            task.cancel()
            await asyncio.wait({task}, timeout=grace)
    if stopped:
        if task.done() and not task.cancelled():
            task.exception()  # whatever it raised on its way out is a consequence of stopping it
        return False
    task.result()
    return True


def close_server(server: Any) -> None:
    """``server.close()`` for a role that is stopping: each open link is closed (1001) and its
    peer gets STOP_GRACE_S, not websockets' 10 s, to answer before its connection is dropped.
    A link whose receive queue is full (a peer sending faster than the role handles it, such
    as a client logging metrics in a tight loop) is no longer read from, so its peer's answer,
    even its exit, would go unseen until that timeout, and the role would exit only then."""
    for connection in server.connections:
        connection.close_timeout = STOP_GRACE_S
    server.close()


def bracket(host: str) -> str:
    """An IPv6 literal in a URL goes in brackets."""
    return f"[{host}]" if ":" in host else host


def url_host(host: str) -> str:
    """The host part of a URL others can dial (a wildcard bind is dialled on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def cert_names(host: str, sans: Sequence[str]) -> list[str]:
    """What the certificate of a role listening on ``host`` must name: see `tls.server_names`."""
    import socket

    from scaleout.security.tls import WILDCARD_HOSTS, server_names
    from scaleout.transport.interfaces import local_addresses

    interfaces = local_addresses() if host in WILDCARD_HOSTS else []
    return server_names(host, sans, interfaces=interfaces, hostname=socket.gethostname())


def audit_actor(link: Any) -> str:
    """Who did it, for the audit log: the token's role and id, and its name if it has one."""
    claims = link.claims
    return f"{claims.role}:{claims.jti}" + (f" ({claims.sub})" if claims.sub else "")


async def close_now(link: Any, code: int, reason: str) -> None:
    """Close a link with a reason, and at once (2 s at most) even if the peer does not answer."""
    try:
        await asyncio.wait_for(link.ws.close(code, reason), 2)
    except asyncio.TimeoutError:
        link.ws.transport.abort()
    except Exception as exc:  # the role edge: the peer may already be gone
        log.debug("closing %s: %s", link.peer, exc)


OWNER_FILE = ".scaleout-owner"  # in a temporary folder of ours: the pid of the process using it


def private_tempdir(prefix: str) -> Any:
    """A private temporary folder for this process (a ``tempfile.TemporaryDirectory``, removed
    when it ends normally), marked with its pid. Folders of the same kind left by a process
    that was killed (SIGKILL: no cleanup ran; a combiner's key, a client's unpacked package)
    are swept first, and the log says so."""
    import os
    import tempfile
    from pathlib import Path

    sweep_tempdirs(prefix)
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    (Path(tmp.name) / OWNER_FILE).write_text(str(os.getpid()))
    return tmp


def sweep_tempdirs(prefix: str, root: Any = None) -> list[Any]:
    """Remove the folders ``prefix*`` in the temporary folder (or ``root``) that are ours and
    whose process is gone; returns them. A folder without the owner mark (or another user's)
    is left alone: whose it is cannot be told."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    base = Path(root or tempfile.gettempdir())
    swept = []
    for path in sorted(base.glob(f"{prefix}*")):
        try:
            if path.is_symlink() or not path.is_dir() or (hasattr(os, "getuid") and path.stat().st_uid != os.getuid()):
                continue
            pid = int((path / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        swept.append(path)
    if swept:
        log.info("removed %d temporary folder(s) left by a process that was killed before it cleaned up: %s", len(swept), ", ".join(map(str, swept)))
    return swept


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or it cannot be told: keep its folder
    return True


FAILPOINT_ENV = "SCALEOUT_FAILPOINT"  # NAME: hold at that point once, for the chaos suite (tests/chaos)
FAILPOINT_HOLD_S = 30.0


async def failpoint(name: str) -> None:
    """A fault-injection point (as etcd's gofail): with SCALEOUT_FAILPOINT=NAME in the
    environment, each time the role reaches it, it prints ``failpoint NAME`` on stdout and
    holds there (up to FAILPOINT_HOLD_S), so a test can kill it at that exact moment, e.g.
    between writing a model file and committing its row. Nothing otherwise."""
    if os.environ.get(FAILPOINT_ENV) != name:
        return
    print(f"failpoint {name}", flush=True)
    log.warning("holding at failpoint %s (%s is set): for tests only", name, FAILPOINT_ENV)
    await asyncio.sleep(FAILPOINT_HOLD_S)  # the hold is the point: a test kills the process meanwhile


QUIET_EVERY_S = 5.0  # one warning per kind of failed send in this long; the rest are counted
_quiet_state: dict[str, tuple[float, int]] = {}  # what -> (when last logged, failures not logged since)


async def quietly(coro: Awaitable[Any], what: str = "send", logger: logging.Logger = log) -> None:
    """Await a send whose failure the link's reader notices anyway: log it as a warning, at
    most once per ``QUIET_EVERY_S`` for each ``what`` (a client flooding metrics through a lost
    controller link made 650 identical lines in a second), then say how many were not shown."""
    try:
        await coro
    except TimeoutError:  # asyncio's, since 3.11 the builtin
        _say_quietly(logger, what, f"{what}: gave up, the peer does not read")
    except Exception as exc:  # the role edge: a closed peer is noticed by its reader
        _say_quietly(logger, what, f"{what} failed: {exc}")


def _say_quietly(logger: logging.Logger, what: str, text: str) -> None:
    now = asyncio.get_running_loop().time()
    last, hidden = _quiet_state.get(what, (-QUIET_EVERY_S, 0))
    if now - last < QUIET_EVERY_S:
        _quiet_state[what] = (last, hidden + 1)
        return
    if len(_quiet_state) > 1000:
        _quiet_state.clear()
    _quiet_state[what] = (now, 0)
    logger.warning("%s%s", text, f" ({hidden} more like it not shown)" if hidden else "")
