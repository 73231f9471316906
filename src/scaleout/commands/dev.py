"""`scaleout dev`: a whole federation on this machine, as real processes over TLS.

SIGINT, SIGTERM or SIGHUP stop every child (SIGTERM, then SIGKILL after a timeout; a
second signal kills them at once) and exit with 130. Tokens reach the children in
SCALEOUT_TOKEN, never on a command line anyone can read with `ps`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleout.commands.exits import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError
from scaleout.commands.admin import _round_line, call_async, client_failures, shown_reason
from scaleout.commands.connection import Connection, read_controller_info
from scaleout.core.errors import ScaleoutError
from scaleout.runtime import self_command

log = logging.getLogger("scaleout.dev")
START_TIMEOUT_S = 60.0


class DevError(Exception):
    pass


def scaleout_cmd() -> list[str]:
    """How to start another scaleout process: the same build as this one (the frozen binary,
    ``python3 scaleout.pyz`` or ``python -m scaleout``), never the source tree's."""
    return self_command()


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    drain: asyncio.Task[None] | None = None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {self.name}| {line}" for line in text[-lines:])


async def start_child(
    name: str, args: list[str], logs: Path, wait_listening: bool, level: str, env: dict[str, str] | None = None
) -> tuple[Child, str | None]:
    """Start `scaleout ARGS` with ``env`` added to ours; with ``wait_listening`` return the
    URL it announces (a child that fails to get ready is stopped, not left behind)."""
    log_path = logs / f"{name}.log"
    with open(log_path, "ab") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *scaleout_cmd(), *args, "--log-level", level,
            stdout=asyncio.subprocess.PIPE, stderr=log_file, stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    child = Child(name, proc, log_path)
    url = None
    if wait_listening:
        assert proc.stdout is not None
        try:
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
                if not line:
                    raise DevError(f"{name} exited before it was ready (exit code {await proc.wait()}):\n{child.tail()}")
                text = line.decode(errors="replace").strip()
                if text.startswith("listening on "):
                    url = text.removeprefix("listening on ")
                    break
        except asyncio.TimeoutError:
            await stop_children([child])
            raise DevError(f"{name} was not ready within {START_TIMEOUT_S:.0f}s:\n{child.tail()}") from None
        except asyncio.CancelledError:
            await stop_children([child])
            raise
    child.drain = asyncio.create_task(_drain(proc, log_path))
    return child, url


async def _drain(proc: asyncio.subprocess.Process, log_path: Path) -> None:
    assert proc.stdout is not None
    with open(log_path, "ab") as fh:
        while line := await proc.stdout.readline():
            fh.write(line)


async def stop_children(children: list[Child], timeout: float = 10.0) -> None:
    """SIGTERM everyone (clients first), wait for them all at once (``timeout`` in all, not
    per child), then SIGKILL whoever is still running."""
    for child in reversed(children):
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    waits = {asyncio.ensure_future(child.proc.wait()): child for child in children}
    if waits:
        _, late = await asyncio.wait(waits, timeout=timeout)
        for wait in late:
            child = waits[wait]
            log.warning("%s did not stop within %.0fs: killing it", child.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
        if late:
            await asyncio.wait(late)
    for child in children:
        if child.drain is not None:
            child.drain.cancel()


class Interrupts:
    """SIGINT/SIGTERM/SIGHUP cancel the main task, whose ``finally`` stops the children;
    a signal while they are being stopped kills them at once."""

    def __init__(self, main: asyncio.Task[Any], children: list[Child]) -> None:
        self.main = main
        self.children = children
        self.stopping = False
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig.name)

    def _on_signal(self, signame: str) -> None:
        if not self.stopping:
            log.warning("%s received: stopping the federation", signame)
            self.stopping = True
            self.main.cancel()
            return
        log.warning("%s received while stopping: killing the federation", signame)
        for child in self.children:
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()


async def wait_for_clients(conn: Connection, children: list[Child], count: int, timeout: float) -> None:
    """Until ``count`` clients are connected; a child that exits meanwhile ends the wait with its log."""
    waiting = asyncio.create_task(call_async(conn, "client.wait", {"count": count, "timeout": timeout}))
    while not waiting.done():
        dead = [c for c in children if c.proc.returncode is not None]
        if dead:
            waiting.cancel()
            raise DevError(f"{dead[0].name} exited (code {dead[0].proc.returncode}):\n{dead[0].tail()}")
        await asyncio.wait({waiting}, timeout=0.5)  # a poll of the children, not a synchronisation
    await waiting


async def _keep_up(ctl_dir: Path, say: Any) -> None:
    """``--keep``: the federation stays up until a signal (see Interrupts), which ends dev
    with the session's outcome rather than as interrupted."""
    say(f"the federation stays up: scaleout command run NAME --data-dir {ctl_dir} (or predict run, client ls, ...); Ctrl-C stops it")
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        pass


def report_of(session: dict[str, Any], failures: dict[int, list[dict[str, str]]] | None = None) -> dict[str, Any]:
    return {
        "session": {"id": session["id"], "status": session["status"], "reason": session.get("reason")},
        "rounds": [
            {
                "index": r["idx"],
                "status": "succeeded" if r["status"] == "succeeded" else "failed",
                "model_id": r["model_id"],
                "participants": len(r["participants"]),
                "clients": r["participants"],
                "duration_s": r["duration_s"],
                "validation": r["validation"],
                "reason": r["reason"],
                "failures": (failures or {}).get(r["idx"], []),
            }
            for r in session["rounds"]
        ],
    }


async def _watch_in_tui(conn: Connection, session_id: str, args: argparse.Namespace, say: Any) -> dict[str, Any]:
    """Open the TUI on the federation until the user quits it; the report is the session as it
    was then (the caller stops the federation)."""
    from scaleout.tui.app import ScaleoutApp

    await ScaleoutApp(conn, title=f"dev: {args.clients} clients on {args.combiners} combiner(s)").run_async()
    session = (await call_async(conn, "session.show", {"id": session_id}))[0]["session"]
    say(f"session {session_id} {session['status']}: stopping the federation")
    return report_of(session)


def main(args: argparse.Namespace) -> int:
    path: Path = args.path
    from scaleout.package.project import project_file

    if project_file(path) is None:
        raise UsageError(f"{path} is not a compute package (no scaleout.yaml in it)")
    for flag in ("clients", "combiners", "rounds"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")
    try:
        settings = json.loads(args.settings)
    except ValueError as exc:
        raise UsageError(f"--settings is not valid JSON: {exc}") from None
    # Mistakes found before a whole federation is started for nothing.
    from scaleout.core.config import SessionConfig

    SessionConfig(rounds=args.rounds, round_timeout=args.round_timeout, min_clients=args.clients, validate=args.validate, settings=settings)
    if args.report is not None and not args.report.parent.resolve().is_dir():
        raise UsageError(f"--report {args.report}: folder {args.report.parent} does not exist")
    if args.data_dir is not None and args.data_dir.exists() and not args.data_dir.is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is a file, not a folder")
    # Without --headless the TUI opens on the federation, when there is a terminal to open it on.
    args.interactive = not args.headless and sys.stdin.isatty() and sys.stdout.isatty()
    if not args.headless and not args.interactive:
        log.info("not a terminal: printing rounds as text (as with --headless)")
    if args.data_dir is None:
        root = Path(tempfile.mkdtemp(prefix="scaleout-dev-"))
    else:
        root = args.data_dir.resolve()
        root.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []  # what went wrong, so far: the logs that explain it are kept
    try:
        report = asyncio.run(_dev(args, path.resolve(), root, settings, failed))
    except asyncio.CancelledError:  # a signal stopped the federation (see Interrupts)
        return EXIT_INTERRUPTED
    finally:
        if failed:
            ctl = root / "controller"
            kept = "" if args.data_dir is not None else " (kept because something failed; remove it when done)"
            print(f"logs are in {root / 'logs'}" + (f", the controller's data in {ctl}" if ctl.is_dir() else "") + kept, flush=True)
        elif args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}")
    ok = report["session"]["status"] == "finished" and all(r["status"] == "succeeded" for r in report["rounds"])
    if args.interactive and report["session"]["id"] is not None:  # the user quit the TUI: that is how it ends
        ok = all(r["status"] in ("succeeded", "running") for r in report["rounds"])
    return EXIT_OK if ok else EXIT_FAILED


async def _dev(args: argparse.Namespace, package_dir: Path, root: Path, settings: dict[str, Any], failed: list[str]) -> dict[str, Any]:
    from scaleout.package.archive import create_archive
    from scaleout.package.seed import read_model_file

    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    level = args.log_level or "info"
    say = lambda text: print(text, flush=True)  # noqa: E731
    children: list[Child] = []
    main = asyncio.current_task()
    assert main is not None
    interrupts = Interrupts(main, children)
    try:
        say(f"building the seed model: scaleout run build -p {package_dir}")
        build_dir = root / "build"
        package_flags = [*(["--managed-env"] if getattr(args, "managed_env", False) else [])]
        build_argv = ["run", "build", "-p", str(package_dir), "-o", str(build_dir), *package_flags]
        build, _ = await start_child("build", build_argv, logs, False, level)
        try:
            built = await build.proc.wait()
        except asyncio.CancelledError:
            await stop_children([build])
            raise
        if built != 0:
            raise DevError(f"run build failed:\n{build.tail()}")
        seeds = sorted(p for p in build_dir.iterdir() if p.suffix in (".npz", ".safetensors"))
        if not seeds:
            raise DevError(f"build() wrote no .npz or .safetensors file into {build_dir}")
        archive = create_archive(package_dir, root / f"{package_dir.name}.tgz")
        say(f"packed {archive.name} ({archive.stat().st_size} bytes)")

        ctl_dir = root / "controller"
        controller, _ = await start_child("controller", ["serve", "--data-dir", str(ctl_dir), "--host", "127.0.0.1", "--port", "0"], logs, True, level)
        children.append(controller)
        info = read_controller_info(ctl_dir)
        conn = Connection(info["url"], (ctl_dir / "admin.token").read_text().strip(), Path(info["ca"]), False)
        say(f"controller listening on {conn.url} (data in {ctl_dir})")
        await call_async(conn, "package.set_active", {"name": archive.name}, archive.read_bytes())
        seed, _ = await call_async(conn, "model.set_seed", {}, read_model_file(seeds[0]))
        say(f"seed model {seed['id'][:12]} from {seeds[0].name}")

        combiner_token = (await call_async(conn, "token.create", {"role": "combiner", "ttl_s": 86400, "name": "dev"}))[0]["token"]
        client_token = (await call_async(conn, "token.create", {"role": "client", "ttl_s": 86400, "name": "dev"}))[0]["token"]
        common = ["--controller", conn.url, "--ca", str(conn.ca)]
        for i in range(1, args.combiners + 1):
            name = f"combiner-{i}"
            argv = ["combine", *common, "--name", name, "--port", "0", "--state-dir", str(root / "combiners" / name)]
            child, url = await start_child(name, argv, logs, True, level, env={"SCALEOUT_TOKEN": combiner_token})
            children.append(child)
            say(f"{name} listening on {url}")
        for i in range(1, args.clients + 1):
            name = f"client-{i}"
            work = root / "clients" / name
            argv = ["join", *common, "--name", name, "--work-dir", str(work), *package_flags]
            if getattr(args, "dispatcher", False):
                argv.append("--dispatcher")
            child, _ = await start_child(name, argv, logs, False, level, env={"SCALEOUT_TOKEN": client_token})
            children.append(child)
        await wait_for_clients(conn, children, args.clients, START_TIMEOUT_S)
        say(f"{args.clients} clients joined on {args.combiners} combiner(s)")

        cfg = {
            "rounds": args.rounds, "round_timeout": args.round_timeout, "min_clients": args.clients,
            "validate": args.validate, "settings": settings, "name": "dev",
        }
        started = time.monotonic()
        session = (await call_async(conn, "session.start", cfg))[0]["session"]
        session_id = session["id"]
        say(f"session {session_id}: {args.rounds} round{'' if args.rounds == 1 else 's'}")
        names = [f"client-{i}" for i in range(1, args.clients + 1)]
        if args.interactive:
            return await _watch_in_tui(conn, session_id, args, say)
        ended: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        printed: set[int] = set()
        failures: dict[int, list[dict[str, str]]] = {}

        async def print_rounds() -> None:
            """Each round line as it ends, with why clients were left out under it."""
            while (r := await ended.get()) is not None:
                if r["idx"] in printed:
                    continue
                printed.add(r["idx"])
                say(f"  {_round_line(r)}")
                try:
                    shown = (await call_async(conn, "session.show", {"id": session_id, "clients": True}))[0]["session"]
                except (ScaleoutError, OSError) as exc:
                    log.warning("cannot fetch the clients' results of round %d: %s", r["idx"], exc)
                    shown = {"rounds": []}
                reports: list[dict[str, Any]] = next((x.get("clients", []) for x in shown["rounds"] if x["idx"] == r["idx"]), [])
                failures[r["idx"]] = client_failures(r, reports, names)
                for f in failures[r["idx"]]:
                    say(f"      {f['client']}: {shown_reason(f['reason'])}")
                if r["status"] != "succeeded":
                    failed.append(f"round {r['idx']}")

        printer = asyncio.create_task(print_rounds())
        try:
            session = (await call_async(conn, "session.wait", {"id": session_id}, on_event=lambda kind, data: ended.put_nowait(data) if kind == "round" else None))[0]["session"]
            for r in session["rounds"]:  # rounds that ended before we subscribed
                ended.put_nowait(r)
            ended.put_nowait(None)
            await printer
        finally:
            printer.cancel()
        if session["status"] != "finished":
            failed.append(f"session {session_id}")
        say(f"session {session_id} {session['status']} in {time.monotonic() - started:.1f}s" + (f" ({session['reason']})" if session.get("reason") else ""))
        if getattr(args, "keep", False):
            await _keep_up(ctl_dir, say)
        return report_of(session, failures)
    except DevError as exc:
        failed.append(str(exc))
        say(f"dev federation failed: {exc}")
        return {"session": {"id": None, "status": "failed", "reason": str(exc).splitlines()[0]}, "rounds": []}
    finally:
        interrupts.stopping = True
        await stop_children(children)
