"""Property-based tests (hypothesis) on token and join-token parsing and verification:
whatever is tampered with, truncated, signed by another key, expired or revoked is
refused with AuthError, and nothing but AuthError ever comes out of the parsers."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scaleout.core.errors import AuthError
from scaleout.security import jointoken
from scaleout.security.tokens import ROLES, TokenSigner, TokenVerifier, peek

SIGNER = TokenSigner.generate()
OTHER = TokenSigner.generate()
NOW = 1_700_000_000
FP = "sha256:" + "ab" * 32
B64 = string.ascii_letters + string.digits + "-_"
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(alphabet=string.ascii_letters + string.digits + "-._", min_size=1, max_size=20)
ids = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=16)


@st.composite
def issued(draw: st.DrawFn) -> tuple[str, int]:
    """A genuine token and its lifetime."""
    ttl = draw(st.integers(1, 10**8))
    token = SIGNER.issue(
        draw(st.sampled_from(ROLES)), ttl, NOW, jti=draw(ids), sub=draw(st.none() | names),
        controller=draw(st.none() | st.just("wss://10.0.0.1:8090")), ca=draw(st.none() | st.just(FP)), nid=draw(st.none() | ids),
    )
    return token, ttl


def verifier() -> TokenVerifier:
    return TokenVerifier(SIGNER.public_pem())


@PROPS
@given(issued())
def test_genuine_tokens_verify_until_they_expire(case: tuple[str, int]) -> None:
    token, ttl = case
    v = verifier()
    assert v.verify(token, NOW + ttl - 1) == peek(token)
    with pytest.raises(AuthError, match="expired"):
        v.verify(token, NOW + ttl)


@PROPS
@given(issued(), st.data())
def test_any_edit_of_a_token_is_refused(case: tuple[str, int], data: st.DataObject) -> None:
    token, _ = case
    i = data.draw(st.integers(0, len(token) - 1))
    c = data.draw(st.sampled_from(B64 + ".="))
    assume(c != token[i])
    with pytest.raises(AuthError):
        verifier().verify(token[:i] + c + token[i + 1 :], NOW)


@PROPS
@given(issued(), st.data())
def test_a_truncated_or_extended_token_is_refused(case: tuple[str, int], data: st.DataObject) -> None:
    token, _ = case
    cut = data.draw(st.integers(0, len(token) - 1))
    with pytest.raises(AuthError):
        verifier().verify(token[:cut], NOW)
    with pytest.raises(AuthError):
        verifier().verify(token + data.draw(st.text(alphabet=B64, min_size=1, max_size=4)), NOW)


@PROPS
@given(st.sampled_from(ROLES), ids)
def test_a_token_of_another_key_is_refused(role: str, jti: str) -> None:
    with pytest.raises(AuthError, match="signature is invalid"):
        verifier().verify(OTHER.issue(role, 3600, NOW, jti=jti), NOW)


@PROPS
@given(issued())
def test_revoked_token_or_identity_is_refused(case: tuple[str, int]) -> None:
    token, _ = case
    claims = peek(token)
    v = verifier()
    v.revoked.add(claims.jti)
    with pytest.raises(AuthError, match="revoked"):
        v.verify(token, NOW)
    if claims.nid is not None:
        v = verifier()
        v.revoked.add(claims.nid)
        with pytest.raises(AuthError, match="revoked"):
            v.verify(token, NOW)


@PROPS
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: "sco1." + b.hex()))
def test_arbitrary_text_is_refused_with_auth_error_only(text: str) -> None:
    with pytest.raises(AuthError):
        verifier().verify(text, NOW)
    with pytest.raises(AuthError):
        jointoken.parse(text)
    with pytest.raises(AuthError):
        jointoken.parse(jointoken.PREFIX + text)


@st.composite
def joins(draw: st.DrawFn) -> jointoken.JoinToken:
    hosts = draw(st.lists(st.sampled_from(["10.0.0.1", "ctl.example.org", "127.0.0.1", "[::1]", "host-7"]), min_size=1, max_size=4, unique=True))
    port = draw(st.integers(1, 65535))
    token, _ = draw(issued())
    return jointoken.JoinToken(tuple(f"wss://{h}:{port}" for h in hosts), FP, token)


@PROPS
@given(joins())
def test_join_token_round_trip(join: jointoken.JoinToken) -> None:
    text = jointoken.encode(join)
    assert text.startswith("SCALEOUT-1.") and jointoken.is_join_token(text)
    assert jointoken.parse(text) == join


@PROPS
@given(joins(), st.data())
def test_a_truncated_join_token_is_refused(join: jointoken.JoinToken, data: st.DataObject) -> None:
    text = jointoken.encode(join)
    cut = data.draw(st.integers(0, len(text) - 1))
    with pytest.raises(AuthError):
        jointoken.parse(text[:cut])


@PROPS
@given(joins(), st.data())
def test_an_edited_join_token_is_refused_or_cannot_be_used(join: jointoken.JoinToken, data: st.DataObject) -> None:
    """The wrapper is not signed (its CA fingerprint is the trust anchor): an edit is either
    refused as malformed, or changes what it says; a changed credential never verifies."""
    text = jointoken.encode(join)
    i = data.draw(st.integers(len(jointoken.PREFIX), len(text) - 1))
    c = data.draw(st.sampled_from(B64))
    assume(c != text[i])
    try:
        edited = jointoken.parse(text[:i] + c + text[i + 1 :])
    except AuthError:
        return
    assert edited != join
    if edited.token != join.token:
        with pytest.raises(AuthError):
            verifier().verify(edited.token, NOW)


def test_join_token_needs_a_fingerprint_for_tls_and_well_formed_parts() -> None:
    token = SIGNER.issue("client", 60, NOW, jti="j")
    with pytest.raises(AuthError, match="no CA fingerprint"):
        jointoken.encode(jointoken.JoinToken(("wss://h:1",), None, token))
    with pytest.raises(AuthError, match="fingerprint"):
        jointoken.encode(jointoken.JoinToken(("wss://h:1",), "sha256:xyz", token))
    with pytest.raises(AuthError, match="addresses"):
        jointoken.encode(jointoken.JoinToken(("https://h:1",), FP, token))
    with pytest.raises(AuthError, match="malformed"):
        jointoken.encode(jointoken.JoinToken(("wss://h:1",), FP, "not-a-token"))
    plain = jointoken.encode(jointoken.JoinToken(("ws://h:1",), None, token))
    assert jointoken.parse(plain).ca is None
