"""A node's enrolled identity, kept in its state dir.

Joining enrols a client or combiner: it shows the controller its join token once and gets
its own credential back, a node-bound token naming it (``sub``) and its identity (``nid``),
signed by the controller. That is what it connects with from then on, so its name is its
own: another holder of the join token cannot connect under it, and ``scaleout client rm``
(or ``token revoke --with-nodes``) revokes exactly this node.

Why a node-bound token and not a client certificate: it rides the same Authorization
header every link already checks at the handshake, combiners verify it offline with the
controller's public key they already hold, it works on controllers without TLS, and one
id revokes it on every link at once. The file holding it is mode 0600 in a 0700 folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from scaleout.core.errors import ConfigError

IDENTITY_DIR = "identities"


def default_state_dir() -> Path:
    """Where a node keeps its identity when not told: $XDG_STATE_HOME/scaleout or ~/.local/state/scaleout."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "scaleout"


@dataclass(frozen=True)
class Identity:
    id: str  # the identity's id on the controller (nid)
    role: str  # client or combiner
    name: str
    token: str  # the node-bound credential
    controller: str  # the address it enrolled at
    ca: str | None  # the CA fingerprint it enrolled under


def path_for(state_dir: Path, key: str, role: str, name: str) -> Path:
    return state_dir / IDENTITY_DIR / f"{key}-{role}-{name}.json"


def names_in(state_dir: Path, key: str, role: str) -> list[str]:
    """Names of the ``role`` identities enrolled at controller ``key`` kept in ``state_dir``."""
    folder = state_dir / IDENTITY_DIR
    prefix = f"{key}-{role}-"
    if not folder.is_dir():
        return []
    return sorted(p.name[len(prefix) : -len(".json")] for p in folder.glob(f"{prefix}*.json"))


def load(path: Path) -> Identity | None:
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        ident = Identity(**{k: raw[k] for k in ("id", "role", "name", "token", "controller", "ca")})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("state_dir", f"node identity {path} is unreadable ({exc}); remove it to enrol again") from None
    if not all(isinstance(v, str) for v in (ident.id, ident.role, ident.name, ident.token, ident.controller)):
        raise ConfigError("state_dir", f"node identity {path} is damaged; remove it to enrol again")
    return ident


def save(path: Path, ident: Identity) -> None:
    from scaleout.security.tls import write_private

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    write_private(path, (json.dumps(asdict(ident), indent=2) + "\n").encode())
