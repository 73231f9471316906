"""Start a role from the command line: settings from --config and flags, then run it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from scaleout.commands.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError
from scaleout.commands.connection import DEFAULT_DATA_DIR, resolve

log = logging.getLogger("scaleout")
MIB = 1 << 20
CLIENT_DRAIN_LIMIT_S = 4.0  # a client exits this long after SIGINT/SIGTERM whatever its package does
# Read by numpy's BLAS as it loads; a value the user set is kept (see one_blas_thread).
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def load_toml(path: Path | None, sections: tuple[str, ...]) -> dict[str, Any]:
    """Settings for one role: its table (e.g. [controller]) or the file's top-level keys."""
    if path is None:
        return {}
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    for name in sections:
        if isinstance(data.get(name), dict):
            return dict(data[name])
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def _settings(args: argparse.Namespace, sections: tuple[str, ...], schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The role's TOML table merged with the flags given, each checked against ``schema``;
    and the table alone (the environment comes between the two for the controller connection)."""
    from scaleout.core.config import PATH, check_types, merge

    flags = {k: getattr(args, k, None) for k in schema}
    file_settings = load_toml(args.config, sections)
    merged = merge(file_settings, flags, set(schema), sections[0])
    check_types(merged, schema, sections[0])
    check_types(file_settings, schema, sections[0])
    # Paths are taken from where the command was typed: a client later works inside its package.
    for settings in (merged, file_settings):
        for key, want in schema.items():
            if want is PATH and settings.get(key) is not None:
                settings[key] = Path(settings[key]).absolute()
    return merged, file_settings


def _schemas() -> dict[str, dict[str, Any]]:
    from scaleout.core.config import PATH

    connection = {"controller": str, "token": str, "ca": PATH, "insecure": bool, "data_dir": PATH, "max_payload_mb": int, "state_dir": PATH}
    package_limits = {"package_max_mb": int, "package_max_files": int, "package_max_depth": int}
    return {
        "controller": {
            "data_dir": PATH, "store": str, "host": str, "port": int, "san": list, "tls_cert": PATH, "tls_key": PATH, "insecure": bool, "max_payload_mb": int,
            "combiner_cert_ttl": str,
            "metrics_port": int, "metrics_host": str,
            "max_connect_rate": (int, float), "max_enrol_rate": (int, float), **package_limits, "hello_timeout": (int, float), "idle_timeout": (int, float),
            "handshake_timeout": (int, float), "send_timeout": (int, float), "no_resume": bool,
            "key_file": PATH, "advertise": str,
        },
        "combiner": {**connection, "host": str, "port": int, "name": str, "advertise": str, "san": list, "max_connect_rate": (int, float), "hello_timeout": (int, float),
                     "handshake_timeout": (int, float), "send_timeout": (int, float)},
        "client": {
            **connection, "name": str, "package": PATH, "local_package": bool, "work_dir": PATH,
            "dispatcher": bool, "managed_env": bool, "command_timeout": (int, float), "env_cache": PATH, **package_limits,
        },
    }


def _connect_rate(s: dict[str, Any]) -> float:
    from scaleout.core.ratelimit import DEFAULT_RATE

    rate = s.get("max_connect_rate")
    if rate is None:
        return DEFAULT_RATE
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1e9:
        raise UsageError(f"--max-connect-rate must be a number of connections per second (0: no limit), got {rate!r}")
    return float(rate)


def _enrol_rate(s: dict[str, Any]) -> float:
    from scaleout.roles.enrolment import DEFAULT_ENROL_RATE

    rate = s.get("max_enrol_rate")
    if rate is None:
        return DEFAULT_ENROL_RATE
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1e9:
        raise UsageError(f"--max-enrol-rate must be a number of enrolments per minute (0: no limit), got {rate!r}")
    return float(rate)


def _timeout(s: dict[str, Any], key: str, default: float) -> float:
    """A link timeout from the TOML config (seconds, positive), else the role's default."""
    v = s.get(key)
    if v is None:
        return default
    if not 0 < v <= 86400:
        raise UsageError(f"{key} must be a number of seconds from 0 to 86400, got {v!r}")
    return float(v)


def _package_limits(s: dict[str, Any]) -> Any:
    from scaleout.package.limits import MIB as PMIB
    from scaleout.package.limits import UnpackLimits

    base = UnpackLimits()
    values = {"package_max_mb": base.max_bytes // PMIB, "package_max_files": base.max_files, "package_max_depth": base.max_depth}
    for key in values:
        v = s.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be a whole number of at least 1, got {v!r}")
            values[key] = v
    return UnpackLimits(max_bytes=values["package_max_mb"] * PMIB, max_files=values["package_max_files"], max_depth=values["package_max_depth"])


def one_blas_thread() -> None:
    """Let numpy's BLAS use the calling thread only, in a server role (cli.main, before any
    command module imports numpy; a value the user set stays). Its dot products (the update checks) run over
    memory-bound blocks, where more threads gain nothing, and OpenBLAS's idle threads spin
    after every call: 28% of the combiner's CPU in `round.py --scenario a`, on a box whose
    cores the round needs. A client keeps the default: its package may train with BLAS."""
    for name in BLAS_THREAD_VARS:
        os.environ.setdefault(name, "1")


MALLOC_MMAP_BYTES = 4 << 20  # smaller blocks come from malloc's heap: a 1 MiB frame, the check's 512 KiB blocks
MALLOC_TRIM_BYTES = 32 << 20  # freed memory kept at the heap's top for the next ones (link.release_memory trims all)


def keep_freed_buffers() -> None:
    """Let glibc's malloc reuse the memory of the many short-lived buffers of a model's
    frames and checks instead of mapping fresh, zeroed pages for nearly each of them (its
    dynamic thresholds did: the combiner took 0.92M page faults in `round.py --scenario a
    --rounds 2`, 70k with these, and 26% less CPU, for 11 MiB more peak RSS). A model-sized
    buffer is still mapped and returned whole when freed. MALLOC_*_ settings the user made stay."""
    if any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; elsewhere there is nothing to tune
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, MALLOC_MMAP_BYTES)
    mallopt(m_trim_threshold, MALLOC_TRIM_BYTES)


def _run(role: Callable[[asyncio.Event], Awaitable[None]], drain_limit: float | None = None, tune_gc: bool = True) -> int:
    """Run a role until it ends or a signal stops it: SIGTERM is the normal way to stop a
    service and exits 0 once drained; Ctrl-C (SIGINT) exits 130, as for any command.
    With ``drain_limit``, a process still running that many seconds after the signal (user
    code in a thread that Python cannot interrupt, a stuck worker) exits anyway, same code.
    ``tune_gc``: see _tune_gc (a client leaves the collector to its package's code)."""
    import signal

    if tune_gc:
        _tune_gc()

    from scaleout.roles.common import install_stop_signals

    async def main() -> list[signal.Signals]:
        stop = asyncio.Event()
        # The hard exit is armed in the signal handler itself: the loop may be what is stuck.
        arm = (lambda sig: _exit_after(sig, drain_limit)) if drain_limit is not None else None
        received = install_stop_signals(stop, arm)
        await role(stop)
        return received

    received = asyncio.run(main())
    return EXIT_INTERRUPTED if received[:1] == [signal.SIGINT] else EXIT_OK


GC_FIRST_THRESHOLD = 7000  # allocations between young collections in a serving role (default 700): see _tune_gc


def _tune_gc() -> None:
    """A role serving thousands of links makes many short-lived objects per message (futures,
    frames, dicts): with the default first threshold (700) the collector ran ~220 times in two rounds
    and a round's objects lived long enough to be promoted and scanned again. Ten times that
    threshold, and what was imported frozen out of every full pass: the collector's CPU halves
    (`scaleout simulate --clients 1500 --combiners 4`: combiner 0.27 -> 0.13 s, client process
    0.55 -> 0.22 s, controller 0.23 -> 0.06 s), peak RSS unchanged (146-148 MB a combiner)."""
    import gc

    gc.freeze()
    gc.set_threshold(GC_FIRST_THRESHOLD, 10, 10)


def _exit_after(sig: Any, limit: float) -> None:
    """Arm a timer (a thread: it fires even if the loop never returns) that ends the process
    ``limit`` seconds after the signal ``sig``, with that signal's exit code."""
    import os
    import signal
    import threading

    def hard_exit() -> None:
        log.warning("still shutting down %.0fs after the signal: exiting now", limit)
        for handler in logging.getLogger().handlers:  # not logging.shutdown(): a lock a stuck thread holds would hang it
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_OK)

    timer = threading.Timer(limit, hard_exit)
    timer.daemon = True
    timer.start()


def _path(value: Any) -> Path | None:
    return Path(value) if value is not None else None


def serve(args: argparse.Namespace) -> int:
    from scaleout.core.config import DEFAULT_PORT, parse_port, parse_sans
    from scaleout.roles.controller import Controller, ControllerSettings

    s, _ = _settings(args, ("controller", "serve"), _schemas()["controller"])
    if bool(s.get("tls_cert")) != bool(s.get("tls_key")):
        raise UsageError("--tls-cert and --tls-key go together")
    for key in ("tls_cert", "tls_key"):
        if s.get(key) and not Path(s[key]).is_file():
            raise UsageError(f"--{key.replace('_', '-')} {s[key]} does not exist")
    sans = parse_sans(s.get("san"), "controller")
    if sans and s.get("tls_cert"):
        raise UsageError("--san names the generated certificate; with --tls-cert, put the names in that certificate instead")
    settings = ControllerSettings(
        data_dir=Path(s.get("data_dir") or DEFAULT_DATA_DIR),
        store=_store(getattr(args, "store", None) or os.environ.get("SCALEOUT_STORE") or s.get("store") or None),
        host=str(s.get("host") or "127.0.0.1"),
        port=parse_port(s.get("port", DEFAULT_PORT)),
        san=sans,
        tls_cert=_path(s.get("tls_cert")),
        tls_key=_path(s.get("tls_key")),
        insecure=bool(s.get("insecure")),
        max_payload=int(s.get("max_payload_mb", 4096)) * MIB,
        metrics_port=_metrics_port(s.get("metrics_port")),
        metrics_host=str(s.get("metrics_host") or "127.0.0.1"),
        max_connect_rate=_connect_rate(s),
        max_enrol_rate=_enrol_rate(s),
        package_limits=_package_limits(s),
        hello_timeout=_timeout(s, "hello_timeout", ControllerSettings.hello_timeout),
        idle_timeout=_timeout(s, "idle_timeout", ControllerSettings.idle_timeout),
        handshake_timeout=_timeout(s, "handshake_timeout", ControllerSettings.handshake_timeout),
        resume=not s.get("no_resume"),
        send_timeout=_timeout(s, "send_timeout", ControllerSettings.send_timeout),
    )
    _active_standby(settings, args, s)
    if s.get("combiner_cert_ttl"):
        from scaleout.security.tokens import parse_ttl

        settings.combiner_cert_ttl = parse_ttl(str(s["combiner_cert_ttl"]))
    if s.get("metrics_host") and settings.metrics_port is None:
        raise UsageError("--metrics-host needs --metrics-port (metrics_port in the config file)")
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise UsageError(f"--data-dir {settings.data_dir} is a file, not a directory")
    return _run(Controller(settings).run)


def store_keygen(args: argparse.Namespace) -> int:
    from scaleout.store.vault import keygen

    keygen(Path(args.out))
    print(f"wrote {args.out} (mode 0600): pass it to every controller on the store with --key-file {args.out}, and keep a copy somewhere safe")
    return EXIT_OK


def _active_standby(settings: Any, args: argparse.Namespace, s: dict[str, Any]) -> None:
    """--key-file and --advertise (flag, then SCALEOUT_KEY_FILE / SCALEOUT_ADVERTISE, then the TOML), and the key file a postgresql store needs."""
    import os

    from scaleout.store.lease import is_postgres

    def pick(key: str, env: str) -> Any:
        return getattr(args, key, None) or os.environ.get(env) or s.get(key)

    key_file = pick("key_file", "SCALEOUT_KEY_FILE")
    settings.key_file = Path(key_file).absolute() if key_file else None
    advertise = pick("advertise", "SCALEOUT_ADVERTISE")
    if advertise is not None:
        advertise = str(advertise)
        if not advertise.startswith(("ws://", "wss://")) or "," in advertise:
            raise UsageError(f"--advertise takes one address nodes dial, wss://HOST:PORT (ws:// with --insecure), got {advertise!r}")
        settings.advertise = advertise.rstrip("/")
    if settings.key_file is not None and not is_postgres(settings.store):
        if getattr(args, "key_file", None):
            raise UsageError("--key-file seals the CA and keys in a postgresql store: give --store postgresql://... too, or leave --key-file out")
        log.warning("the key file %s is not used: it is for a postgresql store (--store), and this controller keeps state.db in its data dir", key_file)
        settings.key_file = None
    if is_postgres(settings.store) and settings.key_file is None:
        raise UsageError("a postgresql store needs --key-file PATH, the same file for every controller on it (create one with: scaleout store keygen --out PATH)")
    poll = os.environ.get("SCALEOUT_LEASE_POLL_S")  # hidden: tests poll faster
    if poll:
        try:
            settings.lease_poll = max(0.05, float(poll))
        except ValueError:
            raise UsageError(f"SCALEOUT_LEASE_POLL_S must be a number of seconds, got {poll!r}") from None
    idle = os.environ.get("SCALEOUT_LEASE_IDLE_S")  # hidden: tests see a frozen active sooner
    if idle:
        try:
            settings.lease_idle = max(0.5, float(idle))
        except ValueError:
            raise UsageError(f"SCALEOUT_LEASE_IDLE_S must be a number of seconds, got {idle!r}") from None
    settings.lease_idle = max(settings.lease_idle, 4 * settings.lease_poll)  # a live holder's session is never that idle
    wait = os.environ.get("SCALEOUT_STORE_WAIT_S")  # hidden: tests see a round fail sooner while the store is away
    if wait:
        try:
            settings.store_wait = max(0.0, float(wait))
        except ValueError:
            raise UsageError(f"SCALEOUT_STORE_WAIT_S must be a number of seconds, got {wait!r}") from None


def _store(url: str | None) -> str | None:
    """serve --store: None (state.db in the data dir) or a postgresql:// URL."""
    from urllib.parse import urlsplit

    from scaleout.store.pg import is_url

    if url is not None and not is_url(url):
        raise UsageError(f"--store must be a postgresql://USER[:PW]@HOST:PORT/DB URL (or leave it out for state.db in the data dir), got {url.split('@')[-1]!r}")
    if url is not None and not urlsplit(url).path.strip("/"):  # libpq would pick a database named after the user
        raise UsageError(f"--store names no database: postgresql://USER[:PW]@HOST:PORT/DB, got {url.split('@')[-1]!r}")
    return url


def _positional_token(args: argparse.Namespace) -> None:
    """``scaleout join TOKEN`` is ``--token TOKEN``."""
    given = getattr(args, "join_token", None)
    if given:
        if args.token:
            raise UsageError("give the token once: as TOKEN or with --token, not both")
        args.token = given


def _metrics_port(value: Any) -> int | None:
    from scaleout.core.config import parse_port
    from scaleout.core.errors import ConfigError

    if value is None:
        return None
    try:
        return parse_port(value)
    except ConfigError as exc:
        raise ConfigError("metrics_port", exc.problem) from None


def _resolve_retrying(args: argparse.Namespace, file_settings: dict[str, Any]) -> Any:
    """``resolve`` for a node: a join token's controller that does not answer yet (down,
    restarting, not started) is retried with backoff, as an enrolled node retries, until it
    answers or a signal stops the node (its exit code then). An untrusted CA still ends it at once."""
    import signal

    from scaleout.roles.common import install_stop_signals
    from scaleout.transport.net import ConnectError, TrustError, backoff

    try:
        return resolve(args, file_settings)
    except TrustError:
        raise
    except ConnectError as exc:
        first = exc

    async def retry() -> Any:
        stop = asyncio.Event()
        received = install_stop_signals(stop)
        delays = backoff(initial=1.0, maximum=30.0)
        exc: ConnectError = first
        while True:
            delay = next(delays)
            log.warning("controller not reachable at %s: retrying in %.0fs (%s)", _dial_target(args), delay, exc)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return EXIT_INTERRUPTED if received[:1] == [signal.SIGINT] else EXIT_OK
            try:
                return await asyncio.to_thread(resolve, args, file_settings)  # resolve runs its own loop
            except TrustError:
                raise
            except ConnectError as again:
                exc = again

    return asyncio.run(retry())


def _dial_target(args: argparse.Namespace) -> str:
    """The controller address(es) a node dials, for its log."""
    import os

    from scaleout.core.errors import AuthError
    from scaleout.security.jointoken import is_join_token, parse

    token = getattr(args, "token", None) or os.environ.get("SCALEOUT_TOKEN") or ""
    url = getattr(args, "controller", None) or os.environ.get("SCALEOUT_CONTROLLER")
    if url:
        return str(url)
    if token.startswith("@"):
        try:
            token = Path(token[1:]).read_text().strip()
        except OSError:
            return "the controller"
    try:
        return ", ".join(parse(token).urls) if is_join_token(token) else "the controller"
    except AuthError:
        return "the controller"


def warn_if_expiring(token: str, role: str, enrolled: bool = False) -> None:
    """A join token matters only until the node has enrolled (it then reconnects with its
    own identity, renewed as it goes): warn that one runs out soon only for a node that has
    no identity yet."""
    import datetime as dt
    import time

    from scaleout.core.errors import AuthError
    from scaleout.security.tokens import peek

    if enrolled:
        return
    try:
        claims = peek(token)
    except AuthError:
        return  # the controller will refuse it with the reason
    if claims.nid is not None:
        return  # a node's own credential: renewed while it connects
    left = claims.exp - time.time()
    if left < EXPIRY_WARNING_S:
        when = dt.datetime.fromtimestamp(claims.exp).strftime("%Y-%m-%d %H:%M")
        log.warning(
            "this %s token expires at %s: the %s must enrol before then (once enrolled it reconnects with its own identity); "
            "after that, create a new one with: scaleout token create --role %s", role, when, role, role,
        )


def has_identity(role: str, name: str, url: str, ca: Path | None, token: str, state_dir: Path) -> bool:
    """Whether this node (``name``, else the one the state dir names) already enrolled at the
    controller at ``url``: its identity is in ``state_dir``."""
    from scaleout.core.errors import ConfigError
    from scaleout.roles.joining import choose_name, controller_key
    from scaleout.security import identity

    key = controller_key(url, ca)
    try:
        name = name or choose_name(role, "", token, state_dir, key) or ""
    except ConfigError:
        return True  # several identities: the role stops and says which --name to pass
    return bool(name) and identity.path_for(state_dir, key, role, name).exists()


EXPIRY_WARNING_S = 7 * 86400


def combine(args: argparse.Namespace) -> int:
    from scaleout.core.config import parse_port, parse_sans
    from scaleout.roles.combiner import Combiner, CombinerSettings

    _positional_token(args)
    s, file_settings = _settings(args, ("combiner", "combine"), _schemas()["combiner"])
    conn = _resolve_retrying(args, file_settings)  # flags, then SCALEOUT_*, then the file
    if isinstance(conn, int):  # stopped by a signal while the controller did not answer
        return conn
    settings = CombinerSettings(
        controller=conn.url, token=conn.token, ca=conn.ca, insecure=conn.insecure,
        host=str(s.get("host") or "127.0.0.1"), port=parse_port(s.get("port", 0)), name=str(s.get("name") or ""),
        advertise=s.get("advertise"), san=parse_sans(s.get("san"), "combiner"), max_payload=int(s.get("max_payload_mb", 4096)) * MIB,
        state_dir=_path(s.get("state_dir")),
        max_connect_rate=_connect_rate(s),
        hello_timeout=_timeout(s, "hello_timeout", CombinerSettings.hello_timeout),
        handshake_timeout=_timeout(s, "handshake_timeout", CombinerSettings.handshake_timeout),
        send_timeout=_timeout(s, "send_timeout", CombinerSettings.send_timeout),
    )
    from scaleout.security.identity import default_state_dir

    state_dir = settings.state_dir or default_state_dir()
    warn_if_expiring(conn.token, "combiner", has_identity("combiner", settings.name, conn.url, conn.ca, conn.token, state_dir))
    return _run(Combiner(settings).run)


def join(args: argparse.Namespace) -> int:
    from scaleout.roles.client import Client, ClientSettings

    _positional_token(args)
    s, file_settings = _settings(args, ("client", "join"), _schemas()["client"])
    conn = _resolve_retrying(args, file_settings)  # flags, then SCALEOUT_*, then the file
    if isinstance(conn, int):  # stopped by a signal while the controller did not answer
        return conn
    package = _path(s.get("package")) or (Path("client").absolute() if s.get("local_package") else None)
    from scaleout.package.project import project_file

    if package is not None and not package.is_dir():
        raise UsageError(f"no such folder: {package} (-p names the folder of a compute package)")
    if package is not None and project_file(package) is None:
        raise UsageError(f"{package} is not a compute package (no scaleout.yaml in it)")
    timeout = s.get("command_timeout")
    if timeout is not None and not 0 < timeout <= 30 * 86400:
        raise UsageError(f"--command-timeout must be a number of seconds above 0, got {timeout!r}")
    if s.get("managed_env"):
        from scaleout.package.environment import check_can_manage

        check_can_manage()
    settings = ClientSettings(
        controller=conn.url, token=conn.token, ca=conn.ca, insecure=conn.insecure, name=str(s.get("name") or ""),
        package=package, data_dir=_path(s.get("work_dir")), max_payload=int(s.get("max_payload_mb", 4096)) * MIB,
        dispatcher=bool(s.get("dispatcher")), managed_env=bool(s.get("managed_env")),
        command_timeout=float(timeout) if timeout is not None else None, env_cache=_path(s.get("env_cache")),
        state_dir=_path(s.get("state_dir")),
        package_limits=_package_limits(s),
    )
    client = Client(settings)
    warn_if_expiring(conn.token, "client", has_identity("client", client.name, conn.url, conn.ca, conn.token, client.state_dir))
    return _run(client.run, drain_limit=CLIENT_DRAIN_LIMIT_S, tune_gc=False)


def run_build(args: argparse.Namespace) -> int:
    from scaleout.package.build import run_build as build

    if not args.path.is_dir():
        raise UsageError(f"compute package folder {args.path} does not exist")
    if args.managed_env:
        from scaleout.package.environment import check_can_manage

        check_can_manage()
    files = build(args.path, args.output, managed_env=args.managed_env, env_cache=args.env_cache)
    for f in files:
        print(f"wrote {f}")
    if not files:
        log.warning("build() ran but wrote no files in %s", args.output or args.path)
    return EXIT_OK


def package_create(args: argparse.Namespace) -> int:
    import hashlib

    from scaleout.package.archive import create_archive

    if not args.path.is_dir():
        raise UsageError(f"compute package folder {args.path} does not exist")
    out = create_archive(args.path, args.output)
    data = out.read_bytes()
    info: dict[str, Any] = {"file": str(out), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"created {out} ({len(data)} bytes, sha256 {info['sha256'][:12]})")
    return EXIT_OK


def run_install(args: argparse.Namespace) -> int:
    """pip install the python_env file's dependencies into the Python running scaleout."""
    from scaleout.package.environment import install_here, project_env
    from scaleout.package.project import load_project

    if not args.path.is_dir():
        raise UsageError(f"compute package folder {args.path} does not exist")
    project = load_project(args.path)
    env = project_env(project)
    if env is None:
        message = f"{project.root / project.file} names no python_env: nothing to install"
        print(json.dumps({"python": sys.executable, "installed": []}) if args.json else message)
        return EXIT_OK
    if args.dry_run:
        reqs = env.requirements()
        print(json.dumps({"python": sys.executable, "file": str(env.file), "requirements": reqs}) if args.json
              else f"would install into {sys.executable}: {' '.join(reqs) or 'nothing'}")
        return EXIT_OK
    from scaleout.core.errors import PackageError
    from scaleout.package.environment import check_can_install

    check_can_install()  # the single-file executable has no pip: a usage error (exit 2)
    try:
        reqs = install_here(env)
    except PackageError as exc:  # pip failed or refused: the operation failed (exit 1)
        print(f"scaleout: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"python": sys.executable, "file": str(env.file), "installed": reqs}))
    else:
        print(f"installed the dependencies of {env.file.name} into {sys.executable}: {' '.join(reqs) or 'nothing to install'}")
    return EXIT_OK
