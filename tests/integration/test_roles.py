"""Roles on every message, over real links: each role is refused what it may not do.

The table is core/permissions.py; here a client token and a combiner token try every
operation that is not theirs, node links are held to a node's payload limit before they
register, and a client tries to pass off another client's task as its own at the combiner.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import QUICKSTART, Federation
from websockets.asyncio.client import ClientConnection, connect

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.core import messages as m
from scaleout.core import permissions
from scaleout.core.errors import RemoteError
from scaleout.roles.controller import Controller, ControllerSettings
from scaleout.security.tls import client_context
from scaleout.transport.link import Hashed, Incoming, Link
from scaleout.transport.net import connect as link_connect

TIMEOUT = 10.0


def test_the_controller_serves_what_the_table_lists() -> None:
    ctl = Controller(ControllerSettings(data_dir=Path("/nonexistent")))
    # Every operation it serves is in the one table (core/permissions.py), where the check
    # reads who may call it: a new operation for nodes is opened there, nowhere else.
    served = set(ctl._ops) | set(ctl.door.ops)  # the link's own operations and the admin service's
    assert served <= set(permissions.REQUESTS), sorted(served - set(permissions.REQUESTS))
    assert not set(ctl._ops) & set(ctl.door.ops)  # one handler for each


def refused(fed: Federation, token: str, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None) -> RemoteError:
    conn = Connection(fed.url, token, Path(fed.ca), False)
    with pytest.raises(RemoteError) as info:
        asyncio.run(asyncio.wait_for(call_async(conn, op, args, blob), TIMEOUT))
    return info.value


@pytest.mark.parametrize("role", ["client", "combiner"])
def test_a_node_token_is_refused_every_operation_that_is_not_its_own(fed: Federation, role: str) -> None:
    fed.controller()
    token = fed.token(role)
    for op in sorted(permissions.REQUESTS):
        if permissions.may_request(role, op):
            continue
        err = refused(fed, token, op, {"role": "admin", "ttl_s": 60, "rounds": 1}, b"x" if op.startswith(("model.set", "package.set")) else None)
        assert err.code == "unauthorized", (op, err)
        assert f"a {role} token may not do {op}" == str(err), err
    # Nothing was done: no token was issued (only the one the test made), no session, no model.
    entries = fed.admin("audit.ls")[0]["entries"]
    assert [e["action"] for e in entries] == ["token.create"], entries
    assert fed.admin("session.ls")[0]["sessions"] == [] and fed.admin("model.ls")[0]["models"] == []


@asynccontextmanager
async def raw(fed: Federation, token: str) -> AsyncIterator[ClientConnection]:
    async with connect(fed.url, ssl=client_context(fed.ca), additional_headers={"Authorization": f"Bearer {token}"}, proxy=None) as ws:
        yield ws


async def next_json(ws: ClientConnection) -> dict[str, Any]:
    while True:
        frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
        if isinstance(frame, str):
            return json.loads(frame)  # type: ignore[no-any-return]


def announce(transfer: str, size: int) -> str:
    return json.dumps({"v": m.PROTOCOL_VERSION, "type": "blob", "id": f"b-{transfer}", "transfer": transfer, "size": size, "sha256": "0" * 64})


@pytest.mark.parametrize("role", ["client", "combiner"])
def test_a_node_link_gets_a_nodes_payload_limit_before_it_registers(fed: Federation, role: str) -> None:
    fed.controller()
    token = fed.token(role)
    admin = (fed.data / "admin.token").read_text().strip()

    async def go() -> None:
        async with raw(fed, token) as ws:
            # Neither uploads anything it was not asked for (a combiner's partial is pulled): no
            # payload at all, where the admin may send 4 GiB.
            for size in (2 << 20, 1):
                await ws.send(announce(f"{size:016x}", size))
                msg = await next_json(ws)
                assert msg["type"] == "error" and "exceeds the limit of 0 B" in msg["message"], msg
        async with raw(fed, admin) as ws:  # the admin's limit is the controller's
            await ws.send(announce("d" * 16, 2 << 20))
            await ws.send(json.dumps({"v": m.PROTOCOL_VERSION, "type": "request", "id": "s", "op": "status", "args": {}}))
            msg = await next_json(ws)
            assert msg["type"] == "reply" and msg["ok"], msg

    asyncio.run(go())


def test_a_combiner_must_register_before_anything_else(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    err = refused(fed, fed.identity("combiner", "early"), "model.get")
    assert err.code == "unauthorized" and "register first" in str(err), err


def test_nodes_may_not_send_each_others_messages_to_the_controller(fed: Federation) -> None:
    fed.controller()
    cases = [
        ("client", {"type": "round.partial", "session_id": "s", "round_index": 1, "count": 1, "weight": 1.0, "size": 1}, "a client may not send round.partial to the controller"),
        ("client", {"type": "report", "kind": "train", "session_id": "s", "round_index": 1, "client": "x", "data": {}}, "a client may not send report to the controller"),
        ("combiner", {"type": "hello", "name": "x"}, "a combiner may not send hello to the controller"),
        ("combiner", {"type": "report", "kind": "train", "session_id": "s", "round_index": 1, "client": "x", "data": {}}, "register first"),
    ]

    tokens = {role: fed.token(role) for role in ("client", "combiner")}

    async def go() -> None:
        for role, body, why in cases:
            async with raw(fed, tokens[role]) as ws:
                await ws.send(json.dumps({"v": m.PROTOCOL_VERSION, "id": "1", **body}))
                msg = await next_json(ws)
                assert msg["type"] == "error" and why in msg["message"], (role, body, msg)

    asyncio.run(go())


class FakeClient:
    """A client speaking the protocol by hand (a test's, so it can misbehave): it says hello,
    keeps the tasks it gets, and serves the seed model back as its update when pulled."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: asyncio.Queue[tuple[m.Task, bytes]] = asyncio.Queue()
        self.errors: asyncio.Queue[m.Error] = asyncio.Queue()
        self.update: bytes | None = None
        self.link: Link | None = None

    async def start(self, fed: Federation, token: str) -> None:
        ctx = client_context(fed.ca)
        ctl = await link_connect(fed.url, token, ctx, max_payload=1 << 20)
        reader = asyncio.create_task(ctl.run())
        info, _ = await ctl.request("client.assign", {"name": self.name}, timeout=TIMEOUT)
        await ctl.ws.close()
        reader.cancel()
        self.link = await link_connect(str(info["url"]), str(info["ticket"]), ctx, max_payload=1 << 30, peer_role="combiner")
        self.reader = asyncio.create_task(self.link.run(on_message=self.on_message, on_request=self.on_request))
        await self.link.send(m.Hello(name=self.name))

    async def on_message(self, inc: Incoming) -> None:
        if isinstance(inc.msg, m.Task):
            assert inc.blob is not None
            await self.tasks.put((inc.msg, inc.blob))

    async def on_request(self, req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], Hashed]:
        assert req.op == "update.get" and self.update is not None
        return {}, Hashed(self.update, hashlib.sha256(self.update).hexdigest())

    async def result(self, task_id: str, model: bytes, examples: int) -> None:
        assert self.link is not None
        self.update = model
        meta = {"metadata": {"training_metadata": {"num_examples": examples}}}
        await self.link.send(m.TaskResult(task_id=task_id, ok=True, data=meta, size=len(model)))


def test_a_client_cannot_send_results_or_metrics_for_another_clients_task(fed: Federation) -> None:
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    # Each has a credential of its own (as `scaleout join` enrols): the names are theirs.
    own = {name: fed.identity("client", name) for name in ("alice", "mallory")}
    admin = fed.conn
    assert admin is not None

    async def go() -> dict[str, Any]:
        alice, mallory = FakeClient("alice"), FakeClient("mallory")
        await alice.start(fed, own["alice"])
        await mallory.start(fed, own["mallory"])
        assert mallory.link is not None
        await call_async(admin, "client.wait", {"count": 2, "timeout": TIMEOUT})
        session = (await call_async(admin, "session.start", {"rounds": 1, "min_clients": 2, "validate": False, "round_timeout": 30}))[0]["session"]
        (a_task, model), (m_task, _) = await asyncio.wait_for(asyncio.gather(alice.tasks.get(), mallory.tasks.get()), TIMEOUT)
        # Mallory answers Alice's task (with a huge weight) and logs a metric under it: both refused.
        await mallory.result(a_task.task_id, model, 10**9)
        await mallory.link.send(m.Metric(task_id=a_task.task_id, metrics={"loss": -1.0}))
        # Then the honest answers: each its own.
        await mallory.result(m_task.task_id, model, 1)
        await alice.result(a_task.task_id, model, 3)
        return (await call_async(admin, "session.wait", {"id": session["id"]}))[0]["session"]

    session = asyncio.run(asyncio.wait_for(go(), 60))
    assert session["status"] == "finished", session
    (rnd,) = session["rounds"]
    assert rnd["participants"] == ["alice", "mallory"], rnd
    log = next(p for p in fed.procs if p.name == "c1").text()
    assert "client mallory sent a message for task" in log and "of client alice: refused" in log, log
    assert log.count(": refused") == 2, log
    shown = fed.admin("session.show", {"id": session["id"], "clients": True})[0]["session"]["rounds"][0]["clients"]
    trains = {c["client"]: c for c in shown if c["kind"] == "train"}
    assert trains["alice"]["data"]["metadata"]["training_metadata"]["num_examples"] == 3, trains  # alice's own, not mallory's 10**9
    assert not trains["alice"]["error"] and not trains["mallory"]["error"], trains


class FakeCombiner:
    """A combiner speaking the protocol by hand: it registers with one client, "x", and
    answers each round with a partial naming ``contributors`` (the seed, weight 1)."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.contributors = ["x"]
        self.errors: asyncio.Queue[str] = asyncio.Queue()
        self.partial: bytes | None = None

    async def start(self, fed: Federation, token: str) -> None:
        self.link = await link_connect(fed.url, token, client_context(fed.ca), max_payload=1 << 30)
        self.reader = asyncio.create_task(self.link.run(on_message=self.on_message, on_request=self.on_request))
        await self.link.request("combiner.register", {"name": "fake"}, timeout=TIMEOUT)
        await self.link.request("combiner.ready", {"url": "wss://127.0.0.1:1"}, timeout=TIMEOUT)
        await self.link.send(m.ClientsChanged(joined=["x"], proofs=[fed.ticket("x", "fake")]))

    async def on_message(self, inc: Incoming) -> None:
        msg = inc.msg
        if isinstance(msg, m.RoundStart):
            from scaleout.core import payload
            from scaleout.core.aggregators.base import Partial, encode_partial

            named = {k: v.astype("float64") for k, v in payload.read(self.seed)[0].items()}
            self.partial = encode_partial(Partial(named, 1.0, len(self.contributors), list(self.contributors)))
            await self.link.send(m.RoundPartial(session_id=msg.session_id, round_index=msg.round_index, count=len(self.contributors), weight=1.0, size=len(self.partial)))

    async def on_request(self, req: m.Request, blob: bytes | None) -> tuple[dict[str, Any], bytes | None]:
        assert req.op == "partial.get"
        return {}, self.partial


def test_a_combiner_may_speak_only_for_its_own_clients(fed: Federation, caplog: pytest.LogCaptureFixture) -> None:
    fed.controller()
    seed_id = fed.seed_from(QUICKSTART)
    seed = fed.admin("model.get", {"id": seed_id})[1]
    assert seed is not None
    token = fed.identity("combiner", "fake")
    admin = fed.conn
    assert admin is not None

    def report(client: str) -> m.Report:
        return m.Report(kind="metric", session_id="s-1", round_index=1, client=client, data={"loss": 1.0})

    async def go() -> list[dict[str, Any]]:
        fake = FakeCombiner(seed)
        await fake.start(fed, token)
        for client in ("y", "x", "z"):
            await fake.link.send(report(client))
        await call_async(admin, "client.wait", {"count": 1, "timeout": TIMEOUT})
        sessions = []
        for contributors in (["mallory"], ["x", "x"], ["x"]):
            fake.contributors = contributors
            start = {"rounds": 1, "min_clients": 1, "validate": False, "round_timeout": 10}
            s = (await call_async(admin, "session.start", start))[0]["session"]
            sessions.append((await call_async(admin, "session.wait", {"id": s["id"]}))[0]["session"])
        fake.reader.cancel()
        return sessions

    with caplog.at_level("WARNING", logger="scaleout.transport"):
        stranger, twice, own = asyncio.run(asyncio.wait_for(go(), 60))
    complaints = [r.getMessage() for r in caplog.records if "reported an error" in r.getMessage()]
    assert len(complaints) == 2 and "may not report for client 'y'" in complaints[0] and "'z'" in complaints[1], complaints
    assert stranger["status"] == "failed" and "partial aggregate names clients it was not given this round (mallory)" in stranger["rounds"][0]["reason"], stranger
    # Given one client, a partial of two updates is refused at its announce now (before: once pulled, as naming x twice).
    assert twice["status"] == "failed" and "partial aggregate of 2 updates announced; the combiner was given 1 clients" in twice["rounds"][0]["reason"], twice
    assert own["status"] == "finished" and own["rounds"][0]["participants"] == ["x"], own
    # Only the honest round made a model (the mean of one seed-valued partial: the seed again).
    assert stranger["rounds"][0]["model_id"] is None and twice["rounds"][0]["model_id"] is None
    assert own["rounds"][0]["model_id"] == seed_id
