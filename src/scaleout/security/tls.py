"""Certificates and TLS contexts: the one place Scaleout makes either.

Keys are EC P-256, signatures SHA-256. Certificates are dated from the wall clock
because peers check them against theirs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from scaleout.core.errors import AuthError, ConfigError

log = logging.getLogger("scaleout.tls")

_SKEW = dt.timedelta(minutes=5)  # tolerate peers whose clocks run a little behind
_RENEW_BEFORE = dt.timedelta(days=30)
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_CRYPTO_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm)

_Name = x509.DNSName | x509.IPAddress
CA_NAME = "Scaleout CA"  # the subject of the CA `scaleout serve` creates
CONTROLLER_ROLE = "controller"  # the role mark of the controller's own certificate


@dataclass
class TlsFiles:
    """Where the controller's CA and server certificate live."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def write_private(path: Path, data: bytes, sync: bool = True) -> None:
    """Atomically write a secret readable only by its owner (mode 0600); ``sync``: on disk
    before it replaces the old file (fsync), not only in the page cache."""
    _write_atomic(path, data, 0o600, sync)


def write_public(path: Path, data: bytes) -> None:
    """Atomically write a file anyone may read: a reader sees the old or the new bytes, never half."""
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int, sync: bool = True) -> None:
    path = Path(path)
    # mkstemp creates the file with os.open(..., 0o600), so a secret is never world-readable.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _general_name(host: str) -> _Name:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.lower())


def _cn(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days <= 0:
        raise ConfigError("days", f"certificate lifetime must be positive, got {days}")
    now = dt.datetime.now(dt.timezone.utc)
    return now - _SKEW, now + dt.timedelta(days=days)


def create_ca(common_name: str = CA_NAME, days: int = 3650) -> tuple[bytes, bytes]:
    """Make a self-signed CA; returns (cert_pem, key_pem)."""
    key = _new_key()
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_cn(common_name))
        .issuer_name(_cn(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_csr(hosts: list[str], common_name: str) -> tuple[bytes, bytes]:
    """Make a key and a request naming `hosts` (IPs or DNS names); returns (csr_pem, key_pem)."""
    key = _new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(_cn(common_name))
    if hosts:
        names = [_general_name(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(ca_cert_pem: bytes, ca_key_pem: bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca_cert_pem)
        key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except _CRYPTO_ERRORS as e:
        raise ConfigError("ca", f"cannot load the CA certificate or key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("ca", "the CA key is not an EC key")
    return cert, key


NODE_OU_PREFIX = "scaleout-"


def sign_csr(
    ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, days: int = 365, *, role: str | None = None,
    lifetime_s: int | None = None, allowed: Sequence[str] | None = None,
) -> bytes:
    """Issue a leaf certificate (server and client auth, not a CA) for a valid request.

    With ``role`` the subject is rewritten to carry ``OU=scaleout-<role>``, so a peer can
    tell a combiner's certificate from the controller's although one CA signs both.
    ``lifetime_s`` overrides ``days``; with ``allowed`` only the requested names and
    addresses among those are signed (the others are left out).
    """
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        signed = csr.is_signature_valid
        public_key = csr.public_key()
        subject = csr.subject
        try:
            sans: list[x509.GeneralName] = list(
                csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            )
        except x509.ExtensionNotFound:
            sans = []
    except _CRYPTO_ERRORS as e:
        raise AuthError(f"certificate request is invalid: {e}") from None
    if not signed:
        raise AuthError("certificate request is invalid: its signature does not match its key")
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise AuthError("certificate request is invalid: its key is not an EC key")
    if role is not None:
        names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(names[0].value) if names else role
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, NODE_OU_PREFIX + role),
        ])
    if allowed is not None:
        permitted = {_canonical(a) for a in allowed}
        sans = [n for n in sans if isinstance(n, (x509.DNSName, x509.IPAddress)) and _canonical(str(n.value)) in permitted]
    start, end = _validity(days)
    if lifetime_s is not None:
        if lifetime_s <= 0:
            raise ConfigError("lifetime", f"certificate lifetime must be positive, got {lifetime_s}")
        end = start + _SKEW + dt.timedelta(seconds=lifetime_s)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def node_role(cert_der: bytes) -> str | None:
    """The Scaleout role a certificate was issued for (``OU=scaleout-<role>``), if any."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except _CRYPTO_ERRORS:
        return None
    for attr in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
        value = str(attr.value)
        if value.startswith(NODE_OU_PREFIX):
            return value.removeprefix(NODE_OU_PREFIX)
    return None


def peer_role_problem(cert_der: bytes, expected: str) -> str | None:
    """Why a peer presenting this certificate may not be trusted as ``expected``, or None.

    Every certificate the Scaleout CA issues now carries its role (``OU=scaleout-<role>``,
    the controller's own included). An unmarked one passes for the controller only when
    another CA issued it (an operator's ``--tls-cert``): an unmarked certificate from the
    Scaleout CA is a combiner's from before the marks, or a controller's that this version
    re-issues with its mark at start, so it is refused rather than guessed at.
    """
    role = node_role(cert_der)
    if role == expected:
        return None
    if role is not None:
        return f"presented a {role} certificate where a {expected} was expected"
    if expected == "controller" and not _issued_by_scaleout_ca(cert_der):
        return None
    return (f"presented a certificate with no Scaleout role where a {expected} was expected"
            " (a controller re-issues its own with the mark when it starts with this version)")


def _issued_by_scaleout_ca(cert_der: bytes) -> bool:
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except _CRYPTO_ERRORS:
        return True  # unreadable: treated as the riskier case
    return any(str(a.value) == CA_NAME for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME))


def issue_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, hosts: list[str], common_name: str, days: int = 365, *, role: str | None = None
) -> tuple[bytes, bytes]:
    """Make a key and a CA-signed certificate for `hosts` (marked with ``role``); returns (cert_pem, key_pem)."""
    csr_pem, key_pem = make_csr(hosts, common_name)
    return sign_csr(ca_cert_pem, ca_key_pem, csr_pem, days, role=role), key_pem


def _load_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except _CRYPTO_ERRORS as e:
        raise ConfigError("certificate", f"not a PEM certificate: {e}") from None


def fingerprint(cert_pem: bytes) -> str:
    """Return "sha256:<hex>" of the certificate's DER form, as pinned in join tokens."""
    der = _load_cert(cert_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """TLS >= 1.2 server context presenting `cert_file`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError("tls", f"cannot load certificate {cert_file} with key {key_file}: {e}") from None
    return ctx


def client_context(
    ca_file: str | Path | None = None, *, ca_pem: bytes | None = None, insecure: bool = False
) -> ssl.SSLContext:
    """TLS >= 1.2 client context checking server certificate and hostname.

    Trusts `ca_file` and/or `ca_pem`, or the system store if neither is given;
    `insecure` turns verification off (for local experiments only).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError("ca", f"cannot read CA file {ca_file}: {e}") from None
    if ca_pem is not None:
        try:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii"))
        except (UnicodeDecodeError, ssl.SSLError) as e:
            raise ConfigError("ca", f"cannot read CA certificate: {e}") from None
    if ca_file is None and ca_pem is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.system_ca = True  # type: ignore[attr-defined]  # no CA given: a failed check says --ca is missing
    return ctx


def server_names(bind: str, sans: Sequence[str], *, interfaces: Sequence[str], hostname: str) -> list[str]:
    """The names a server certificate must carry to be dialled where it listens.

    Always loopback (127.0.0.1, localhost). A specific ``bind`` address adds itself; a
    wildcard one (0.0.0.0, ::) adds this machine's ``hostname`` and each of its
    ``interfaces`` addresses of the family bound (both for ""). Then ``sans``, the names
    or addresses it is reached by that no interface shows (DNS names, NAT addresses).
    """
    names = ["127.0.0.1", "localhost"]
    if bind in WILDCARD_HOSTS:
        names.append(hostname)
        versions = {"0.0.0.0": {4}, "::": {6}}.get(bind, {4, 6})
        names += [a for a in interfaces if ipaddress.ip_address(a).version in versions]
    else:
        names.append(bind)
    names += sans
    return list(dict.fromkeys(_canonical(n) for n in names if n))


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower()


def _names(cert: x509.Certificate) -> list[_Name]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n for n in ext if isinstance(n, (x509.DNSName, x509.IPAddress))]


def _server_cert(files: TlsFiles, ca: x509.Certificate) -> x509.Certificate | None:
    """The existing server certificate, or None if it is missing, not issued by `ca` or not `key`'s."""
    if not (files.cert.exists() and files.key.exists()):
        return None
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except (*_CRYPTO_ERRORS, InvalidSignature):
        return None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert if key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki) else None


def ensure_controller_tls(data_dir: Path, names: Sequence[str]) -> TlsFiles:
    """Create (or reuse) the controller's CA and a server certificate covering ``names``.

    ``names`` come from `server_names`. An existing certificate that lacks one of them (a
    new ``--san``, a new interface address), expires within 30 days or is not the CA's is
    re-issued by the same CA, keeping the names it had: ``ca.pem`` is never replaced, so
    joined nodes keep trusting it.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(data_dir / "ca.pem", data_dir / "ca.key", data_dir / "server.pem", data_dir / "server.key")
    if not files.ca_cert.exists():
        # No one can trust a CA whose certificate was never written, so a lone key is replaced.
        ca_cert_pem, ca_key_pem = create_ca()
        write_private(files.ca_key, ca_key_pem)
        _write_atomic(files.ca_cert, ca_cert_pem, 0o644)
    elif not files.ca_key.exists():
        raise ConfigError("tls", f"{files.ca_cert} exists but {files.ca_key} is missing; restore the key or remove both")
    ca_cert_pem, ca_key_pem = files.ca_cert.read_bytes(), files.ca_key.read_bytes()
    ca_cert, _ = _load_ca(ca_cert_pem, ca_key_pem)

    wanted = list(dict.fromkeys(["127.0.0.1", "localhost", *names]))
    cert = _server_cert(files, ca_cert)
    have = _names(cert) if cert else []
    expiring = cert is not None and cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) < _RENEW_BEFORE
    missing = [h for h in wanted if _general_name(h) not in have]
    # A certificate from before role marks: nodes of this version would not take it for the controller's.
    unmarked = cert is not None and node_role(cert.public_bytes(serialization.Encoding.DER)) != CONTROLLER_ROLE
    if cert is None or expiring or missing or unmarked:
        all_names = list(dict.fromkeys(wanted + [str(n.value) for n in have]))  # never drop a name
        cert_pem, key_pem = issue_cert(ca_cert_pem, ca_key_pem, all_names, "Scaleout controller", role=CONTROLLER_ROLE)
        write_private(files.key, key_pem)
        _write_atomic(files.cert, cert_pem, 0o644)
        if cert is not None and missing and not expiring:
            log.info("re-issued %s to add %s (same CA: %s stays valid)", files.cert, ", ".join(missing), files.ca_cert)
        elif unmarked and not expiring:
            log.info("re-issued %s with the controller's role mark (same CA: %s stays valid)", files.cert, files.ca_cert)
    return files


def names_in(cert_file: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    return [str(n.value) for n in _names(_load_cert(Path(cert_file).read_bytes()))]


def certificate_names(cert_pem: bytes) -> set[str]:
    """The DNS names and IP addresses a certificate is valid for (its subjectAltName)."""
    return {_canonical(str(n.value)) for n in _names(x509.load_pem_x509_certificate(cert_pem))}
