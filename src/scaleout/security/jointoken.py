"""Join tokens: one string that is enough to join a controller safely.

``SCALEOUT-1.<base64url of JSON {"u": [urls], "ca": "sha256:<hex>", "t": "<bearer token>"}>``

The addresses say where to dial (tried in order), the CA fingerprint is the trust anchor
(the joining node downloads the controller's CA without trusting it, checks that its
sha256 is this one, then verifies every TLS link against it, as ``kubeadm join`` does with
``--discovery-token-ca-cert-hash``), and the bearer token is the credential the controller
checks. The wrapper itself is not signed: whoever hands a node its join token decides
where it connects anyway; the credential inside is signed by the controller.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from scaleout.core.errors import AuthError

PREFIX = "SCALEOUT-1."
MAX_LEN = 16384
MAX_URLS = 16
MAX_URL_LEN = 300
_B64 = re.compile(r"[A-Za-z0-9_-]+")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_URL = re.compile(r"wss?://[^\s/?#]+")


@dataclass(frozen=True)
class JoinToken:
    urls: tuple[str, ...]
    ca: str | None  # "sha256:<64 hex>" of the controller's CA certificate (DER); None: a controller without TLS
    token: str  # the bearer credential (sco1....)


def is_join_token(text: str) -> bool:
    return isinstance(text, str) and text.startswith(PREFIX)


def encode(join: JoinToken) -> str:
    check(join)
    body: dict[str, Any] = {"u": list(join.urls), "t": join.token}
    if join.ca is not None:
        body["ca"] = join.ca
    data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return PREFIX + base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def parse(text: str) -> JoinToken:
    """The join token in ``text``, or AuthError saying it is not a whole, valid one."""
    if not isinstance(text, str) or not text.startswith(PREFIX) or len(text) > MAX_LEN:
        raise AuthError("join token is malformed (expected SCALEOUT-1.<...> as printed by scaleout token create)")
    body = text[len(PREFIX):]
    if not _B64.fullmatch(body):
        raise AuthError("join token is malformed (not base64url: was it cut or edited?)")
    try:
        data = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        raw = json.loads(data)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise AuthError("join token is malformed (truncated or edited)") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != body:
        raise AuthError("join token is malformed (truncated or edited)")
    if not isinstance(raw, dict) or set(raw) - {"u", "ca", "t"}:
        raise AuthError("join token is malformed (unknown content)")
    urls, ca, token = raw.get("u"), raw.get("ca"), raw.get("t")
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls) or not isinstance(token, str) or not (ca is None or isinstance(ca, str)):
        raise AuthError("join token is malformed (wrong field types)")
    join = JoinToken(tuple(urls), ca, token)
    check(join)
    return join


def check(join: JoinToken) -> None:
    from scaleout.security.tokens import peek

    if not 1 <= len(join.urls) <= MAX_URLS or not all(len(u) <= MAX_URL_LEN and _URL.fullmatch(u) for u in join.urls):
        raise AuthError(f"join token is malformed (needs 1-{MAX_URLS} ws:// or wss:// controller addresses)")
    if join.ca is not None and not _FINGERPRINT.fullmatch(join.ca):
        raise AuthError("join token is malformed (its CA fingerprint is not sha256:<64 hex digits>)")
    if join.ca is None and any(u.startswith("wss://") for u in join.urls):
        raise AuthError("join token is malformed (a wss:// address but no CA fingerprint to check it with)")
    peek(join.token)  # a well-formed credential inside (its signature is the controller's to check)


def fingerprint_key(fingerprint: str | None, url: str) -> str:
    """A short, file-name-safe key for one controller: its CA fingerprint, else its address."""
    import hashlib

    if fingerprint:
        return fingerprint.removeprefix("sha256:")[:16]
    return "url-" + hashlib.sha256(url.encode()).hexdigest()[:12]
