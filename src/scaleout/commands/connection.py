"""Find the controller: flags, then SCALEOUT_* variables, then a config file, then a local controller's data dir."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleout.commands.exits import UsageError

DEFAULT_DATA_DIR = Path("scaleout-data")


@dataclass
class Connection:
    url: str  # one controller address, or several joined by commas (active and standbys): transport/dialer.py dials them
    token: str
    ca: Path | None
    insecure: bool


def resolve(args: argparse.Namespace, file_settings: dict[str, Any] | None = None) -> Connection:
    """Find the controller: each of address, token and CA comes from the first place that
    has it, in this order: flags, the SCALEOUT_* variables, the config file, ./scaleout-data.

    A data dir (``--data-dir``, or ``data_dir`` in the file) stands for its controller's
    address, admin token and CA, in its own place in that order: ``--data-dir`` given on the
    command line wins over the environment, a flag given beside it wins over the dir.
    """
    conf = file_settings or {}
    places: list[tuple[Any, Any, Any, Any]] = [
        (args.controller, args.token, args.ca, getattr(args, "data_dir", None)),
        (os.environ.get("SCALEOUT_CONTROLLER"), os.environ.get("SCALEOUT_TOKEN"), os.environ.get("SCALEOUT_CA"), None),
        (conf.get("controller"), conf.get("token"), conf.get("ca"), conf.get("data_dir")),
        (None, None, None, DEFAULT_DATA_DIR if (DEFAULT_DATA_DIR / "controller.json").exists() else None),
    ]
    first_token = next((t for _, t, _, _ in places if t), None)
    if isinstance(first_token, str) and _is_join_token(first_token):
        places[3] = (None, None, None, None)  # a join token names its controller: not ./scaleout-data's
    # The first place naming a controller (an address or a data dir) decides which one it is;
    # a data dir lends its token and CA only from that place, never to another controller.
    where = next((i for i, (url, _, _, data_dir) in enumerate(places) if url or data_dir is not None), None)
    home = Path(places[where][3]) if where is not None and places[where][3] is not None else None
    info = read_controller_info(home) if home is not None else {}
    url = (places[where][0] or info.get("url")) if where is not None else None
    token = ca = None
    for i, (_, place_token, place_ca, _) in enumerate(places):
        if token is None and place_token:
            token = place_token
        if ca is None and place_ca:
            ca = place_ca
        if i == where and home is not None:
            if token is None:
                token_file = home / "admin.token"
                if not token_file.exists():
                    raise UsageError(f"no admin token in {home} (a standby controller writes its own when it becomes active: meanwhile give --token, or the active one's --data-dir)")
                token = _read(token_file, "admin token").strip()
            if ca is None and info.get("ca"):
                ca = home / "ca.pem"
    insecure = args.insecure is True or conf.get("insecure") is True or (home is not None and not info.get("ca"))
    if token and token.startswith("@"):
        token = _read(Path(token[1:]), "token file").strip()
    from scaleout.security.jointoken import is_join_token

    if token:
        if is_join_token(token):
            token, url, ca = _unwrap(token, url, ca, insecure, getattr(args, "state_dir", None) or getattr(args, "work_dir", None) or conf.get("state_dir"))
    if token and not is_join_token(token) and (not url or token.startswith(TOKEN_PREFIX)):
        from scaleout.core.errors import AuthError
        from scaleout.security.tokens import peek

        try:  # a token cut or mistyped is the user's typo (exit 2), as a malformed join token is
            claims = peek(token)
        except AuthError as exc:
            raise UsageError(f"{exc} (expected sco1.<...> or SCALEOUT-1.<...> as printed by scaleout token create)") from None
        url = url or claims.controller
    if not url:
        raise UsageError("no controller given: pass --controller URL (or set SCALEOUT_CONTROLLER), or --data-dir DIR of a local controller")
    if not token:
        raise UsageError("no token given: pass --token (or set SCALEOUT_TOKEN); create one with: scaleout token create")
    from scaleout.transport.dialer import controller_urls

    urls = controller_urls(str(url))
    for one in urls or (str(url),):
        if not one.startswith(("ws://", "wss://")):
            raise UsageError(f"controller address must start with wss:// (or ws:// with --insecure), got {one!r}")
        if one.startswith("ws://") and not insecure:
            raise UsageError(f"{one} is not TLS; pass --insecure to connect without it")
    url = ",".join(urls)
    ca_path = Path(ca).absolute() if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise UsageError(f"CA file {ca_path} does not exist (the controller writes it to its DATA_DIR/ca.pem)")
    return Connection(str(url), str(token), ca_path, insecure)


TOKEN_PREFIX = "sco1."  # security/tokens.py's tokens: a look-alike that does not parse is malformed


def _is_join_token(token: str) -> bool:
    from scaleout.security.jointoken import is_join_token

    if token.startswith("@"):
        try:
            token = Path(token[1:]).read_text().strip()
        except OSError:
            return False
    return is_join_token(token)


def _unwrap(text: str, url: Any, ca: Any, insecure: bool, state_dir: Any) -> tuple[str, Any, Any]:
    """A join token's credential, and the controller address and CA it names unless given:
    its CA is downloaded and checked against the fingerprint it pins, then kept in the
    state dir (an address or CA given beside the token wins)."""
    import asyncio

    from scaleout.core.errors import AuthError
    from scaleout.security.identity import default_state_dir
    from scaleout.security.jointoken import parse
    from scaleout.transport.discovery import pin_ca

    try:
        join = parse(text)
    except AuthError as exc:
        raise UsageError(str(exc)) from None
    from scaleout.transport.dialer import controller_urls

    urls = controller_urls(url) if url else join.urls
    if ca or insecure or join.ca is None:
        return join.token, ",".join(urls), ca
    chosen, ca_path = asyncio.run(pin_ca(tuple(urls), join.ca, Path(state_dir) if state_dir else default_state_dir()))
    return join.token, ",".join([chosen, *(u for u in urls if u != chosen)]), ca_path


def read_controller_info(data_dir: Path) -> dict[str, Any]:
    """What a started controller wrote to DIR/controller.json: its "url" and its "ca" file."""
    info_file = data_dir / "controller.json"
    if not info_file.exists():
        raise UsageError(f"{data_dir} is not the data directory of a started controller (no {info_file.name}); start one with: scaleout serve --data-dir {data_dir}")
    try:
        info = json.loads(_read(info_file, "controller address file"))
        problem = None if isinstance(info, dict) else "not a JSON object"
    except ValueError:
        problem = "not valid JSON"
    if problem is None and not (isinstance(info.get("url"), str) and info["url"]):
        problem = "no controller address in it"
    if problem is None and not isinstance(info.get("ca"), str | None):
        problem = "its CA entry is not a file name"
    if problem is None and info["url"].startswith("wss://") and not info.get("ca"):
        problem = "a wss:// address but no CA file"
    if problem is not None:
        raise UsageError(f"{info_file} is damaged ({problem}); restart the controller to rewrite it: scaleout serve --data-dir {data_dir}")
    return dict(info)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
