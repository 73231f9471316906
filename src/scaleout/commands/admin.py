"""Admin commands: one request to the controller each, printed for people or as JSON."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scaleout.commands.exits import EXIT_FAILED, EXIT_OK, UsageError
from scaleout.commands.connection import Connection, resolve

if TYPE_CHECKING:
    from scaleout.transport.dialer import Controllers

EventHandler = Callable[[str, dict[str, Any]], None]


async def call_async(
    conn: Connection, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None, on_event: EventHandler | None = None,
    progress: str | None = None, quiet: bool = False, dialer: Controllers | None = None, active_only: bool = False,
    standbys: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    """One request on a fresh link; ``progress`` names what moves ("model"), to show a bar on
    a terminal. Not on a terminal, or ``quiet`` (--json), the transfer says nothing at all.
    ``dialer``: the addresses to dial, kept across calls (which one answered last);
    ``active_only``: a standby's answer (its status) counts as its refusal, so the active one is
    asked; ``standbys``: where those answers are kept, in the order they came."""
    from scaleout.commands.progress import terminal_bar
    from scaleout.core import messages as m
    from scaleout.core.errors import Standby
    from scaleout.security.tls import client_context
    from scaleout.transport.dialer import Controllers
    from scaleout.transport.link import Incoming
    from scaleout.transport.net import connect

    ctx = None if conn.insecure else client_context(conn.ca)
    show = progress is not None and not quiet
    sending = terminal_bar(f"sending {progress}") if show and blob is not None else None
    receiving = terminal_bar(f"receiving {progress}") if show else None
    silent = _silent if progress is not None else None  # told the progress instead of the link's log lines

    async def handle(inc: Incoming) -> None:
        if isinstance(inc.msg, m.Event) and on_event is not None:
            on_event(inc.msg.kind, inc.msg.data)

    async def attempt(url: str) -> tuple[dict[str, Any], bytes | None]:
        link = await connect(url, conn.token, ctx, max_payload=1 << 40)
        link.receive_progress = receiving or silent  # this link's only payload is the reply's
        reader = asyncio.create_task(link.run(on_message=handle))
        try:
            # With a payload: not the whole upload to a standby first (the dialer asks its status).
            reply = await controllers.request(link, op, args, blob, progress=sending or silent)
        finally:
            await link.ws.close()
            reader.cancel()
        if active_only and reply[0].get("role") == "standby":
            if standbys is not None:
                standbys.append(reply[0])
            raise Standby(reply[0].get("active"))  # the dialer goes on to the active one it names, if it is ours
        return reply

    controllers = dialer or Controllers(conn.url)
    try:  # the active one of the addresses given (a standby names it): transport/dialer.py
        return await controllers.dial(attempt)
    finally:
        for bar in (sending, receiving):
            if bar is not None:
                bar.close()  # an interrupted bar's line ends before the error is printed


def call(
    args: argparse.Namespace, op: str, req: dict[str, Any] | None = None, blob: bytes | None = None, on_event: EventHandler | None = None,
    progress: str | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    return asyncio.run(call_async(resolve(args), op, req, blob, on_event, progress, quiet=bool(getattr(args, "json", False))))


def _silent(done: int, total: int) -> None:
    """A transfer's progress where nobody watches (a pipe, a file, --json): say nothing."""


def emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(public(data), indent=2, default=str))
    else:
        human()


TIMESTAMPS = frozenset({"created", "finished", "started", "first_seen", "last_seen", "expires", "last_used", "revoked"})
RECORD_LISTS = frozenset({"rounds", "clients", "failures", "results", "recent"})  # records inside a record


def public(data: Any) -> Any:
    """A record (or a list of them) as --json prints it: a round's number is "index" and
    times are ISO 8601 UTC strings (durations stay numbers). What users put inside a record
    (session settings, metrics) is printed as it is."""
    if isinstance(data, list):
        return [public(item) for item in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "idx":
            key = "index"
        elif key in TIMESTAMPS and isinstance(value, int | float) and not isinstance(value, bool):
            value = iso_utc(value)
        elif key in RECORD_LISTS and isinstance(value, list):
            value = public(value)
        out[key] = value
    return out


def iso_utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], empty: str) -> None:
    if not rows:
        print(empty)
        return
    cells = [[str(r.get(key, "")) if r.get(key) is not None else "-" for key, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


# -- commands -----------------------------------------------------------------------------


def token_create(args: argparse.Namespace) -> int:
    """Print a join token: the controller's addresses, its CA fingerprint and the credential."""
    from scaleout.commands.tokens import token_create as create

    return create(args, call, emit, when)


def package_set_active(args: argparse.Namespace) -> int:
    if args.file.is_dir():  # a package folder: packed as `package create` and the TUI pack it
        from scaleout.package.archive import package_bytes

        data, name = package_bytes(args.file)
        print(f"packed {args.file} into {name} ({len(data)} bytes)", file=sys.stderr)
    else:
        data, name = _read(args.file, "package"), args.file.name
    result, _ = call(args, "package.set_active", {"name": args.name or name}, data, progress="package")
    emit(args, result, lambda: print(f"package {result['name']} ({result['id'][:12]}, {result['size']} bytes) is now active"))
    return EXIT_OK


def model_set_seed(args: argparse.Namespace) -> int:
    from scaleout.package.seed import read_model_file

    data = read_model_file(args.file)
    result, _ = call(args, "model.set_seed", {}, data, progress="model")
    emit(args, result, lambda: print(f"seed model {result['id']} set ({result['tensors']} tensors, {result['size']} bytes)"))
    return EXIT_OK


MODEL_COLUMNS = [("id", "ID"), ("created_s", "CREATED"), ("session_id", "SESSION"), ("round_index", "ROUND"), ("aggregator", "AGGREGATOR"), ("n", "CLIENTS"), ("mark", "")]


def model_ls(args: argparse.Namespace) -> int:
    result, _ = call(args, "model.ls", {"session_id": args.session})
    rows = result["models"]

    def human() -> None:
        for r in rows:
            r.update(created_s=when(r["created"]), n=len(r["contributors"]) or None, mark="active" if r["active"] else "", id=r["id"][:16])
        table(rows, MODEL_COLUMNS, "no models yet (set one with: scaleout model set-seed FILE)")

    emit(args, rows, human)
    return EXIT_OK


def model_show(args: argparse.Namespace) -> int:
    result, _ = call(args, "model.show", {"id": args.id})
    row = result["model"]

    def human() -> None:
        print(f"model      {row['id']}{'  (active)' if row['active'] else ''}")
        print(f"parent     {row['parent'] or '-'}")
        print(f"session    {row['session_id'] or '-'}  round {row['round_index'] if row['round_index'] is not None else '-'}")
        print(f"aggregator {row['aggregator'] or '-'}")
        print(f"created    {when(row['created'])}   size {row['size']} bytes")
        print(f"clients    {', '.join(row['contributors']) or '-'}")
        print("tensors")
        for name, spec in row["tensors"].items():
            print(f"  {name:<24} {spec['dtype']:<8} {tuple(spec['shape'])}")

    emit(args, row, human)
    return EXIT_OK


def model_download(args: argparse.Namespace) -> int:
    result, data = call(args, "model.get", {"id": None if args.id == "active" else args.id}, progress="model")
    assert data is not None
    out: Path = args.output
    if out.suffix == ".npz":
        import numpy as np

        from scaleout.core import payload

        named, layout, _ = payload.read(data)
        np.savez_compressed(out, **named)  # type: ignore[arg-type]
    else:
        out.write_bytes(data)
    info = {"id": result["id"], "file": str(out), "size": out.stat().st_size}
    emit(args, info, lambda: print(f"saved model {result['id'][:12]} to {out}"))
    return EXIT_OK


def _round_line(r: dict[str, Any]) -> str:
    val = ", ".join(f"{k}={v:.4g}" for k, v in (r.get("validation") or {}).items())
    parts = [f"round {r['idx']}", r["status"], f"{len(r['participants'])} participants"]
    if r.get("duration_s") is not None:
        parts.append(f"{r['duration_s']:.2f}s")
    if val:
        parts.append(val)
    if r.get("reason"):
        parts.append(r["reason"])
    return "  ".join(parts)


def client_failures(r: dict[str, Any], reports: list[dict[str, Any]], clients: list[str]) -> list[dict[str, str]]:
    """Why each client left out of round ``r`` was: its refused update or failed callback,
    as its combiner reported it, or that no update came at all (from those of ``clients``
    that did not train)."""
    out: list[dict[str, str]] = []
    for rep in reports:
        if rep["error"]:
            kind, error = rep["kind"], str(rep["error"])
            out.append({"client": rep["client"], "reason": error if error.startswith(kind) else f"{kind}: {error}"})
    trained = {rep["client"] for rep in reports if rep["kind"] == "train"} | set(r["participants"])
    left_out = (r.get("selection") or {}).get("not_selected") or {}  # not selected this round: not a failure
    out += [{"client": c, "reason": "sent no update (timed out, disconnected or never asked)"} for c in clients if c not in trained and c not in left_out]
    return sorted(out, key=lambda f: f["client"])


def session_start(args: argparse.Namespace) -> int:
    try:
        settings = json.loads(args.settings)
    except ValueError as exc:
        raise UsageError(f"--settings is not valid JSON: {exc}") from None
    try:
        aggregator_kwargs = json.loads(args.aggregator_kwargs)
    except ValueError as exc:
        raise UsageError(f"--aggregator-kwargs is not valid JSON: {exc}") from None
    from scaleout.core.config import SessionConfig
    from scaleout.core.errors import ConfigError

    req = SessionConfig(
        rounds=args.rounds, round_timeout=args.round_timeout, min_clients=args.min_clients,
        aggregator=args.aggregator, aggregator_kwargs=aggregator_kwargs, validate=args.validate, settings=settings, name=args.name,
        max_examples_per_client=args.max_examples_per_client, max_update_norm=args.max_update_norm,
        clients_per_round=_per_round(args.clients_per_round), seed=args.seed,
        clients=None if args.clients is None else [c.strip() for c in args.clients.split(",")],
    ).to_dict()
    try:
        json.dumps(req, allow_nan=False)
    except ValueError:
        raise ConfigError("settings", "numbers must be finite (no NaN or Infinity)") from None
    if args.model:
        req["model"] = args.model
    req.update(_server_functions(args))
    return _run_session_op(args, "session.start", req, lambda s: f"started ({args.rounds} round{'' if args.rounds == 1 else 's'}{_sampling(s['config'])})")


def _per_round(text: str | None) -> int | float | None:
    """--clients-per-round: a whole number (a count) or a decimal (a fraction of those connected)."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    raise UsageError(f"--clients-per-round must be a number of clients (2) or a fraction of them (0.1), got {text!r}")


def _sampling(cfg: dict[str, Any]) -> str:
    """How a session draws its clients, as its start line says it (nothing when all take part)."""
    per, fixed = cfg.get("clients_per_round"), cfg.get("clients")
    if per is None and fixed is None:
        return ""
    pool = f"of {len(fixed)} named clients" if fixed else "of the connected clients"
    many = "all" if per is None else f"{per * 100:g}%" if isinstance(per, float) else str(per)
    return f", {many} {pool} a round, seed {cfg.get('seed')}"


def _server_functions(args: argparse.Namespace) -> dict[str, Any]:
    """--server-functions FILE.py: the file's source (the controller compiles it in its
    server-functions worker, never here or in its own process)."""
    path = getattr(args, "server_functions", None)
    timeout = getattr(args, "server_functions_timeout", 60.0)
    if path is None:
        return {}
    from scaleout.core.serverfunctions import MAX_SOURCE

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--server-functions {path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_SOURCE:
        raise UsageError(f"--server-functions {path}: {len(data):,} bytes; a server-functions file may have at most {MAX_SOURCE:,}")
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--server-functions {path}: not a Python file (not UTF-8 text)") from None
    return {"server_functions": source, "server_functions_file": path.name, "server_functions_timeout": timeout}


def session_continue(args: argparse.Namespace) -> int:
    req: dict[str, Any] = {"id": args.id, "rounds": args.rounds, "round_timeout": args.round_timeout}

    def said(s: dict[str, Any]) -> str:
        return f"continues from model {str(s.get('end_model') or s.get('start_model') or '-')[:12]}, up to round {s['config']['rounds']}"

    return _run_session_op(args, "session.continue", {k: v for k, v in req.items() if v is not None}, said)


def model_set_active(args: argparse.Namespace) -> int:
    result, _ = call(args, "model.set_active", {"id": args.id})
    model = result["model"]
    emit(args, model, lambda: print(f"model {model['id']} is now the global model"))
    return EXIT_OK


def _run_session_op(args: argparse.Namespace, op: str, req: dict[str, Any], said: Callable[[dict[str, Any]], str]) -> int:
    """Start (or continue) a session; with --wait, follow it to its end."""
    conn = resolve(args)
    started: list[str] = []

    async def run() -> dict[str, Any]:
        result, _ = await call_async(conn, op, req)
        session = result["session"]
        started.append(session["id"])
        if not args.json:
            print(f"session {session['id']} {said(session)}", flush=True)
            connected = result.get("clients")
            min_clients = getattr(args, "min_clients", None)
            if isinstance(connected, int) and isinstance(min_clients, int) and connected < min_clients:
                print(f"{connected} of {min_clients} clients connected: waiting up to {args.round_timeout:g}s for the rest before round 1", flush=True)
        if args.wait:
            session = await follow(conn, session["id"], None if args.json else _print_round)
        return session

    try:
        session = asyncio.run(run())
    except KeyboardInterrupt:
        if started:
            print(f"stopped following session {started[0]}; it keeps running: scaleout session watch {started[0]}", file=sys.stderr)
        raise
    if args.json:
        print(json.dumps(public(session), indent=2, default=str))
    elif args.wait:
        _print_end(session)
    return EXIT_OK if not args.wait or session["status"] == "finished" else EXIT_FAILED


async def follow(
    conn: Connection, key: str | None, on_round: Callable[[dict[str, Any]], None] | None, on_running: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Hand each round of session ``key`` (default: the latest) to ``on_round`` once it has
    ended, in order and with its clients' failures, until the session ends; return it.
    ``on_running(id)`` is called first if the session is still running.

    The follower (transport/follow.py) reads the session again at each round's end, so none
    is missed or repeated, whenever we attached; a controller lost on the way (stopped,
    SIGKILLed, a standby taking over) is dialled again through the addresses given, for a
    while (``reconnect_s``), and followed there from where we were. Each call here is on a
    fresh link (call_async).
    """
    from scaleout.core.errors import ScaleoutError
    from scaleout.transport.dialer import Controllers
    from scaleout.transport.follow import SessionFollower
    from scaleout.transport.net import ConnectError

    controllers = Controllers(conn.url)  # one for the whole follow: the address that answered last is dialled first

    async def show(key: str | None) -> dict[str, Any]:
        session: dict[str, Any] = (await call_async(conn, "session.show", {"id": key, "clients": True}, dialer=controllers))[0]["session"]
        for r in session["rounds"]:
            r["failures"] = client_failures(r, r.pop("clients", []), [])
        return session

    async def wait(key: str | None, wake: Callable[[], None]) -> dict[str, Any]:
        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "round":
                wake()

        session: dict[str, Any] = (await call_async(conn, "session.wait", {"id": key}, on_event=on_event, dialer=controllers))[0]["session"]
        for r in session["rounds"]:
            r.setdefault("failures", [])  # shown as it is when the session cannot be read again (the controller ended with it)
        return session

    def on_lost(exc: ScaleoutError, seconds: float) -> None:
        print(f"lost the controller ({exc}); reconnecting to {','.join(controllers.urls)} for up to {seconds:g}s", file=sys.stderr, flush=True)

    def give_up(exc: ScaleoutError) -> ConnectError:
        return ConnectError(f"lost the controller while following session {follower.key} ({exc}); once it is back: scaleout session watch {follower.key}")

    follower = SessionFollower(
        key, show=show, wait=wait, on_round=on_round or (lambda r: None), urls=lambda: controllers.urls,
        is_loss=lambda exc: exc.code in LOST_CODES, on_lost=on_lost, give_up=give_up,
    )
    session = await follower.first()
    if session["status"] == "running" and on_running is not None:
        on_running(session["id"])
    return await follower.follow(session)


LOST_CODES = ("unreachable", "link_closed", "timeout", "shutting_down")  # a follower lost its controller


SHOWN_REASON_CHARS = 300  # a reason on a round's line; `session show --clients --json` has it whole


def shown_reason(reason: str) -> str:
    """One line of at most SHOWN_REASON_CHARS for a terminal (an error text may be 4 KiB)."""
    line = " ".join(reason.split())
    return line if len(line) <= SHOWN_REASON_CHARS else line[: SHOWN_REASON_CHARS - 4].rstrip() + " ..."


def _print_round(r: dict[str, Any]) -> None:
    print(_round_line(r), flush=True)
    for f in r["failures"]:
        print(f"    {f['client']}: {shown_reason(f['reason'])}", flush=True)


def outcome(session: dict[str, Any]) -> dict[str, Any]:
    """A session's outcome record, the last line of `session watch --json`: how it ended,
    why, and how many of its planned rounds ran."""
    return {
        "session_id": session["id"], "status": session["status"], "reason": session.get("reason"),
        "rounds": len(session.get("rounds") or []), "rounds_planned": (session.get("config") or {}).get("rounds"),
        "end_model": session.get("end_model"),
    }


def _print_end(session: dict[str, Any]) -> None:
    print(f"session {session['id']} {session['status']}" + (f": {session['reason']}" if session.get("reason") else ""), flush=True)


def session_watch(args: argparse.Namespace) -> int:
    conn = resolve(args)

    def print_json(r: dict[str, Any]) -> None:
        print(json.dumps(public(r), default=str), flush=True)

    def print_running(key: str) -> None:
        print(f"session {key} running: following its rounds (Ctrl-C stops watching, not the session)", flush=True)

    on_round, on_running = (print_json, None) if args.json else (_print_round, print_running)
    session = asyncio.run(follow(conn, args.id, on_round, on_running))
    if args.json:
        print(json.dumps(outcome(session), default=str), flush=True)  # JSON Lines: the last line is the session's outcome
    else:
        _print_end(session)
    return EXIT_OK if session["status"] == "finished" else EXIT_FAILED


SESSION_COLUMNS = [("id", "ID"), ("status", "STATUS"), ("created_s", "STARTED"), ("n_rounds", "ROUNDS"), ("reason", "NOTE")]


def session_ls(args: argparse.Namespace) -> int:
    result, _ = call(args, "session.ls")
    rows = result["sessions"]

    def human() -> None:
        for r in rows:
            r.update(created_s=when(r["created"]), n_rounds=f"{r.get('rounds_done', '?')}/{r['config'].get('rounds')}")
        table(rows, SESSION_COLUMNS, "no sessions yet (start one with: scaleout session start)")

    emit(args, rows, human)
    return EXIT_OK


def _print_session(s: dict[str, Any]) -> None:
    print(f"session {s['id']}  {s['status']}" + (f"  ({s['reason']})" if s.get("reason") else ""))
    print(f"started {when(s['created'])}  finished {when(s['finished'])}")
    config = dict(s["config"])
    if config.get("server_functions"):  # the file's source: its name and size, not its text
        config["server_functions"] = f"{config.get('server_functions_file')} ({len(config['server_functions'].splitlines())} lines)"
    print(f"config  {json.dumps(config)}")
    print(f"model   {s['start_model'] or '-'} -> {s['end_model'] or '-'}")
    for r in s["rounds"]:
        print("  " + _round_line(r))
        for line in selection_lines(r.get("selection")):
            print("      " + line)
        for e in (r.get("server_functions") or {}).get("errors", []):
            print(f"      server functions: {e['method']} failed{' at ' + e['where'] if e.get('where') else ''}: {e['error']} (built-in used)")
        for c in r.get("clients", []):
            data = c["data"]
            if c["kind"] == "train":
                meta = data.get("metadata") or {}
                data = {**{k: v for k, v in meta.items() if not isinstance(v, dict)}, **(meta.get("training_metadata") or {})}
            shown = c["error"] or ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in data.items() if not isinstance(v, dict))
            print(f"      {c['client']:<16} {c['kind']:<9} {'refused: ' if c['error'] else ''}{shown}")


SHOWN_NAMES = 8  # names on a line of `session show`; --json has them all


def selection_lines(selection: dict[str, Any] | None) -> list[str]:
    """Who a round selected and why the others were not, a line for each reason (none when
    every connected client took part)."""
    if not selection or not selection.get("not_selected"):
        return []

    def names(items: list[str]) -> str:
        more = f" and {len(items) - SHOWN_NAMES} more" if len(items) > SHOWN_NAMES else ""
        return ", ".join(items[:SHOWN_NAMES]) + more

    chosen = list(selection.get("selected") or [])
    by_reason: dict[str, list[str]] = {}
    for client, reason in sorted(selection["not_selected"].items()):
        by_reason.setdefault(reason, []).append(client)
    lines = [f"selected ({len(chosen)}): {names(chosen) or '-'}"]
    lines += [f"{reason} ({len(items)}): {names(items)}" for reason, items in sorted(by_reason.items())]
    return lines


def session_show(args: argparse.Namespace) -> int:
    result, _ = call(args, "session.show", {"id": args.id, "clients": args.clients})
    emit(args, result["session"], lambda: _print_session(result["session"]))
    return EXIT_OK


def _status_now(args: argparse.Namespace) -> dict[str, Any]:
    """The active controller's status; of several addresses a standby's answer only when none
    of them is active (it names the active one, maybe an address not given)."""
    from scaleout.transport.dialer import controller_urls
    from scaleout.transport.net import ConnectError

    conn = resolve(args)
    if len(controller_urls(conn.url)) > 1:
        standbys: list[dict[str, Any]] = []  # their answers, kept: one pass over the addresses
        try:
            return asyncio.run(call_async(conn, "status", active_only=True, quiet=bool(getattr(args, "json", False)), standbys=standbys))[0]
        except ConnectError:
            if not standbys:
                raise  # none answered: why, for each address
            return standbys[0]  # none active: what the first standby says, as one address would
    return call(args, "status")[0]


def status(args: argparse.Namespace) -> int:
    result = _wait_ready(args, args.wait) if getattr(args, "wait", None) is not None else _status_now(args)

    def human() -> None:
        if result.get("role") == "standby":
            print(f"standby, active is {result.get('active') or '- (none yet)'}")
            return
        print(f"controller      {result['url']}")
        print(f"active model    {result['active_model'] or '- (set one with: scaleout model set-seed FILE)'}")
        print(f"active package  {result['active_package'] or '- (set one with: scaleout package set-active FILE)'}")
        print(f"session         {result['session'] or '- (none running)'}")
        print(f"combiners       {result['combiners']} connected, {result['clients']} clients")
        if result.get("metrics_url"):
            print(f"metrics         {result['metrics_url']}")

    emit(args, result, human)
    return EXIT_OK


def _wait_ready(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """``status --wait``: ask until the controller answers as the active one (its data dir
    written, its port open; of several addresses, the active one, a standby's pointer followed
    when it is one of them), at most ``seconds``; a refused token or an untrusted certificate
    ends it at once."""
    import time

    from scaleout.core.errors import AuthError, ScaleoutError
    from scaleout.transport.net import ConnectError, TrustError

    deadline = time.monotonic() + seconds
    delay = 0.1
    said = False
    while True:
        try:
            return asyncio.run(call_async(resolve(args), "status", active_only=True))[0]
        except (AuthError, TrustError):
            raise
        except (UsageError, ScaleoutError, OSError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectError(f"the controller was not ready within {seconds:g}s: {exc}") from None
            if not said:
                print(f"waiting up to {seconds:g}s for the controller ({exc})", file=sys.stderr)
                said = True
            time.sleep(min(delay, left))  # polling a process that is starting: nothing to wait on
            delay = min(delay * 2, 1.0)


def session_stop(args: argparse.Namespace) -> int:
    result, _ = call(args, "session.stop", {"id": args.id})
    emit(args, result["session"], lambda: print(f"session {result['session']['id']} {result['session']['status']}"))
    return EXIT_OK


def client_ls(args: argparse.Namespace) -> int:
    result, _ = call(args, "client.ls")
    rows = result["clients"]

    def human() -> None:
        for r in rows:
            r["seen"] = when(r["last_seen"])
            package = r.get("package")
            r["pkg"] = (package[:12] if package else None) and package[:12] + (" (cannot load)" if r.get("package_error") else "")
        table(rows, [("name", "NAME"), ("status", "STATUS"), ("combiner", "COMBINER"), ("pkg", "PACKAGE"), ("seen", "LAST SEEN")], "no clients (join one with: scaleout join TOKEN)")

    emit(args, rows, human)
    return EXIT_OK


def combiner_ls(args: argparse.Namespace) -> int:
    result, _ = call(args, "combiner.ls")
    rows = result["combiners"]

    def human() -> None:
        for r in rows:
            r["seen"] = when(r["last_seen"])
        table(rows, [("name", "NAME"), ("status", "STATUS"), ("url", "URL"), ("clients", "CLIENTS"), ("seen", "LAST SEEN")], "no combiners (start one with: scaleout combine TOKEN)")

    emit(args, rows, human)
    return EXIT_OK


def _tokens_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from scaleout.commands import tokens

        return int(getattr(tokens, name)(args, call, emit, when))

    return run


METRIC_COLUMNS = [("time", "TIME"), ("session_id", "SESSION"), ("round_index", "ROUND"), ("client", "CLIENT"), ("step", "STEP"), ("key", "METRIC"), ("shown", "VALUE")]


def metric_ls(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError("--limit must be 0 (all) or more")
    if args.round is not None and args.round < 1:
        raise UsageError("--round must be a round number (1 or more)")
    req = {"session_id": args.session, "round_index": args.round, "client": args.client, "key": args.key, "limit": args.limit}
    if getattr(args, "telemetry", False):
        req["kind"] = "telemetry"
    result, _ = call(args, "metric.ls", {k: v for k, v in req.items() if v is not None})
    rows, total = result["metrics"], result["total"]

    def human() -> None:
        for r in rows:
            r.update(time=when(r["created"]), shown=f"{r['value']:.6g}")
        filtered = any(v is not None for v in (args.session, args.round, args.client, args.key))
        if getattr(args, "telemetry", False):
            empty = "no telemetry values match" if filtered else "no telemetry logged yet (packages send it with client.log_telemetry)"
        else:
            empty = "no metric values match" if filtered else "no metrics logged yet (packages log them with client.log_metric)"
        table(rows, METRIC_COLUMNS, empty)

    emit(args, rows, human)
    if total > len(rows):
        print(f"(the latest {len(rows)} of {total} values; --limit 0 shows all)", file=sys.stderr)
    for d in result.get("dropped") or []:
        print(
            f"(client {d['client']}, session {d['session_id']} round {d['round_index']}: {d['dropped']} log_metric "
            f"{'call' if d['dropped'] == 1 else 'calls'} dropped by the rate limit, not stored)", file=sys.stderr,
        )
    return EXIT_OK


AUDIT_COLUMNS = [("id", "ID"), ("when", "TIME"), ("actor", "WHO"), ("address", "FROM"), ("action", "ACTION"), ("what", "DETAIL")]


def audit_ls(args: argparse.Namespace) -> int:
    import time

    from scaleout.core.audit import parse_since

    if args.limit < 0:
        raise UsageError(f"--limit must be 0 (all) or more, got {args.limit}")
    req: dict[str, Any] = {"limit": args.limit}
    if args.since is not None:
        req["since"] = parse_since(args.since, time.time())
    rows = call(args, "audit.ls", req)[0]["entries"]

    def human() -> None:
        for r in rows:
            r.update(when=when(r["time"]), what=" ".join(f"{k}={_short(v, k)}" for k, v in (r["detail"] or {}).items() if v is not None))
        table(rows, AUDIT_COLUMNS, "no audit entries" + (f" since {args.since}" if args.since else ""))

    emit(args, [{**r, "time": iso_utc(r["time"])} for r in rows] if args.json else rows, human)
    return EXIT_OK


DETAIL_TIMES = frozenset({"exp", "expires", "since", "time"})  # audit details that are unix seconds


def _short(value: Any, key: str = "") -> str:
    """A detail's value on one line of a table: ids cut to 12 characters, lists joined,
    times as the local time."""
    if key in DETAIL_TIMES and isinstance(value, (int, float)) and not isinstance(value, bool):
        return when(value).replace(" ", "T")
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def audit_verify(args: argparse.Namespace) -> int:
    kept = _read_head(args.head) if args.head is not None else None
    if getattr(args, "key_file", None) is not None and not getattr(args, "store", None):
        raise UsageError("--key-file goes with --store URL (it unseals the audit key that store's signed head is checked with)")
    if args.state is not None:
        result = _verify_file(args.state, kept, str(args.head))
    elif getattr(args, "store", None):
        result = _verify_store(args.store, args.data_dir, kept, str(args.head), getattr(args, "key_file", None))
    else:
        result = call(args, "audit.verify", {"head": kept, "head_name": str(args.head)} if kept is not None else {})[0]

    def human() -> None:
        if result["ok"]:
            print(f"audit log intact: {result['entries']} entries, hash chain and head verified")
            for where in result.get("anchored") or []:
                print(f"matches the signed head {where}")
            if result.get("head"):
                print(f"head: {result['head']}  (keep a copy elsewhere: a rewritten chain would end in another)")
            for warning in result.get("warnings") or []:
                print(f"warning: {warning}")
        else:
            broken = result["broken"]
            print(f"audit log broken at entry {broken['id']}: {broken['reason']}")

    emit(args, result, human)
    return EXIT_OK if result["ok"] else EXIT_FAILED


def _read_head(path: Path) -> str:
    """The text of an audit head file the operator kept (audit verify --head)."""
    try:
        if path.stat().st_size > 4096:
            raise UsageError(f"--head {path} is not an audit head file (too large)")
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--head {path}: cannot read it: {exc}") from None


def _verify_file(path: Path, kept: str | None = None, kept_where: str = "--head") -> dict[str, Any]:
    """audit.verify on a state.db file, read-only (the controller may be stopped), against
    the signed head beside it (when its key is there too) and a kept copy."""
    import sqlite3
    from contextlib import closing

    if not path.is_file():
        raise UsageError(f"--state {path} is not a file")
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.row_factory = sqlite3.Row
            head = db.execute("SELECT value FROM meta WHERE key='audit_head'").fetchone()
            rows = db.execute("SELECT id, time, actor, action, address, detail, hash FROM audit ORDER BY id").fetchall()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"--state {path} is not a controller's state.db with an audit log: {exc}") from None
    from scaleout.store.audithead import HeadFile, verify

    return verify(rows, str(head[0]) if head is not None else None, HeadFile.load(path.parent), kept, kept_where)


def _verify_store(url: str, data_dir: Path | None, kept: str | None = None, kept_where: str = "--head", key_file: Path | None = None) -> dict[str, Any]:
    """audit.verify on a PostgreSQL store (one snapshot, read only), against the signed head the
    store keeps (checked with its audit key: unsealed with ``key_file``, else the one in
    ``data_dir``, any controller's on that store or the data dir it was migrated from) and a kept copy."""
    from urllib.parse import urlsplit

    from scaleout.store import vault
    from scaleout.store.audithead import HeadFile, verify
    from scaleout.store.pg import is_url
    from scaleout.store.state import AUDIT_ANCHOR, AUDIT_HEAD, State

    if not is_url(url):
        raise UsageError(f"--store must be a postgresql://USER[:PW]@HOST:PORT/DB URL, got {url.split('@')[-1]!r}")
    if not urlsplit(url).path.strip("/"):
        raise UsageError(f"--store names no database: postgresql://USER[:PW]@HOST:PORT/DB, got {url.split('@')[-1]!r}")
    key = vault.load_key(key_file) if key_file is not None else None
    st = State(url, migrate=False)
    try:
        with st.transaction(immediate=False):
            if st.db.execute("SELECT to_regclass('audit')").fetchone()[0] is None:
                raise UsageError(f"--store {url.split('@')[-1]} holds no Scaleout store (no audit table)")
            rows = st.db.execute("SELECT id, time, actor, action, address, detail, hash FROM audit ORDER BY id").fetchall()
            head = st.get_meta(AUDIT_HEAD)
            signed = st.get_meta(AUDIT_ANCHOR)
            audit_key = vault.opened(st.db, key, "audit.key") if key is not None else None
    finally:
        st.close()
    from_dir = HeadFile.load(data_dir) if data_dir is not None else None
    checker = HeadFile(audit_key, Path()) if audit_key is not None else from_dir
    if checker is None:
        where = (f"the key file {key_file} opens no audit.key in the store (no controller has started on it yet)" if key_file is not None
                 else f"no audit.key in {data_dir}" if data_dir is not None else "no key")
        no_key = f"{where} to check the store's signed audit head with: pass --key-file KEY (the controllers' key file) or --data-dir DIR (a controller's on this store, or the one it was migrated from)"
        if kept is None:  # nothing to check the log against: a usage error, not a verdict on the log
            raise UsageError(no_key)
        return verify(rows, head, None, kept, kept_where, no_key=no_key)
    return verify(rows, head, checker.in_store(signed), kept, kept_where)


COMMANDS: dict[tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
    ("token", "create"): token_create,
    ("token", "ls"): _tokens_command("token_ls"),
    ("token", "revoke"): _tokens_command("token_revoke"),
    ("client", "rm"): _tokens_command("client_rm"),
    ("combiner", "rm"): _tokens_command("combiner_rm"),
    ("package", "set-active"): package_set_active,
    ("model", "set-seed"): model_set_seed,
    ("model", "ls"): model_ls,
    ("model", "show"): model_show,
    ("model", "download"): model_download,
    ("session", "start"): session_start,
    ("session", "continue"): session_continue,
    ("model", "set-active"): model_set_active,
    ("session", "ls"): session_ls,
    ("session", "show"): session_show,
    ("session", "watch"): session_watch,
    ("session", "stop"): session_stop,
    ("client", "ls"): client_ls,
    ("status", None): status,
    ("combiner", "ls"): combiner_ls,
    ("metric", "ls"): metric_ls,
    ("audit", "ls"): audit_ls,
    ("audit", "verify"): audit_verify,
}
