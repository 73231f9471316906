"""A node's identity file: kept 0600 in a 0700 folder, found again by name, renewed in place."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from scaleout.core.errors import ConfigError
from scaleout.roles.joining import Enrolled, choose_name
from scaleout.security import identity
from scaleout.security.tokens import TokenSigner

SIGNER = TokenSigner.generate()
NOW = 1_700_000_000


def node_token(name: str, nid: str = "n-1", ttl: int = 3600, now: float = NOW) -> str:
    return SIGNER.issue("client", ttl, now, jti=f"i-{now}", sub=name, nid=nid)


def test_saved_private_and_loaded_back(tmp_path: Path) -> None:
    ident = identity.Identity("n-1", "client", "site-17", node_token("site-17"), "wss://h:1", "sha256:" + "0" * 64)
    path = identity.path_for(tmp_path / "state", "abc", "client", "site-17")
    identity.save(path, ident)
    assert identity.load(path) == ident
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert identity.names_in(tmp_path / "state", "abc", "client") == ["site-17"]
    assert identity.names_in(tmp_path / "state", "other", "client") == []
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="remove it to enrol again"):
        identity.load(path)


def test_name_from_flag_credential_or_the_one_identity_kept(tmp_path: Path) -> None:
    join = SIGNER.issue("client", 60, NOW, jti="t-1", sub="a label, not a name")
    assert choose_name("client", "given", join, tmp_path, "k") == "given"
    assert choose_name("client", "", join, tmp_path, "k") is None  # nothing to go by: a default name
    assert choose_name("client", "", node_token("own"), tmp_path, "k") == "own"
    for name in ("one", "two"):
        identity.save(identity.path_for(tmp_path, "k", "client", name), identity.Identity("n", "client", name, "t", "u", None))
        if name == "one":
            assert choose_name("client", "", join, tmp_path, "k") == "one"
    with pytest.raises(ConfigError, match=r"several client identities .*\(one, two\): pass --name"):
        choose_name("client", "", join, tmp_path, "k")
    assert choose_name("combiner", "", join, tmp_path, "k") is None


def test_a_renewed_credential_replaces_the_kept_one_only_if_it_is_this_nodes(tmp_path: Path) -> None:
    path = identity.path_for(tmp_path, "k", "client", "a")
    node = Enrolled(identity.Identity("n-1", "client", "a", node_token("a"), "u", None), path)
    identity.save(path, node.ident)
    node.renew(node_token("b", nid="n-1", now=NOW + 1))  # another node's name
    node.renew(node_token("a", nid="n-2", now=NOW + 2))  # another identity
    node.renew("garbage")
    node.renew(None)
    assert identity.load(path) == node.ident and node.token == node_token("a")
    fresh = node_token("a", now=NOW + 100)
    node.renew(fresh)
    loaded = identity.load(path)
    assert node.token == fresh and loaded is not None and loaded.token == fresh
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
