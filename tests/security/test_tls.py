from __future__ import annotations

import asyncio
import hashlib
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from scaleout.core.errors import AuthError, ConfigError
from scaleout.security import tls


def _write(dir: Path, name: str, data: bytes) -> Path:
    path = dir / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return tls.create_ca("Test CA")


@pytest.fixture
def server_files(tmp_path: Path, ca: tuple[bytes, bytes]) -> tuple[Path, Path, bytes]:
    csr, key = tls.make_csr(["127.0.0.1", "localhost"], "controller")
    cert = tls.sign_csr(*ca, csr)
    return _write(tmp_path, "server.pem", cert), _write(tmp_path, "server.key", key), cert


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> bytes:
    """Serve one TLS connection on 127.0.0.1:0; return the DER cert the client saw."""

    async def run() -> bytes:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello\n")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=server)
        port = srv.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname=hostname
            )
            assert await reader.readline() == b"hello\n"
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            writer.close()
            return der
        finally:
            srv.close()
            await srv.wait_closed()

    return asyncio.run(asyncio.wait_for(run(), 10))


def test_handshake_with_signed_cert(server_files, ca, tmp_path):
    cert_file, key_file, cert = server_files
    ca_file = _write(tmp_path, "ca.pem", ca[0])
    server = tls.server_context(cert_file, key_file)
    for client in (tls.client_context(ca_file), tls.client_context(ca_pem=ca[0])):
        der = handshake(server, client, "127.0.0.1")
        assert "sha256:" + hashlib.sha256(der).hexdigest() == tls.fingerprint(cert)
    handshake(server, tls.client_context(ca_pem=ca[0]), "localhost")


def test_client_trusting_other_ca_fails(server_files):
    cert_file, key_file, _ = server_files
    other_ca, _ = tls.create_ca("Other CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls.server_context(cert_file, key_file), tls.client_context(ca_pem=other_ca), "127.0.0.1")


def test_wrong_hostname_fails(server_files, ca):
    cert_file, key_file, _ = server_files
    with pytest.raises(ssl.SSLCertVerificationError, match="(?i)hostname|match"):
        handshake(tls.server_context(cert_file, key_file), tls.client_context(ca_pem=ca[0]), "example.com")


def test_insecure_client_skips_verification(server_files):
    cert_file, key_file, _ = server_files
    handshake(tls.server_context(cert_file, key_file), tls.client_context(insecure=True), "example.com")


def test_signed_cert_is_a_leaf_with_the_requested_names(ca):
    cert_pem, key_pem = tls.issue_cert(*ca, ["10.0.0.7", "Node.Example"], "node", days=30)
    cert = x509.load_pem_x509_certificate(cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["10.0.0.7", "node.example"]
    assert isinstance(list(sans)[0], x509.IPAddress)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca[0]))
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == cert.public_key()


def test_sign_csr_rejects_forged_request(ca):
    csr, _ = tls.make_csr(["127.0.0.1"], "x")
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(AuthError, match="certificate request is invalid: its signature"):
        tls.sign_csr(*ca, forged)


@pytest.mark.parametrize(
    "junk",
    [b"", b"not a csr", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"],
)
def test_sign_csr_rejects_garbage(ca, junk):
    with pytest.raises(AuthError, match="^certificate request is invalid"):
        tls.sign_csr(*ca, junk)


def test_fingerprint_and_bad_pem(ca):
    der = x509.load_pem_x509_certificate(ca[0]).public_bytes(serialization.Encoding.DER)
    assert tls.fingerprint(ca[0]) == "sha256:" + hashlib.sha256(der).hexdigest()
    with pytest.raises(ConfigError):
        tls.fingerprint(b"nope")


def test_context_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="^ca: cannot read CA file .*missing.pem") as e:
        tls.client_context(tmp_path / "missing.pem")
    assert e.value.key == "ca"
    with pytest.raises(ConfigError, match="^ca: cannot read CA file"):
        tls.client_context(_write(tmp_path, "bad.pem", b"garbage"))
    with pytest.raises(ConfigError, match="^tls: cannot load certificate"):
        tls.server_context(tmp_path / "none.pem", tmp_path / "none.key")


def test_write_private_is_owner_only(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    path.chmod(0o644)
    tls.write_private(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def _sans(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


def test_ensure_controller_tls_creates_reuses_and_extends(tmp_path):
    data = tmp_path / "data"
    files = tls.ensure_controller_tls(data, ["box"])
    for key in (files.ca_key, files.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert sorted(p.name for p in data.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    assert _sans(files.cert) == ["127.0.0.1", "localhost", "box"]
    ca_fp, server_pem = tls.fingerprint(files.ca_cert.read_bytes()), files.cert.read_bytes()

    again = tls.ensure_controller_tls(data, ["localhost"])
    assert again == files
    assert tls.fingerprint(files.ca_cert.read_bytes()) == ca_fp
    assert files.cert.read_bytes() == server_pem  # already covered: not re-issued

    # A newly requested name (a --san, a new interface address) re-issues it by the same CA.
    tls.ensure_controller_tls(data, ["10.1.2.3", "ctl.example"])
    assert tls.fingerprint(files.ca_cert.read_bytes()) == ca_fp
    assert _sans(files.cert) == ["127.0.0.1", "localhost", "10.1.2.3", "ctl.example", "box"]
    server = tls.server_context(files.cert, files.key)
    handshake(server, tls.client_context(files.ca_cert), "ctl.example")
    handshake(server, tls.client_context(files.ca_cert), "box")  # the names it had are kept


INTERFACES = ["127.0.0.1", "192.0.2.7", "10.8.0.1", "::1", "fd00::2"]


@pytest.mark.parametrize(
    ("bind", "sans", "want"),
    [
        # Every interface of the bound family, and the host name.
        ("0.0.0.0", [], ["127.0.0.1", "localhost", "box", "192.0.2.7", "10.8.0.1"]),
        ("::", [], ["127.0.0.1", "localhost", "box", "::1", "fd00::2"]),
        ("", [], ["127.0.0.1", "localhost", "box", "192.0.2.7", "10.8.0.1", "::1", "fd00::2"]),
        # A specific address names itself only; --san adds to either, canonical and once.
        ("192.0.2.7", [], ["127.0.0.1", "localhost", "192.0.2.7"]),
        ("192.0.2.7", ["CTL.Example.org", "127.0.0.2", "ctl.example.org"], ["127.0.0.1", "localhost", "192.0.2.7", "ctl.example.org", "127.0.0.2"]),
        ("0.0.0.0", ["203.0.113.9", "10.8.0.1", "FD00:0::2"], ["127.0.0.1", "localhost", "box", "192.0.2.7", "10.8.0.1", "203.0.113.9", "fd00::2"]),
    ],
)
def test_server_names(bind, sans, want):
    assert tls.server_names(bind, sans, interfaces=INTERFACES, hostname="Box") == want


def test_ensure_controller_tls_reissues_mismatched_key_and_refuses_lost_ca_key(tmp_path):
    files = tls.ensure_controller_tls(tmp_path, [])
    _, other_key = tls.make_csr([], "x")
    tls.write_private(files.key, other_key)
    tls.ensure_controller_tls(tmp_path, [])
    handshake(tls.server_context(files.cert, files.key), tls.client_context(files.ca_cert), "localhost")

    files.ca_key.unlink()
    with pytest.raises(ConfigError, match="ca.key is missing"):
        tls.ensure_controller_tls(tmp_path, [])
