"""Package signatures: the controller's key signs a package's sha256; clients verify and pin."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from scaleout.core.errors import PackageError
from scaleout.security.packages import PackageSigner, check_pin, verify_package

DIGEST = hashlib.sha256(b"package").hexdigest()


def test_a_signature_verifies_only_for_its_package_and_key(tmp_path: Path) -> None:
    signer = PackageSigner.load_or_create(tmp_path / "package.key")
    assert (tmp_path / "package.key").stat().st_mode & 0o777 == 0o600
    assert PackageSigner.load_or_create(tmp_path / "package.key").public_pem() == signer.public_pem()  # kept across restarts
    sig = signer.sign(DIGEST)
    verify_package(signer.public_pem(), DIGEST, sig)
    other = hashlib.sha256(b"another package").hexdigest()
    stranger = PackageSigner.load_or_create(tmp_path / "other.key")
    for key, digest, signature in (
        (signer.public_pem(), other, sig),  # another package
        (stranger.public_pem(), DIGEST, sig),  # another key
        (signer.public_pem(), DIGEST, stranger.sign(DIGEST)),
        (signer.public_pem(), DIGEST, sig[:-4] + "AAA="),  # tampered
        (signer.public_pem(), DIGEST, "not base64!"),
        (signer.public_pem(), DIGEST, ""),
    ):
        with pytest.raises(PackageError, match="not signed by the controller"):
            verify_package(key, digest, signature)
    with pytest.raises(PackageError, match="not a valid public key"):
        verify_package(b"garbage", DIGEST, sig)


def test_a_client_pins_the_first_key_it_sees(tmp_path: Path) -> None:
    first = PackageSigner.load_or_create(tmp_path / "a.key").public_pem()
    second = PackageSigner.load_or_create(tmp_path / "b.key").public_pem()
    pin = tmp_path / "work" / "controller-package.pub"
    check_pin(pin, first)
    assert pin.read_bytes() == first and pin.stat().st_mode & 0o777 == 0o600
    check_pin(pin, first)
    with pytest.raises(PackageError, match=f"another key .* than it did before .*remove {pin}"):
        check_pin(pin, second)
