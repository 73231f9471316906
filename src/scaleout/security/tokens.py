"""Signed bearer tokens: ``sco1.<b64url claims json>.<b64url Ed25519 signature>``.

The controller signs; anyone holding the public key verifies. A join token may also
carry the controller URL and CA fingerprint, so one string is enough to join safely.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from scaleout.core.errors import AuthError, ConfigError
from scaleout.security.tls import write_private

ROLES = ("admin", "combiner", "client")
PREFIX = "sco1"
_MAX_LEN = 8192
_MAX_TIME = 2**40  # far beyond any real date, small enough for datetime
_B64 = re.compile(r"[A-Za-z0-9_-]*")
_TTL = re.compile(r"(\d+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class TokenClaims:
    """What a token grants: a role until `exp` (unix seconds), identified by `jti`."""

    role: str
    exp: int
    iat: int
    jti: str
    sub: str | None = None
    controller: str | None = None  # wss URL to join
    ca: str | None = None  # "sha256:..." fingerprint of the controller's CA
    nid: str | None = None  # a node identity's id: this token is that enrolled node's own credential
    aud: str | None = None  # a ticket: good only at the combiner of this name (never at the controller)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64.fullmatch(text):
        raise AuthError("token is malformed")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise AuthError("token is malformed") from None
    if _b64encode(data) != text:  # only one spelling is valid, so no edit goes unnoticed
        raise AuthError("token is malformed")
    return data


def _split(token: str) -> tuple[str, bytes, bytes]:
    """Return (signed part, claims json, signature), or raise AuthError."""
    if not isinstance(token, str) or len(token) > _MAX_LEN:
        raise AuthError("token is malformed")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        raise AuthError("token is malformed")
    return f"{parts[0]}.{parts[1]}", _b64decode(parts[1]), _b64decode(parts[2])


def _claims(payload: bytes) -> TokenClaims:
    try:
        raw: Any = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise AuthError("token is malformed") from None
    if not isinstance(raw, dict):
        raise AuthError("token is malformed")
    times = [raw.get("exp"), raw.get("iat")]
    texts = [raw.get(k) for k in ("sub", "controller", "ca", "nid", "aud")]
    if (
        raw.get("role") not in ROLES
        or not all(type(t) is int and 0 <= t < _MAX_TIME for t in times)
        or not (isinstance(raw.get("jti"), str) and raw["jti"])
        or not all(t is None or isinstance(t, str) for t in texts)
    ):
        raise AuthError("token is malformed")
    return TokenClaims(raw["role"], raw["exp"], raw["iat"], raw["jti"], *texts)


def peek(token: str) -> TokenClaims:
    """Decode claims without checking the signature (to show or route, never to trust)."""
    return _claims(_split(token)[1])


MAX_TTL_S = 100 * 365 * 86400


def parse_ttl(text: str) -> int:
    """Seconds in "30d", "12h", "15m", "45s" or "3600"."""
    match = _TTL.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    seconds = int(match[1]) * _UNITS[match[2]] if match else 0
    if seconds <= 0:
        raise ConfigError("ttl", f"expected a positive duration like 30d, 12h, 15m, 45s or 3600, got {text!r}")
    if seconds > MAX_TTL_S:
        raise ConfigError("ttl", f"{text!r} is longer than the 100 years a token may live")
    return seconds


class TokenSigner:
    """Holds the Ed25519 key that issues tokens."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> TokenSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> TokenSigner:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ConfigError("token key", f"not a PEM private key: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("token key", "not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> TokenSigner:
        """Load the key at `path`, or create it there (mode 0600) on first use."""
        path = Path(path)
        if path.exists():
            return cls.from_pem(path.read_bytes())
        signer = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, signer.private_pem())
        return signer

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def issue(
        self,
        role: str,
        ttl_s: int,
        now: float,
        *,
        jti: str,
        sub: str | None = None,
        controller: str | None = None,
        ca: str | None = None,
        nid: str | None = None,
        aud: str | None = None,
    ) -> str:
        """Sign a token granting `role` for `ttl_s` seconds from `now`."""
        if role not in ROLES:
            raise ConfigError("role", f"unknown role {role!r}; expected one of: {', '.join(ROLES)}")
        if type(ttl_s) is not int or ttl_s <= 0:
            raise ConfigError("ttl", f"must be a positive number of seconds, got {ttl_s!r}")
        if not jti:
            raise ConfigError("jti", "a token needs an id")
        iat = int(now)
        claims = TokenClaims(role, iat + ttl_s, iat, jti, sub, controller, ca, nid, aud)
        body = {k: v for k, v in asdict(claims).items() if v is not None}
        signed = f"{PREFIX}.{_b64encode(json.dumps(body, separators=(',', ':'), sort_keys=True).encode())}"
        return f"{signed}.{_b64encode(self._key.sign(signed.encode('ascii')))}"


class TokenVerifier:
    """Checks tokens against the signer's public key and a set of revoked ids."""

    def __init__(self, public_pem: bytes) -> None:
        try:
            key = serialization.load_pem_public_key(public_pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise ConfigError("token key", f"not a PEM public key: {e}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError("token key", "not an Ed25519 public key")
        self._key = key
        self.revoked: set[str] = set()  # token ids (jti) and node identity ids (nid)

    def genuine(self, token: str) -> TokenClaims:
        """The claims of a token this key signed (live or not, revoked or not)."""
        signed, payload, signature = _split(token)
        try:
            self._key.verify(signature, signed.encode("ascii"))
        except InvalidSignature:
            raise AuthError("token signature is invalid") from None
        return _claims(payload)

    def verify(self, token: str, now: float, roles: Collection[str] | None = None, *, audience: str | None = None) -> TokenClaims:
        """Return the claims of a genuine, live, unrevoked token whose role is in `roles`.

        A ticket (a token with ``aud``) passes only where the caller names that audience:
        a ticket is never anyone's credential or identity."""
        claims = self.genuine(token)
        if claims.aud != audience:
            if claims.aud is None:
                raise AuthError("a ticket is expected here, not a credential")
            raise AuthError(f"a ticket is good only at the combiner it names ({claims.aud}), never as a credential or identity")
        if claims.jti in self.revoked:
            raise AuthError("token was revoked")
        if claims.nid is not None and claims.nid in self.revoked:
            raise AuthError("this node's identity was revoked or removed by an admin")
        if now >= claims.exp:
            when = dt.datetime.fromtimestamp(claims.exp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise AuthError(f"token expired at {when}")
        if roles is not None and claims.role not in roles:
            article = "an" if claims.role[0] in "aeiou" else "a"
            raise AuthError(f"{article} {claims.role} token may not do this; needs one of: {', '.join(roles)}")
        return claims
