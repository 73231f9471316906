"""Package signing: the controller signs the sha256 of each compute package it activates
with an Ed25519 key of its own (``package.key`` in its data dir, 0600); clients verify that
signature, with the controller's public key, before they unpack anything.

The public key reaches a client in the reply that carries the package, over a link whose
TLS certificate the client has already verified against the controller's CA (``--ca`` or
the join token's fingerprint). A client with a work dir pins the key it saw first and
refuses a package signed by another one.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from scaleout.core.errors import ConfigError, PackageError
from scaleout.security.tls import write_private

KEY_FILE = "package.key"
PIN_FILE = "controller-package.pub"
_CONTEXT = b"scaleout-package-v1:"  # so a package signature can never pass for anything else


def key_id(public_pem: bytes) -> str:
    """A short name for a public key in messages: sha256 of its PEM, first 16 hex digits."""
    import hashlib

    return "sha256:" + hashlib.sha256(public_pem.strip()).hexdigest()[:16]


def _message(digest: str) -> bytes:
    return _CONTEXT + digest.encode("ascii")


class PackageSigner:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def load_or_create(cls, path: Path) -> PackageSigner:
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
                raise ConfigError("package key", f"{path} is not a PEM private key: {exc}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError("package key", f"{path} is not an Ed25519 key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_private(path, pem)
        return cls(key)

    def sign(self, digest: str) -> str:
        """The signature of a package whose sha256 is ``digest`` (hex), base64."""
        return base64.b64encode(self._key.sign(_message(digest))).decode("ascii")

    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_package(public_pem: bytes, digest: str, signature: str) -> None:
    """Raise PackageError unless ``signature`` is the controller's over ``digest``."""
    try:
        key = serialization.load_pem_public_key(public_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PackageError("the controller's package signing key is not a valid public key; refusing the package") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError("the controller's package signing key is not an Ed25519 key; refusing the package")
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, _message(digest))
    except (InvalidSignature, binascii.Error, ValueError):
        raise PackageError(
            f"the compute package {digest[:12]} is not signed by the controller (its signature does not verify); refusing to run it"
        ) from None


def check_pin(pin: Path, public_pem: bytes) -> None:
    """Remember the first signing key seen in ``pin`` (0600); refuse a package signed by another."""
    if pin.exists():
        known = pin.read_bytes()
        if known.strip() != public_pem.strip():
            raise PackageError(
                f"the controller signs packages with another key ({key_id(public_pem)}) than it did before "
                f"({key_id(known)}); refusing the package. If the controller was set up again on purpose, remove {pin}"
            )
        return
    pin.parent.mkdir(parents=True, exist_ok=True)
    write_private(pin, public_pem)
