"""Enrolment as a node does it: find its identity in its state dir, or show the controller
its join token once and keep the credential it gets back (0600)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from scaleout.core.errors import AuthError, ConfigError, RemoteError
from scaleout.security import identity, tokens
from scaleout.security.jointoken import fingerprint_key

if TYPE_CHECKING:
    from scaleout.transport.dialer import Controllers

log = logging.getLogger("scaleout")


@dataclass
class Enrolled:
    """A node's identity and where it is kept; ``token`` is what it connects with."""

    ident: identity.Identity
    path: Path

    @property
    def token(self) -> str:
        return self.ident.token

    @property
    def name(self) -> str:
        return self.ident.name

    def renew(self, token: object) -> None:
        """Keep a fresh credential the controller handed back (past half the old one's life)."""
        if not isinstance(token, str) or token == self.ident.token:
            return
        try:
            claims = tokens.peek(token)
        except AuthError:
            return
        if claims.nid == self.ident.id and claims.sub == self.ident.name:
            self.ident = replace(self.ident, token=token)
            identity.save(self.path, self.ident)
            log.info("renewed this node's credential (%s)", self.path)


def _learned_path(node: Enrolled) -> Path:
    return node.path.with_name(node.path.name.removesuffix(".json") + ".controllers")  # beside its identity


def learned_controllers(node: Enrolled) -> list[str]:
    """The controller addresses this node was told of and kept (learn), so a node restarted
    while the controller it was given is down still dials the others; none if none kept."""
    try:
        urls = json.loads(_learned_path(node).read_text())
    except (OSError, ValueError):
        return []
    return [u for u in urls if isinstance(u, str)] if isinstance(urls, list) else []


async def learn(controllers: Controllers, urls: object, node: Enrolled | None, logger: logging.Logger = log) -> list[str]:
    """Add the controller addresses the active controller told of to those this node dials
    (after the ones it was given: Controllers.add says why that is safe), say so, and keep
    them beside its identity; returns the new ones."""
    new = controllers.add(urls)
    if new and node is not None:
        try:
            await asyncio.to_thread(_keep_learned, _learned_path(node), controllers.learned)
        except OSError as exc:  # a read-only state dir: only a restart during an outage misses them
            logger.warning("could not keep the learned controller addresses beside %s: %s", node.path, exc)
    for url in new:
        logger.info("learned controller %s (dialled after %s)", url, ", ".join(controllers.urls[: controllers.given]))
    return new


def _keep_learned(path: Path, urls: list[str]) -> None:
    from scaleout.security.tls import write_private

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, (json.dumps(urls) + "\n").encode())


def controller_key(url: str, ca: Path | None) -> str:
    from scaleout.security.tls import fingerprint

    fp = None
    if ca is not None:
        try:
            fp = fingerprint(Path(ca).read_bytes())
        except (OSError, ConfigError):
            fp = None
    return fingerprint_key(fp, url)


def choose_name(role: str, given: str, token: str, state_dir: Path, key: str) -> str | None:
    """The node's name: --name, else the one its credential is for, else the one identity
    for this controller in the state dir; None when there is nothing to go by."""
    if given:
        return given
    try:
        claims = tokens.peek(token)
    except AuthError:
        return None
    if claims.nid is not None and claims.sub:  # a node's own credential names its node
        return claims.sub
    names = identity.names_in(state_dir, key, role)
    unnamed = _unnamed_marker(state_dir, key, role)
    try:
        remembered = unnamed.read_text().strip()
    except OSError:
        remembered = ""
    if remembered in names:  # the identity the same command without --name made before
        return remembered
    if len(names) == 1:
        return names[0]
    if len(names) > 1:
        raise ConfigError("name", f"{state_dir} holds several {role} identities for this controller ({', '.join(names)}): pass --name")
    return None


def _unnamed_marker(state_dir: Path, key: str, role: str) -> Path:
    return state_dir / f"unnamed-{key}-{role}"  # beside the identities folder, which holds identities only


def remember_unnamed(role: str, name: str, state_dir: Path, key: str) -> None:
    """Note that a command without --name is node ``name``: the same command is that node
    again, however many named ones share the state dir."""
    marker = _unnamed_marker(state_dir, key, role)
    try:
        if marker.exists() and marker.read_text().strip() == name:
            return
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker.write_text(name + "\n")
    except OSError as exc:  # a read-only state dir: only the convenience is lost
        log.warning("could not note %s as the node of commands without --name (%s)", name, exc)


async def enrolled(role: str, name: str, url: str, token: str, ca: Path | None, ctx: ssl.SSLContext | None, state_dir: Path) -> Enrolled:
    """This node's identity at the controller at ``url``: from the state dir, or enrolled
    now with ``token`` (a join token's credential). A refusal raises AuthError."""
    from scaleout.transport.dialer import Controllers

    key = controller_key(url, ca)
    path = identity.path_for(state_dir, key, role, name)
    ident = identity.load(path)
    if ident is not None:
        return Enrolled(ident, path)
    try:
        claims: tokens.TokenClaims | None = tokens.peek(token)
    except AuthError:
        claims = None  # the controller refuses it, saying why
    if claims is not None and claims.nid is not None:  # given a node credential itself (e.g. in a config file)
        if claims.sub != name:
            raise AuthError(f"this credential belongs to {claims.role} {claims.sub!r}, not {name!r}")
        return Enrolled(identity.Identity(claims.nid, role, name, token, url, claims.ca), path)
    # The secret of this enrolment, kept before the controller counts it: a node that could
    # not keep its credential (a full disk) finishes the same enrolment with it later.
    started = path.with_name(path.name.removesuffix(".json") + ".enrolling")
    try:
        secret = started.read_text().strip() if started.exists() else ""
    except OSError:
        secret = ""
    if not 16 <= len(secret) <= 256:
        import secrets

        secret = secrets.token_urlsafe(32)
        started.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        from scaleout.security.tls import write_private

        write_private(started, (secret + "\n").encode())
    try:
        result, _ = await Controllers(url).ask(token, ctx, "node.enrol", {"name": name, "key": secret}, max_payload=1 << 20, timeout=30)
    except RemoteError as exc:
        if exc.code in ("unauthorized", "conflict", "bad_message"):
            raise AuthError(f"the controller refused to enrol this {role}: {exc}") from None
        raise
    ident = identity.Identity(str(result["id"]), role, name, str(result["token"]), url, claims.ca if claims else None)
    identity.save(path, ident)
    started.unlink(missing_ok=True)
    log.info("enrolled as %s %s; identity kept in %s", role, name, path)
    return Enrolled(ident, path)
