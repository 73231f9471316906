"""What a node says and does when it joins: the expiry warning, the unnamed node's identity,
retrying a controller that is down. Real processes over TLS on loopback."""

from __future__ import annotations

from conftest import QUICKSTART, Federation, Proc

EXPIRY = "token expires at"


def test_the_expiry_warning_is_only_for_a_node_that_has_not_enrolled(fed: Federation) -> None:
    fed.controller()
    combiner = fed.combiner("c1")
    client = fed.client("cl1", package=QUICKSTART)
    fed.wait_clients(1)
    # The join tokens expire within the hour: a node that has yet to enrol is warned.
    assert EXPIRY in combiner.text() and EXPIRY in client.text(), client.text()
    assert client.stop() == 0 and combiner.stop() == 0
    # Enrolled, they reconnect with their own identities: the join token's expiry is no concern.
    combiner = fed.combiner("c1")
    client = fed.client("cl1", package=QUICKSTART)
    fed.wait_clients(1)
    assert EXPIRY not in combiner.text(), combiner.text()
    assert EXPIRY not in client.text(), client.text()
