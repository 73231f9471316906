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
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleout.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError
from scaleout.commands.admin import _round_line, call_async
from scaleout.commands.connection import Connection, read_controller_info

log = logging.getLogger("scaleout.dev")
START_TIMEOUT_S = 60.0


class DevError(Exception):
    pass


def scaleout_cmd() -> list[str]:
    """How to start another scaleout process (frozen binaries are their own interpreter)."""
    return [sys.executable] if getattr(sys, "frozen", False) else [sys.executable, "-m", "scaleout"]


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
    """SIGTERM everyone (clients first), then SIGKILL whoever is still running."""
    for child in reversed(children):
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            await asyncio.wait_for(child.proc.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.0fs: killing it", child.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            await child.proc.wait()
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


def report_of(session: dict[str, Any]) -> dict[str, Any]:
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
            }
            for r in session["rounds"]
        ],
    }


def main(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not (path / "scaleout.yaml").is_file():
        raise UsageError(f"{path} is not a compute package (no scaleout.yaml in it)")
    for flag in ("clients", "combiners", "rounds"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")
    try:
        settings = json.loads(args.settings)
    except ValueError as exc:
        raise UsageError(f"--settings is not valid JSON: {exc}") from None
    with contextlib.ExitStack() as stack:
        if args.data_dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scaleout-dev-")))
        else:
            root = args.data_dir.resolve()
            root.mkdir(parents=True, exist_ok=True)
        try:
            report = asyncio.run(_dev(args, path.resolve(), root, settings))
        except asyncio.CancelledError:  # a signal stopped the federation (see Interrupts)
            return EXIT_INTERRUPTED
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report written to {args.report}")
    ok = report["session"]["status"] == "finished" and all(r["status"] == "succeeded" for r in report["rounds"])
    return EXIT_OK if ok else EXIT_FAILED


async def _dev(args: argparse.Namespace, package_dir: Path, root: Path, settings: dict[str, Any]) -> dict[str, Any]:
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
        build, _ = await start_child("build", ["run", "build", "-p", str(package_dir), "-o", str(build_dir)], logs, False, level)
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
            argv = ["combine", *common, "--name", name, "--port", "0"]
            child, url = await start_child(name, argv, logs, True, level, env={"SCALEOUT_TOKEN": combiner_token})
            children.append(child)
            say(f"{name} listening on {url}")
        for i in range(1, args.clients + 1):
            name = f"client-{i}"
            work = root / "clients" / name
            argv = ["join", *common, "--name", name, "--work-dir", str(work)]
            child, _ = await start_child(name, argv, logs, False, level, env={"SCALEOUT_TOKEN": client_token})
            children.append(child)
        waiting = asyncio.create_task(call_async(conn, "client.wait", {"count": args.clients, "timeout": START_TIMEOUT_S}))
        while not waiting.done():
            dead = [c for c in children if c.proc.returncode is not None]
            if dead:
                waiting.cancel()
                raise DevError(f"{dead[0].name} exited (code {dead[0].proc.returncode}):\n{dead[0].tail()}")
            await asyncio.wait({waiting}, timeout=0.5)
        await waiting
        say(f"{args.clients} clients joined on {args.combiners} combiner(s)")

        cfg = {
            "rounds": args.rounds, "round_timeout": args.round_timeout, "min_clients": args.clients,
            "validate": args.validate, "settings": settings, "name": "dev",
        }
        started = time.monotonic()
        session = (await call_async(conn, "session.start", cfg))[0]["session"]
        say(f"session {session['id']}: {args.rounds} rounds")
        printed: set[int] = set()

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "round":
                printed.add(data["idx"])
                say(f"  {_round_line(data)}")

        session = (await call_async(conn, "session.wait", {"id": session["id"]}, on_event=on_event))[0]["session"]
        for r in session["rounds"]:
            if r["idx"] not in printed:
                on_event("round", r)
        say(f"session {session['id']} {session['status']} in {time.monotonic() - started:.1f}s" + (f" ({session['reason']})" if session.get("reason") else ""))
        return report_of(session)
    except DevError as exc:
        say(f"dev federation failed: {exc}")
        say(f"logs are in {logs}" + ("" if args.data_dir else " (pass --data-dir to keep them)"))
        return {"session": {"id": None, "status": "failed", "reason": str(exc).splitlines()[0]}, "rounds": []}
    finally:
        interrupts.stopping = True
        await stop_children(children)
