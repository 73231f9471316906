from __future__ import annotations

import base64
import json
import stat

import pytest

from scaleout.core.errors import AuthError, ConfigError
from scaleout.security.tokens import ROLES, TokenClaims, TokenSigner, TokenVerifier, parse_ttl, peek

NOW = 1_700_000_000.5


@pytest.fixture(scope="module")
def signer() -> TokenSigner:
    return TokenSigner.generate()


@pytest.fixture
def verifier(signer: TokenSigner) -> TokenVerifier:
    return TokenVerifier(signer.public_pem())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_round_trip_carries_all_claims(signer, verifier):
    token = signer.issue(
        "client", 3600, NOW, jti="j1", sub="alice", controller="wss://10.0.0.1:8443", ca="sha256:ab"
    )
    assert token.startswith("sco1.") and token.count(".") == 2
    expected = TokenClaims("client", 1_700_003_600, 1_700_000_000, "j1", "alice", "wss://10.0.0.1:8443", "sha256:ab")
    assert verifier.verify(token, NOW) == expected
    assert verifier.verify(token, NOW, roles=("client", "admin")) == expected
    assert peek(token) == expected
    minimal = signer.issue("admin", 60, NOW, jti="j2")
    assert verifier.verify(minimal, NOW) == TokenClaims("admin", 1_700_000_060, 1_700_000_000, "j2")


def test_expiry_is_exact(signer, verifier):
    token = signer.issue("admin", 60, NOW, jti="j")
    verifier.verify(token, 1_700_000_059.9)
    with pytest.raises(AuthError, match=r"^token expired at 2023-11-14T22:14:20Z$"):
        verifier.verify(token, 1_700_000_060)


def test_wrong_role(signer, verifier):
    token = signer.issue("client", 60, NOW, jti="j")
    with pytest.raises(AuthError, match="^a client token may not do this; needs one of: admin, combiner$"):
        verifier.verify(token, NOW, roles=["admin", "combiner"])


def test_tampered_payload(signer, verifier):
    prefix, payload, sig = signer.issue("client", 60, NOW, jti="j").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["role"] = "admin"
    with pytest.raises(AuthError, match="^token signature is invalid$"):
        verifier.verify(f"{prefix}.{_b64(json.dumps(claims).encode())}.{sig}", NOW)


@pytest.mark.parametrize("pos", [0, 40, -1])
def test_tampered_signature(signer, verifier, pos):
    token = signer.issue("client", 60, NOW, jti="j")
    chars = list(token)
    i = len(token) + pos if pos < 0 else token.rindex(".") + 1 + pos
    chars[i] = "B" if chars[i] == "A" else "A"
    with pytest.raises(AuthError, match="^token (signature is invalid|is malformed)$"):
        verifier.verify("".join(chars), NOW)


def test_padding_bits_cannot_be_edited(signer, verifier):
    # 64 signature bytes use 86 base64 chars; the last char's low 2 bits carry no data.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    token = signer.issue("client", 60, NOW, jti="j")
    edited = token[:-1] + alphabet[alphabet.index(token[-1]) ^ 1]
    assert base64.urlsafe_b64decode(edited.split(".")[2] + "==") == base64.urlsafe_b64decode(token.split(".")[2] + "==")
    with pytest.raises(AuthError, match="^token is malformed$"):
        verifier.verify(edited, NOW)


def test_other_signers_key(signer):
    token = TokenSigner.generate().issue("admin", 60, NOW, jti="j")
    with pytest.raises(AuthError, match="^token signature is invalid$"):
        TokenVerifier(signer.public_pem()).verify(token, NOW)


@pytest.mark.parametrize(
    "junk",
    ["", "abc", "sco1.x.y", "sco1..", "sco1.a.b.c", "sco2.e30.AAAA", "sco1.!!!.@@@", "sco1.e30=.AAAA",
     "sco1.ünï.cødé", "x" * 20000, None, b"sco1.e30.AAAA"],
)
def test_garbage_is_malformed(verifier, junk):
    with pytest.raises(AuthError, match="^token is malformed$"):
        verifier.verify(junk, NOW)
    with pytest.raises(AuthError, match="^token is malformed$"):
        peek(junk)


@pytest.mark.parametrize(
    "claims",
    [[], "x", {}, {"role": "root", "exp": 9, "iat": 1, "jti": "j"}, {"role": "admin", "exp": "9", "iat": 1, "jti": "j"},
     {"role": "admin", "exp": True, "iat": 1, "jti": "j"}, {"role": "admin", "exp": 9, "iat": 1, "jti": ""},
     {"role": "admin", "exp": 10**30, "iat": 1, "jti": "j"}, {"role": "admin", "exp": 9, "iat": 1, "jti": "j", "sub": 5}],
)
def test_bad_claims_are_malformed_even_when_signed(signer, verifier, claims):
    # Signed with the real key, so only claim validation can reject it.
    signed = "sco1." + _b64(json.dumps(claims).encode())
    token = signed + "." + _b64(signer._key.sign(signed.encode()))
    with pytest.raises(AuthError, match="^token is malformed$"):
        verifier.verify(token, 0)


def test_revoked(signer, verifier):
    token = signer.issue("combiner", 60, NOW, jti="gone")
    verifier.verify(token, NOW)
    verifier.revoked.add("gone")
    with pytest.raises(AuthError, match="^token was revoked$"):
        verifier.verify(token, NOW)


def test_issue_rejects_bad_input(signer):
    assert set(ROLES) == {"admin", "combiner", "client"}
    with pytest.raises(ConfigError, match="^role: unknown role 'root'"):
        signer.issue("root", 60, NOW, jti="j")
    for ttl in (0, -5):
        with pytest.raises(ConfigError, match="^ttl:"):
            signer.issue("admin", ttl, NOW, jti="j")


def test_keys_persist_with_owner_only_file(tmp_path, signer):
    path = tmp_path / "keys" / "token.key"
    first = TokenSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = TokenSigner.load_or_create(path)
    assert again.public_pem() == first.public_pem() != signer.public_pem()
    token = again.issue("admin", 60, NOW, jti="j")
    assert TokenVerifier(first.public_pem()).verify(token, NOW).role == "admin"
    assert TokenSigner.from_pem(first.private_pem()).public_pem() == first.public_pem()
    with pytest.raises(ConfigError):
        TokenSigner.from_pem(b"junk")
    with pytest.raises(ConfigError):
        TokenVerifier(b"junk")


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 2_592_000), ("12h", 43_200), ("15m", 900), ("45s", 45), ("3600", 3600), (" 2H ", 7200)]
)
def test_parse_ttl(text, seconds):
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0d", "-5m", "1.5h", "10w", "d", "5 d", "abc", "1e3"])
def test_parse_ttl_rejects(text):
    with pytest.raises(ConfigError, match="^ttl: ") as e:
        parse_ttl(text)
    assert e.value.key == "ttl"


def test_parse_ttl_refuses_absurd_lifetimes() -> None:
    with pytest.raises(ConfigError, match="100 years"):
        parse_ttl("99999999999d")
    assert parse_ttl("36500d") == 36500 * 86400
