"""`scaleout tui`: the Textual app on this terminal, or served to a browser with --web."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from typing import Any

from scaleout.cli import EXIT_OK, UsageError
from scaleout.commands.connection import Connection, resolve


def main(args: argparse.Namespace) -> int:
    conn = resolve(args)
    _check_token(conn, args.session)
    if args.web:
        return serve_web(conn, args.host, args.port, args.session)
    # Served to a browser (tui --web), the app talks to textual-serve over pipes through its web driver.
    if not os.environ.get("TEXTUAL_DRIVER") and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("scaleout tui needs a terminal (stdin and stdout); to watch from a script use: scaleout session watch --json")
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


def serve_web(conn: Connection, host: str, port: int, session_id: str | None = None) -> int:
    """Serve the app to browsers (textual-serve): each page runs its own `scaleout tui`.

    The controller's address, token and CA reach those processes in SCALEOUT_* variables,
    never on a command line. Whoever can open the page acts as this admin: the server
    listens on 127.0.0.1 unless told otherwise (reach it through an SSH tunnel)."""
    try:
        from textual_serve.server import Server
    except ImportError:
        from scaleout.runtime import missing_module_hint

        raise UsageError(f"scaleout tui --web needs textual-serve: {missing_module_hint('textual_serve')}") from None
    from scaleout.runtime import self_command

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 to 65535, got {port}")
    os.environ["SCALEOUT_CONTROLLER"] = conn.url
    os.environ["SCALEOUT_TOKEN"] = conn.token
    if conn.ca is not None:
        os.environ["SCALEOUT_CA"] = str(conn.ca)
    command = [*self_command(), "tui"]
    if conn.insecure:
        command.append("--insecure")
    if session_id:
        command += ["--session", session_id]

    class Quiet(Server):  # type: ignore[misc]
        async def on_startup(self, app: Any) -> None:  # no banner: one ready line, below
            pass

    server = Quiet(shlex.join(command), host=host, port=port, title="scaleout")
    asyncio.run(_serve(server, host, port))
    return EXIT_OK


async def _serve(server: Any, host: str, port: int) -> None:
    """Listen (port 0 picks a free one), say where on one line, serve until interrupted."""
    from aiohttp import web

    runner = web.AppRunner(await server._make_app(), handle_signals=False)
    await runner.setup()
    try:
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        bound = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        server.public_url = f"http://{shown}:{bound}"  # the page's own links and websocket
        print(f"serving the TUI on {server.public_url} (Ctrl-C stops it; whoever opens the page acts as admin)", flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: --host {host} lets anyone who reaches this port act as admin; prefer an SSH tunnel to 127.0.0.1", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
