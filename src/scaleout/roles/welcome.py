"""What `scaleout serve` tells a new user: the one-line commands that add a combiner and
clients, each with a join token (kept in the data dir, reused while valid for an hour more)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from scaleout.core.errors import AuthError
from scaleout.security import jointoken
from scaleout.security.tls import write_private

log = logging.getLogger("scaleout.controller")
MIN_LEFT_S = 3600
ADMIN_TOKEN_TTL = 365 * 86400


class Controller(Protocol):
    """What the welcome needs of the controller: its data dir, token check and desk."""

    dir: Path
    verifier: Any  # security.tokens.TokenVerifier
    ca_fingerprint: str | None
    desk: Any  # roles.enrolment.Desk


def join_token(ctl: Controller, role: str) -> str:
    """The data dir's join token for ``role``, or a new one (a day, any number of uses)."""
    from scaleout.roles.enrolment import JOIN_TTL_S

    path = ctl.dir / f"join-{role}.token"
    if path.exists():
        try:
            join = jointoken.parse(path.read_text().strip())
            claims = ctl.verifier.verify(join.token, time.time() + MIN_LEFT_S, roles={role})
            if claims.ca == ctl.ca_fingerprint and set(join.urls) == set(ctl.desk.urls()):
                return path.read_text().strip()
        except (AuthError, OSError):
            pass
    text = str(ctl.desk.issue(role, JOIN_TTL_S, name="serve", uses=None, sans=[], creator="controller")["join_token"])
    write_private(path, (text + "\n").encode())
    return text


def show_join_commands(ctl: Controller) -> None:
    """On a terminal, print the commands (stderr: stdout carries the ready line only);
    elsewhere (a service's log) name the files that hold the join tokens instead."""
    combiner, client = join_token(ctl, "combiner"), join_token(ctl, "client")
    if sys.stderr.isatty():
        print(
            "\nAdd a combiner (in another terminal, or on another machine):\n\n"
            f"  scaleout combine {combiner}\n\n"
            "Add clients (each in its own terminal):\n\n"
            f"  scaleout join {client}\n\n"
            "These join tokens last a day; make others with: scaleout token create --role client|combiner\n",
            file=sys.stderr, flush=True,
        )
    else:
        log.info("join tokens for a first combiner and clients: scaleout combine @%s / scaleout join @%s", ctl.dir / "join-combiner.token", ctl.dir / "join-client.token")


def write_admin_token(ctl: Controller) -> None:
    """The data dir's admin token (admin.token), written anew unless the one there is valid."""
    path = ctl.dir / "admin.token"
    if path.exists():
        try:
            ctl.verifier.verify(path.read_text().strip(), time.time(), roles={"admin"})
            return
        except AuthError:
            log.info("admin token in %s is no longer valid: writing a new one", path)
    token = ctl.desk.issue("admin", ADMIN_TOKEN_TTL, name="admin", uses=None, sans=[], creator="controller")["token"]
    write_private(path, (token + "\n").encode())
