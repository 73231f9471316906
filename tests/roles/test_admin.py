"""The admin service and its websocket door (issue 14 #6).

The door's decisions (which method, which keyword arguments, who may call) need no event
loop; the service is called directly, as a Python program would, on a prepared data dir.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.errors import AuthError, ConflictError, ProtocolError
from scaleout.roles.admin import AdminService, Caller
from scaleout.roles.door import decode, operations

OPS = operations(AdminService)


def test_the_door_maps_each_op_to_its_method_and_args_to_keywords() -> None:
    op, kwargs = decode(OPS, "admin", "metric.ls", {"session_id": "latest", "limit": 5})
    assert (op.method, kwargs) == ("metric_ls", {"session_id": "latest", "limit": 5})
    op, kwargs = decode(OPS, "admin", "model.set_seed", {})
    assert op.method == "model_set_seed" and op.payload and kwargs == {}
    # session.start passes its settings on (SessionConfig names an unknown one itself).
    op, kwargs = decode(OPS, "admin", "session.start", {"rounds": 2, "aggregator": "fedavg", "model": "abc"})
    assert op.more and kwargs == {"rounds": 2, "aggregator": "fedavg", "model": "abc"}
    # null is "not given" where the method allows it.
    assert decode(OPS, "admin", "model.get", {"id": None})[1] == {"id": None}


def test_the_door_refuses_an_unknown_operation_or_argument_by_name() -> None:
    with pytest.raises(ProtocolError, match=r"unknown operation 'no\.such'"):
        decode(OPS, "admin", "no.such", {})
    with pytest.raises(ProtocolError, match=r"^model\.ls: unknown argument 'sesion_id' \(it takes session_id\)"):
        decode(OPS, "admin", "model.ls", {"sesion_id": "s-1"})
    with pytest.raises(ProtocolError, match=r"^status: unknown argument 'x' \(it takes no arguments\)"):
        decode(OPS, "admin", "status", {"x": 1})
    with pytest.raises(ProtocolError, match="unknown argument 'data'"):  # the payload is not an argument
        decode(OPS, "admin", "model.set_seed", {"data": "AAAA"})


def test_the_door_refuses_a_mistyped_argument_naming_it() -> None:
    # Generic words where the operation had none of its own ...
    with pytest.raises(ProtocolError, match=r"^session\.show: clients must be true or false$"):
        decode(OPS, "admin", "session.show", {"clients": "yes"})
    with pytest.raises(ProtocolError, match=r"^command\.run: clients must be a list of text$"):
        decode(OPS, "admin", "command.run", {"kind": "command", "clients": ["a", 1]})
    with pytest.raises(ProtocolError, match=r"^command\.ls: limit must be a whole number$"):
        decode(OPS, "admin", "command.ls", {"limit": True})  # a bool is not a number
    # ... and the operation's own words where it had them (the CLI and tests rely on them).
    with pytest.raises(ProtocolError, match=r"^token\.create needs ttl_s, a whole number of seconds"):
        decode(OPS, "admin", "token.create", {"role": "client", "ttl_s": "1h"})
    with pytest.raises(ProtocolError, match=r"^token\.create needs ttl_s"):  # missing: the same words
        decode(OPS, "admin", "token.create", {"role": "client"})
    with pytest.raises(ProtocolError, match=r"^metric\.ls: limit must be a whole number >= 0$"):
        decode(OPS, "admin", "metric.ls", {"limit": "10"})
    with pytest.raises(ProtocolError, match=r"^client name must be 1-128 letters.*got 5"):
        decode(OPS, "admin", "client.show", {"name": 5})
    with pytest.raises(ProtocolError, match=r"^client name must be .*got None"):  # required, missing
        decode(OPS, "admin", "client.rm", {})


def test_the_door_checks_the_role_with_the_one_table() -> None:
    with pytest.raises(AuthError, match="a client token may not do status"):
        decode(OPS, "client", "status", {})
    with pytest.raises(AuthError, match="a combiner token may not do package.set_active"):
        decode(OPS, "combiner", "package.set_active", {"name": "x.tgz"})
    # What a node may do passes (model.get for a combiner, package.get for a client).
    assert decode(OPS, "combiner", "model.get", {"id": "abc"})[0].method == "model_get"
    assert decode(OPS, "client", "package.get", {})[0].method == "package_get"
    # The role is checked before the arguments: a refused caller learns nothing about them.
    with pytest.raises(AuthError):
        decode(OPS, "client", "token.create", {"bogus": 1})


def test_every_service_operation_is_in_the_table_and_nothing_else_is_served() -> None:
    from scaleout.core import permissions

    link_level = {"session.wait", "client.assign", "combiner.register", "combiner.ready", "node.enrol", "combiner.renew"}
    assert set(OPS) | link_level == set(permissions.REQUESTS)


def test_the_service_is_a_python_door(tmp_path: Path) -> None:
    """Called directly on a prepared data dir: no link, no websocket, the same answers and
    audit entries (the actor a Caller names)."""
    from scaleout.roles.controller import Controller, ControllerSettings

    ctl = Controller(ControllerSettings(data_dir=tmp_path / "ctl", insecure=True))
    ctl.prepare()
    ctl.url = "ws://127.0.0.1:9"  # what run() sets once it listens; a join token names it (nothing dials it here)
    admin = ctl.admin
    me = Caller("admin", "admin:t-python (notebook)", "in-process")
    seed = payload.encode([np.arange(6, dtype=np.float32).reshape(2, 3)])

    async def use() -> None:
        made = await admin.model_set_seed(me, seed)
        assert made["id"] == payload.model_id(seed) and made["tensors"] == 1
        listed = await admin.model_ls(me)
        assert [(r["id"], r["active"]) for r in listed["models"]] == [(made["id"], True)]
        info, data = await admin.model_get(me)  # the bytes leave, with their id
        assert info == {"id": made["id"]} and bytes(data.data) == seed and data.sha256 == made["id"]  # bytes-like: the file, mapped
        token = await admin.token_create(me, role="client", ttl_s=3600, name="lab-1", uses=2)
        assert (token["role"], token["name"], token["uses"]) == ("client", "lab-1", 2)
        with pytest.raises(ProtocolError, match="token.create: uses must be a whole number"):
            await admin.token_create(me, role="client", ttl_s=3600, uses=0)  # a direct call is checked too
        assert (await admin.status(me))["active_model"] == made["id"]
        with pytest.raises(ConflictError, match="no global model yet"):
            await _no_model(tmp_path)
        entries = (await admin.audit_ls(me, limit=0))["entries"]
        mine = [(e["action"], e["address"]) for e in entries if e["actor"] == me.actor]
        assert mine == [("model.set_seed", "in-process"), ("model.download", "in-process"), ("token.create", "in-process")]
        assert (await admin.audit_verify(me))["ok"] is True

    try:
        asyncio.run(use())
    finally:
        ctl.state.close()


async def _no_model(tmp_path: Path) -> None:
    """session.start on a data dir with no model says what to do first."""
    from scaleout.roles.controller import Controller, ControllerSettings

    ctl = Controller(ControllerSettings(data_dir=tmp_path / "empty", insecure=True))
    ctl.prepare()
    try:
        await ctl.admin.session_start(Caller("admin", "admin:t-x"), rounds=1)
    finally:
        ctl.state.close()
