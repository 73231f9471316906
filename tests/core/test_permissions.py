"""The one table of who may do what."""

from __future__ import annotations

import pytest

from scaleout.core import permissions as p
from scaleout.core.errors import AuthError

NODE_OPS = {
    "client": {"package.get", "client.assign", "node.enrol"},
    "combiner": {"model.get", "combiner.register", "combiner.ready", "node.enrol", "combiner.renew"},
}


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


def test_messages_per_role_and_receiver() -> None:
    for t in ("task.result", "hello", "metric"):
        assert p.may_send("client", t, "combiner") and not p.may_send("client", t, "controller")
    for t in ("round.partial", "report", "clients.changed", "round.validated"):
        assert p.may_send("combiner", t, "controller") and not p.may_send("client", t, "controller")
        assert not p.may_send("combiner", t, "combiner")
    assert not p.may_send("combiner", "hello", "controller") and not p.may_send("nobody", "hello", "combiner")
    assert p.may_send("admin", "anything.new", "controller")  # admin: everything
    with pytest.raises(AuthError, match="a client may not send round.partial to the controller"):
        p.check_message("client", "round.partial", "controller")


def test_every_message_named_is_a_message_type() -> None:
    from scaleout.core import messages

    known = set(messages._REGISTRY)
    for by_role in p.MESSAGES.values():
        for types in by_role.values():
            assert types <= known, types - known


def test_the_controllers_operations_are_all_in_the_table(tmp_path: object) -> None:
    # No operation may be missing from the table (it would fall to admin-only silently); the
    # controller keeps no roles of its own beside its handlers.
    from pathlib import Path

    from scaleout.roles.controller import Controller, ControllerSettings

    ctl = Controller(ControllerSettings(data_dir=Path(str(tmp_path))))
    served = set(ctl._ops) | set(ctl.door.ops)  # the link's own operations and the admin service's
    assert served == set(p.REQUESTS), sorted(served ^ set(p.REQUESTS))
    assert all(callable(handler) for handler in ctl._ops.values())


def test_the_reads_a_client_may_repeat_are_operations_that_change_nothing() -> None:
    # READS decides which requests the Python client sends again after a dropped link: a
    # name not in the table (a rename) or a write among them would repeat a write.
    assert p.READS <= set(p.REQUESTS), sorted(p.READS - set(p.REQUESTS))
    writes = {"session.start", "session.continue", "session.stop", "package.set_active", "model.set_seed", "model.set_active",
              "command.run", "token.create", "token.revoke", "client.rm", "combiner.rm", "node.enrol"}
    assert not p.READS & writes
