"""What every role shell shares: the ready line, signal handling, ids."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sys

log = logging.getLogger("scaleout")


def announce(url: str) -> None:
    """Print the one line that tells users and tests where a role listens."""
    print(f"listening on {url}", flush=True)
    log.info("listening on %s", url)


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_hex(6)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop`` so the role drains; a second signal exits at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signame: str) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signame)
            sys.exit(130)
        log.info("%s received: shutting down", signame)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig.name)


def url_host(host: str) -> str:
    """The host part of a URL others can dial (a wildcard bind is dialled on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
