"""The one table of who may do what."""

from __future__ import annotations

import pytest

from scaleout.core import permissions as p
from scaleout.core.errors import AuthError

NODE_OPS = {"client": {"package.get", "client.assign"}, "combiner": {"model.get", "combiner.register", "combiner.ready"}}


def test_admin_may_request_everything() -> None:
    for op in p.REQUESTS:
        assert p.may_request("admin", op), op
    assert p.may_request("admin", "some.future.op")


@pytest.mark.parametrize("role", ["client", "combiner"])
def test_nodes_may_request_only_what_their_job_needs(role: str) -> None:
    allowed = {op for op in p.REQUESTS if p.may_request(role, op)}
    assert allowed == NODE_OPS[role]
    for op in set(p.REQUESTS) - allowed:
        with pytest.raises(AuthError, match=f"{role} token may not do {op}"):
            p.check_request(role, op)


def test_an_operation_not_in_the_table_is_the_admins_alone() -> None:
    for role in ("client", "combiner", "nobody"):
        assert not p.may_request(role, "token.revoke.everything")
    with pytest.raises(AuthError, match="an admin-ish"):
        p.check_request("admin-ish", "status")


def test_messages_per_role() -> None:
    assert p.may_send("client", "task.result") and p.may_send("client", "hello") and p.may_send("client", "metric")
    assert not p.may_send("client", "round.partial") and not p.may_send("client", "report")
    assert p.may_send("combiner", "round.partial") and p.may_send("combiner", "report")
    assert not p.may_send("combiner", "hello") and not p.may_send("combiner", "task.result")
    assert not p.may_send("nobody", "hello")
