"""Bad input from every side: refused with a clear error, and nothing else disturbed.

Tokens at the handshake, role checks per operation, malformed frames, corrupt, oversize
and invalid payloads, refused updates inside a real round, a round below --min-clients,
and an admin stopping a running session. Raw protocol abuse goes over a websocket we open
ourselves; everything else goes through the admin API, as a user would.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, QUICKSTART, Federation, wait_stdout
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from scaleout.commands.admin import call_async
from scaleout.commands.connection import Connection
from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.core.errors import RemoteError
from scaleout.edge import EdgeClient
from scaleout.security.tls import client_context
from scaleout.security.tokens import TokenSigner

REPLY_TIMEOUT = 10.0
GOOD = ["good-0", "good-1", "good-2"]


# -- helpers ---------------------------------------------------------------------------


@asynccontextmanager
async def raw(fed: Federation, token: str | None) -> AsyncIterator[ClientConnection]:
    """A bare websocket to the controller, with ``token`` (or no Authorization header)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    ctx = client_context(fed.ca)
    async with connect(fed.url, ssl=ctx, additional_headers=headers, proxy=None, open_timeout=REPLY_TIMEOUT) as ws:
        yield ws


async def next_json(ws: ClientConnection) -> dict[str, Any]:
    """The next text frame from the peer, decoded."""
    while True:
        frame = await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT)
        if isinstance(frame, str):
            return json.loads(frame)  # type: ignore[no-any-return]


async def request(
    ws: ClientConnection, op: str, args: dict[str, Any] | None = None, *, rid: str, blob: str | None = None
) -> dict[str, Any]:
    """Send a request frame by hand and return its reply (any ``error`` frames before it fail)."""
    body: dict[str, Any] = {"v": m.PROTOCOL_VERSION, "type": "request", "id": rid, "op": op, "args": args or {}}
    if blob is not None:
        body["blob"] = blob
    await ws.send(json.dumps(body))
    msg = await next_json(ws)
    assert msg["type"] == "reply" and msg["re"] == rid, msg
    return msg


async def send_blob(ws: ClientConnection, transfer: str, data: bytes, *, announce: bytes | None = None) -> None:
    """Announce a payload as the size and sha256 of ``announce`` (default: ``data``), send ``data``."""
    shown = data if announce is None else announce
    start = {"v": m.PROTOCOL_VERSION, "type": "blob", "id": f"b-{transfer}", "transfer": transfer, "size": len(shown)}
    await ws.send(json.dumps({**start, "sha256": hashlib.sha256(shown).hexdigest()}))
    await ws.send(transfer.encode("ascii") + data)


def refused_handshake(fed: Federation, token: str | None) -> InvalidStatus:
    async def go() -> InvalidStatus:
        with pytest.raises(InvalidStatus) as info:
            async with raw(fed, token):
                pass
        return info.value

    return asyncio.run(go())


def call_as(fed: Federation, token: str, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None) -> RemoteError:
    """Run ``op`` with another token; it must be refused: returns the error."""
    conn = Connection(fed.url, token, Path(fed.ca), False)
    with pytest.raises(RemoteError) as info:
        asyncio.run(asyncio.wait_for(call_async(conn, op, args, blob), REPLY_TIMEOUT))
    return info.value


def admin_refused(fed: Federation, op: str, args: dict[str, Any] | None = None, blob: bytes | None = None) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fed.admin(op, args, blob, timeout=REPLY_TIMEOUT)
    return info.value


def status(fed: Federation) -> dict[str, Any]:
    result = fed.admin("status", timeout=REPLY_TIMEOUT)[0]
    assert result["url"] == fed.url
    return result


def reports(fed: Federation, session_id: str, kind: str = "train") -> dict[str, dict[str, Any]]:
    """The controller's stored reports of one kind, by client (read from state.db)."""
    with closing(sqlite3.connect(f"file:{fed.data / 'state.db'}?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM reports WHERE session_id=? AND kind=? ORDER BY id", (session_id, kind)).fetchall()
    return {r["client"]: dict(r) for r in rows}


def quickstart_fedavg(seed: bytes, names: list[str]) -> dict[str, np.ndarray]:
    """One FedAvg round of quickstart clients called ``names``, as a plain in-process reference.

    Quickstart's training is deterministic per client name, so this is what the round must give.
    """
    spec = importlib.util.spec_from_file_location("quickstart_startup_ref", QUICKSTART / "startup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sums: dict[str, np.ndarray] = {}
    total = 0
    for name in names:
        client = EdgeClient(name)
        module.startup(client)
        data, metadata = client.run_train(seed, {})
        weight = metadata["training_metadata"]["num_examples"]
        for key, value in payload.read(data)[0].items():
            sums[key] = sums.get(key, 0) + np.asarray(value, dtype=np.float64) * weight
        total += weight
    return {key: (value / total).astype(np.float32) for key, value in sums.items()}


def one_round_federation(fed: Federation, others: list[tuple[str, Path]], good: list[str] = GOOD) -> str:
    """Controller, quickstart seed, one combiner, ``good`` quickstart clients plus ``others``."""
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    for name in good:
        fed.client(name, package=QUICKSTART)
    for name, package in others:
        fed.client(name, package=package)
    fed.wait_clients(len(good) + len(others))
    return seed


# -- 1. tokens at the handshake ----------------------------------------------------------


def test_handshake_refuses_missing_wrong_and_expired_tokens_with_401(fed: Federation) -> None:
    fed.controller()
    own = TokenSigner.load_or_create(fed.data / "token.key")  # the controller's own key
    foreign = TokenSigner.generate().issue("admin", 3600, time.time(), jti="foreign")
    # A real client token whose claims were edited to say admin: the signature no longer fits.
    prefix, claims, signature = fed.token("client").split(".")
    raised = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    raised["role"] = "admin"
    edited = base64.urlsafe_b64encode(json.dumps(raised).encode()).rstrip(b"=").decode()
    forged = f"{prefix}.{edited}.{signature}"
    expired = own.issue("admin", 60, time.time() - 3600, jti="expired")
    cases = [
        (None, "no token"),
        ("", "no token"),
        ("garbage", "malformed"),
        ("sco1.e30.", "malformed"),
        (foreign, "signature is invalid"),
        (forged, "signature is invalid"),
        (expired, "expired"),
    ]
    for token, why in cases:
        exc = refused_handshake(fed, token)
        assert exc.response.status_code == 401, (token, exc)
        body = exc.response.body.decode()
        assert why in body, (token, body)
    # A live token from the same key is let in: the refusals above were about the tokens.
    live = own.issue("admin", 60, time.time(), jti="live")
    conn = Connection(fed.url, live, Path(fed.ca), False)
    assert asyncio.run(call_async(conn, "status"))[0]["url"] == fed.url
    assert status(fed)["session"] is None


# -- 2. roles per operation ----------------------------------------------------------------


def test_client_and_combiner_tokens_cannot_run_admin_operations(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    client, combiner = fed.token("client"), fed.token("combiner")
    admin_ops: list[tuple[str, dict[str, Any]]] = [
        ("session.start", {"rounds": 1}),
        ("token.create", {"role": "admin", "ttl_s": 3600}),
        ("model.set_seed", {}),
        ("status", {}),
    ]
    for op, args in admin_ops:
        err = call_as(fed, client, op, args, b"x" if op == "model.set_seed" else None)
        assert err.code == "unauthorized", (op, err.code, err)
        assert "client token may not" in str(err) and op in str(err), err
    err = call_as(fed, combiner, "package.set_active", {"name": "evil.tgz"}, b"not even a package")
    assert err.code == "unauthorized", err
    assert "combiner token may not do package.set_active" in str(err)
    # The tokens are fine for what their role may do: the refusal is per operation.
    # (a join token only enrols: a client's own credential may fetch the package)
    assert call_as(fed, fed.identity("client", "k-ok"), "package.get").code == "not_found"
    # Nothing happened: no session, no package, the same model.
    now = status(fed)
    assert (now["session"], now["active_package"], now["active_model"]) == (None, None, seed)
    assert fed.admin("session.ls")[0]["sessions"] == []
    assert [m["id"] for m in fed.admin("model.ls")[0]["models"]] == [seed]


# -- 3. malformed frames -------------------------------------------------------------------

BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "must be a JSON object"),
    ('"just a string"', "must be a JSON object"),
    ('{"v": 2, "type": "bogus", "id": "1"}', "unknown message type 'bogus'"),
    ('{"v": 2, "id": "1"}', "unknown message type None"),
    ('{"v": 1, "type": "request", "id": "2", "op": "status"}', "protocol version 1 is not supported"),
    ('{"type": "request", "id": "3", "op": "status"}', "protocol version None is not supported"),
    ('{"v": "2", "type": "request", "id": "3", "op": "status"}', "protocol version '2' is not supported"),
    ('{"v": 2, "type": "request", "id": "4"}', "missing field 'op'"),
    ('{"v": 2, "type": "request", "id": "5", "op": "status", "args": []}', "field 'args' has the wrong type"),
    ('{"v": 2, "type": "request", "id": "6", "op": "status", "extra": 1}', "unexpected field(s) extra"),
    ('{"v": 2, "type": "request", "id": "7", "op": "status", "args": {"x": NaN}}', "not valid JSON"),
    (b"short", "too short"),
    (b"0123456789abcdefchunk", "unknown transfer"),
]


def test_malformed_frames_get_an_error_and_the_link_keeps_working(fed: Federation) -> None:
    fed.controller()

    async def go() -> None:
        async with raw(fed, (fed.data / "admin.token").read_text().strip()) as ws:
            for frame, why in BAD_FRAMES:
                await ws.send(frame)
                msg = await next_json(ws)
                assert msg["type"] == "error", (frame, msg)
                assert msg["code"] == "bad_message", (frame, msg)
                assert why in msg["message"], (frame, msg)
            reply = await request(ws, "no.such.op", rid="u1")
            assert reply["ok"] is False and reply["error"]["code"] == "bad_message", reply
            assert "unknown operation 'no.such.op'" in reply["error"]["message"], reply
            # The same connection still serves a good request.
            reply = await request(ws, "status", rid="s1")
            assert reply["ok"] is True and reply["result"]["url"] == fed.url, reply

    asyncio.run(go())
    assert status(fed)["session"] is None


def test_deeply_nested_json_is_a_protocol_error(fed: Federation) -> None:
    fed.controller()

    async def go() -> None:
        async with raw(fed, (fed.data / "admin.token").read_text().strip()) as ws:
            for frame in ("[" * 100_000, '{"a":' * 50_000):
                await ws.send(frame)
                msg = await next_json(ws)
                assert msg["type"] == "error", msg
                assert msg["code"] == "bad_message" and "JSON" in msg["message"], msg
            reply = await request(ws, "status", rid="s1")
            assert reply["ok"] is True, reply

    asyncio.run(go())
    assert status(fed)["session"] is None


def test_message_the_controller_does_not_take_gets_an_error(fed: Federation) -> None:
    fed.controller()
    token = fed.token("client")

    async def go() -> None:
        async with raw(fed, token) as ws:
            await ws.send(json.dumps({"v": m.PROTOCOL_VERSION, "type": "hello", "id": "h1", "name": "sneaky"}))
            await ws.send(json.dumps({"v": m.PROTOCOL_VERSION, "type": "request", "id": "p1", "op": "package.get", "args": {}}))
            # The error about the hello must come before the reply to the request sent after it.
            msg = await next_json(ws)
            assert msg["type"] == "error", msg
            assert "hello" in msg["message"], msg

    asyncio.run(go())
    assert status(fed)["clients"] == 0


# -- 4. corrupt payload ----------------------------------------------------------------------


def test_corrupt_payload_is_refused_and_the_model_is_unchanged(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    good = payload.encode([np.arange(64, dtype=np.float32)])
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF  # same size, one tensor byte flipped

    async def go() -> None:
        async with raw(fed, (fed.data / "admin.token").read_text().strip()) as ws:
            await send_blob(ws, "c0ffee0123456789", bytes(corrupt), announce=good)
            reply = await request(ws, "model.set_seed", rid="r1", blob="c0ffee0123456789")
            assert reply["ok"] is False, reply
            message = reply["error"]["message"]
            assert "corrupt" in message and "sha256" in message, reply
            # More bytes than announced, and a payload named before all of it arrived.
            await send_blob(ws, "toolong012345678", good, announce=good[:4])
            msg = await next_json(ws)
            assert msg["type"] == "error" and "larger than the announced 4 bytes" in msg["message"], msg
            reply = await request(ws, "model.set_seed", rid="r2", blob="toolong012345678")
            assert reply["ok"] is False and "larger than the announced" in reply["error"]["message"], reply
            await send_blob(ws, "halfway012345678", good[:10], announce=good)
            reply = await request(ws, "model.set_seed", rid="r3", blob="halfway012345678")
            assert reply["ok"] is False and "before all of it arrived" in reply["error"]["message"], reply
            reply = await request(ws, "status", rid="s1")
            assert reply["result"]["active_model"] == seed, reply
            # The same bytes, intact, on the same link: accepted.
            await send_blob(ws, "0123456789abcdef", good)
            reply = await request(ws, "model.set_seed", rid="r4", blob="0123456789abcdef")
            assert reply["ok"] is True and reply["result"]["id"] == payload.model_id(good), reply

    asyncio.run(go())
    models = [m["id"] for m in fed.admin("model.ls")[0]["models"]]
    assert models == [seed, payload.model_id(good)]  # the refused bytes left no trace
    assert status(fed)["active_model"] == payload.model_id(good)


# -- 5. oversize payload ---------------------------------------------------------------------


def test_oversize_payload_is_refused_with_the_limit(fed: Federation) -> None:
    fed.controller("--max-payload-mb", "1")
    big = payload.encode([np.zeros(512 * 1024, dtype=np.float32)])  # 2 MiB of tensor data
    assert len(big) > 2 << 20
    err = admin_refused(fed, "model.set_seed", {}, big)
    assert "exceeds the limit of 1.0 MiB" in str(err), err
    assert status(fed)["active_model"] is None
    # Below the limit is fine, on a fresh connection to the same controller.
    small = payload.encode([np.zeros(64 * 1024, dtype=np.float32)])  # 256 KiB
    assert fed.admin("model.set_seed", {}, small)[0]["id"] == payload.model_id(small)
    assert status(fed)["active_model"] == payload.model_id(small)


# -- 6. invalid seeds ------------------------------------------------------------------------


def test_seed_that_is_not_safetensors_or_not_finite_is_refused(fed: Federation) -> None:
    fed.controller()
    err = admin_refused(fed, "model.set_seed", {}, b"this is not a safetensors file at all")
    assert err.code == "bad_payload", err
    assert "safetensors" in str(err), err
    for bad in (np.nan, np.inf):
        values = np.ones(4, dtype=np.float32)
        values[2] = bad
        err = admin_refused(fed, "model.set_seed", {}, payload.encode({"w": values}))
        assert err.code == "update_rejected", err
        assert "'w'" in str(err) and "NaN or inf" in str(err), err
    assert status(fed)["active_model"] is None
    assert fed.admin("model.ls")[0]["models"] == []
    # A good seed afterwards is taken.
    seed = fed.seed_from(QUICKSTART)
    assert status(fed)["active_model"] == seed


# -- 7. and 8. refused updates inside a real round -----------------------------------------


@pytest.mark.parametrize(
    ("fixture", "why"),
    [
        ("bad_client", ["num_examples"]),  # train returns no num_examples
        ("nan_client", ["NaN"]),  # train returns NaN weights
        ("shape_client", ["tensor '0'", "shape (20, 17)", "(20, 16)"]),  # quickstart names, wrong shape
    ],
)
def test_refused_update_is_left_out_and_reported(fed: Federation, fixture: str, why: list[str]) -> None:
    seed = one_round_federation(fed, [("odd", FIXTURES / fixture)])
    session = fed.run_session(rounds=1, min_clients=3, validate=False)
    assert session["status"] == "finished", session
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded", rnd
    assert rnd["participants"] == GOOD, rnd
    # The trail: a new model from the three good clients only.
    models = fed.admin("model.ls")[0]["models"]
    assert [m["id"] for m in models] == [seed, rnd["model_id"]]
    assert models[1]["contributors"] == GOOD and models[1]["parent"] == seed
    # Exactly FedAvg of the good updates: the refused one left no trace in the sums.
    _, seed_bytes = fed.admin("model.get", {"id": seed})
    _, new_bytes = fed.admin("model.get", {"id": rnd["model_id"]})
    assert seed_bytes is not None and new_bytes is not None
    got, want = payload.read(new_bytes)[0], quickstart_fedavg(seed_bytes, GOOD)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7)
    # The refusal is reported to the controller, saying why; the good ones are clean.
    train = reports(fed, session["id"])
    assert sorted(train) == sorted([*GOOD, "odd"])
    assert all(train[c]["error"] is None for c in GOOD), train
    error = train["odd"]["error"]
    assert error and all(w in error for w in why), error
    assert status(fed)["clients"] == 4  # the refused client is still connected


# 10**400 no longer travels at all (a message's integers fit 64 bits: test_numbers.py); the largest that does is absurd too.
@pytest.mark.parametrize(("num_examples", "shift"), [(2**63 - 1, 0), (1e308, 10)], ids=["int-overflow", "sum-overflow"])
def test_update_with_an_absurd_weight_is_refused_alone(fed: Federation, num_examples: float, shift: int) -> None:
    one_round_federation(fed, [("odd", FIXTURES / "extreme_client")])
    settings = {"extreme_num_examples": num_examples, "extreme_shift": shift}
    session = fed.run_session(rounds=1, min_clients=3, round_timeout=120, validate=False, settings=settings)
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == GOOD, rnd
    error = reports(fed, session["id"]).get("odd", {}).get("error")
    assert error and ("num_examples" in error or "weight" in error), error
    assert rnd["duration_s"] < 60, "a refused update must not make the round wait for its timeout"


def test_validation_metric_beyond_float_range_does_not_crash_the_session(fed: Federation) -> None:
    one_round_federation(fed, [("odd", FIXTURES / "extreme_client")], good=["good-0"])
    # 10**400 or 1e309 no longer travel at all (refused where messages are parsed: test_numbers.py); the largest float does.
    session = fed.run_session(rounds=1, min_clients=2, validate=True, settings={"extreme_metric": 1.7976931348623157e308})
    assert session["status"] == "finished", session
    (rnd,) = session["rounds"]
    assert rnd["status"] == "succeeded" and rnd["participants"] == ["good-0", "odd"], rnd
    assert "validation_accuracy" in rnd["validation"], rnd  # the sane metrics are still averaged


# -- 9. too few updates ------------------------------------------------------------------------


def test_round_with_fewer_than_min_clients_fails_and_keeps_the_model(fed: Federation) -> None:
    seed = one_round_federation(fed, [("odd", FIXTURES / "bad_client")], good=["good-0"])
    session = fed.run_session(rounds=1, min_clients=2, round_timeout=5, validate=False)
    assert session["status"] == "failed", session
    (rnd,) = session["rounds"]
    assert rnd["status"] == "failed" and rnd["model_id"] is None, rnd
    assert "at least 2 needed" in rnd["reason"], rnd
    assert rnd["participants"] == ["good-0"], rnd  # who did contribute, for the record
    assert "round 1" in session["reason"] and "at least 2" in session["reason"], session
    assert session["end_model"] == seed
    assert status(fed)["active_model"] == seed
    assert [m["id"] for m in fed.admin("model.ls")[0]["models"]] == [seed]
    assert "num_examples" in (reports(fed, session["id"])["odd"]["error"] or "")
    # Nothing is stuck: the next session, asking for what it can get, succeeds.
    again = fed.run_session(rounds=1, min_clients=1, validate=False)
    assert again["status"] == "finished", again
    assert again["rounds"][0]["participants"] == ["good-0"]
    assert status(fed)["active_model"] == again["end_model"] != seed


# -- 10. stopping a running session ------------------------------------------------------------


def test_stop_while_training_aborts_the_round_and_keeps_the_client(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    fed.combiner("c1")
    slow = fed.client("slow", package=FIXTURES / "slow_client")
    fed.wait_clients(1)
    config = {"rounds": 3, "min_clients": 1, "round_timeout": 30, "settings": {"slow_s": 20}}
    started = fed.admin("session.start", config)[0]["session"]
    wait_stdout(slow, "slow_client: training")  # round 1 is running, inside the train callback
    # REPLY_TIMEOUT (10 s) is shorter than the 20 s training: stop must not wait for it.
    stopped = fed.admin("session.stop", {"id": started["id"]}, timeout=REPLY_TIMEOUT)[0]["session"]
    assert stopped["status"] == "stopped", stopped
    assert [r["status"] for r in stopped["rounds"]] == ["failed"], stopped["rounds"]
    assert "stopped" in stopped["rounds"][0]["reason"]
    assert stopped["end_model"] == seed and status(fed)["active_model"] == seed
    assert status(fed)["session"] is None
    # Stopping again is a clear conflict, not a crash.
    err = admin_refused(fed, "session.stop", {"id": started["id"]})
    assert err.code == "conflict" and "not running" in str(err), err
    # The client is still there and healthy: the abort ended its task, and it trains again.
    fed.wait_clients(1)
    again = fed.run_session(rounds=1, min_clients=1, round_timeout=10, validate=False)
    assert again["status"] == "finished", again
    assert again["rounds"][0]["participants"] == ["slow"]
    log = slow.text()
    assert "aborting the current task" in log and "task aborted: the session was stopped" in log, log
