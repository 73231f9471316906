"""`scaleout tui`: the Textual app on this terminal, or served to a browser with --web."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from scaleout.commands.exits import EXIT_OK, UsageError
from scaleout.commands.connection import Connection, resolve


def main(args: argparse.Namespace) -> int:
    conn = resolve(args)
    _check_token(conn, args.session)
    if args.web:
        return serve_web(conn, args.host, args.port, args.session, args.max_sessions)
    # Served to a browser (tui --web), the app talks to textual-serve over pipes through its web driver.
    if not os.environ.get("TEXTUAL_DRIVER") and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("scaleout tui needs a terminal (stdin and stdout); to watch from a script use: scaleout session watch --json")
    os.environ.pop("SCALEOUT_TOKEN", None)  # resolved: nothing this process starts inherits it
    return run_app(conn, args.session)


def _check_token(conn: Connection, session_id: str | None = None) -> None:
    """A token the controller refuses (or a certificate we cannot trust) ends here with one
    line and exit 3; a controller that is not up yet does not: the app waits for it."""
    from scaleout.commands.admin import call_async
    from scaleout.core.errors import AuthError, NotFoundError, RemoteError
    from scaleout.transport.net import ConnectError, TrustError

    try:
        asyncio.run(call_async(conn, "status"))
        if session_id:
            asyncio.run(call_async(conn, "session.show", {"id": session_id}))
    except TrustError:
        raise
    except ConnectError:
        return
    except RemoteError as exc:
        if exc.code == AuthError.code:
            raise AuthError(f"{exc} (scaleout tui needs an admin token)") from None
        if session_id and exc.code == NotFoundError.code:
            raise UsageError(f"{exc} (see scaleout session ls)") from None
        raise


def run_app(conn: Connection, session_id: str | None = None) -> int:
    from scaleout.tui.app import ScaleoutApp

    ScaleoutApp(conn, session_id=session_id).run()
    return EXIT_OK


def serve_web(conn: Connection, host: str, port: int, session_id: str | None = None, max_sessions: int = 3) -> int:
    """Serve the app to browsers: each page runs its own `scaleout tui` (tui/web.py).

    The controller's address, token and CA reach those processes in SCALEOUT_* variables of
    their own environment, never on a command line. Only the URL printed at start (it carries
    a per-launch key) opens the page; the server listens on 127.0.0.1 unless told otherwise
    (reach it through an SSH tunnel)."""
    try:
        from scaleout.tui.web import WebTUI
    except ImportError:
        from scaleout.runtime import missing_module_hint

        raise UsageError(f"scaleout tui --web needs textual-serve: {missing_module_hint('textual_serve')}") from None
    from scaleout.runtime import self_command

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 to 65535, got {port}")
    if not 1 <= max_sessions <= 100:
        raise UsageError(f"--max-sessions must be 1 to 100, got {max_sessions}")
    env = {"SCALEOUT_CONTROLLER": conn.url, "SCALEOUT_TOKEN": conn.token}
    if conn.ca is not None:
        env["SCALEOUT_CA"] = str(conn.ca)
    command = [*self_command(), "tui"]
    if conn.insecure:
        command.append("--insecure")
    if session_id:
        command += ["--session", session_id]
    web_tui = WebTUI(command, env, host, max_sessions)
    return asyncio.run(_serve(web_tui, host, port))


async def _serve(web_tui: Any, host: str, port: int) -> int:
    """Listen (port 0 picks a free one), say where on one line, serve until SIGINT or SIGTERM,
    then end every app process it started."""
    import signal

    from aiohttp import web

    from scaleout.commands.exits import EXIT_INTERRUPTED

    runner = web.AppRunner(web_tui.make_app(), handle_signals=False, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    stop = asyncio.Event()
    got: list[int] = []
    loop = asyncio.get_running_loop()

    def stopping(sig: int) -> None:
        got.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping, sig)
    try:
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        web_tui.port = bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"serving the TUI on http://{shown}:{bound}/?key={web_tui.key} (Ctrl-C stops it; "
            f"whoever has this URL acts as admin; at most {web_tui.max_sessions} pages at once)",
            flush=True,
        )
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: --host {host} lets anyone who reaches this port and has the URL act as admin; prefer an SSH tunnel to 127.0.0.1", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await web_tui.close_all()
        await runner.cleanup()
    return EXIT_INTERRUPTED if got and got[0] == signal.SIGINT else EXIT_OK
