"""Find the controller: flags, then SCALEOUT_* variables, then a local controller's data dir."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaleout.cli import UsageError

DEFAULT_DATA_DIR = Path("scaleout-data")


@dataclass
class Connection:
    url: str
    token: str
    ca: Path | None
    insecure: bool


def resolve(args: argparse.Namespace, file_settings: dict[str, Any] | None = None) -> Connection:
    """Resolve --controller/--token/--ca from flags, a config file, the environment or --data-dir."""
    conf = file_settings or {}
    url = args.controller or conf.get("controller") or os.environ.get("SCALEOUT_CONTROLLER")
    token = args.token or conf.get("token") or os.environ.get("SCALEOUT_TOKEN")
    ca = args.ca or conf.get("ca") or os.environ.get("SCALEOUT_CA")
    insecure = args.insecure is True or conf.get("insecure") is True
    data_dir = getattr(args, "data_dir", None)
    if data_dir is None and not (url and token) and (DEFAULT_DATA_DIR / "controller.json").exists():
        data_dir = DEFAULT_DATA_DIR
    if data_dir is not None and not (url and token):
        data_dir = Path(data_dir)
        info = read_controller_info(data_dir)
        url = url or info["url"]
        if not token:
            token_file = data_dir / "admin.token"
            if not token_file.exists():
                raise UsageError(f"no admin token in {data_dir}")
            token = token_file.read_text().strip()
        if ca is None and info.get("ca"):
            ca = data_dir / "ca.pem"
        insecure = insecure or not info.get("ca")
    if token and token.startswith("@"):
        token = _read(Path(token[1:]), "token file").strip()
    if not url and token:
        from scaleout.security.tokens import peek

        url = peek(token).controller
    if not url:
        raise UsageError("no controller given: pass --controller URL (or set SCALEOUT_CONTROLLER), or --data-dir DIR of a local controller")
    if not token:
        raise UsageError("no token given: pass --token (or set SCALEOUT_TOKEN); create one with: scaleout token create")
    if not url.startswith(("ws://", "wss://")):
        raise UsageError(f"controller address must start with wss:// (or ws:// with --insecure), got {url!r}")
    if url.startswith("ws://") and not insecure:
        raise UsageError(f"{url} is not TLS; pass --insecure to connect without it")
    ca_path = Path(ca) if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise UsageError(f"CA file {ca_path} does not exist (the controller writes it to its DATA_DIR/ca.pem)")
    return Connection(str(url), str(token), ca_path, insecure)


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
    if problem is not None:
        raise UsageError(f"{info_file} is damaged ({problem}); restart the controller to rewrite it: scaleout serve --data-dir {data_dir}")
    return dict(info)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
