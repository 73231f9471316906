"""Attacks on the checked-on-receipt update check (issue 17 #2): a combiner's verdict on an
update's values, taken as its chunks landed (LandingCheck), must be the verdict on the bytes
the client's reply names, never on another payload the client sent beside it. Real
controller and combiner on 127.0.0.1 port 0 with TLS; the client is a raw websocket."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any

import numpy as np
from conftest import Federation
from test_client_limits import TIMEOUT, admin, frame, next_text, rows
from websockets.asyncio.client import ClientConnection, connect

from scaleout.core import messages as m
from scaleout.core import payload
from scaleout.security.tls import client_context

N = 1 << 18  # a 1 MiB float32 tensor: an update well past INLINE_BYTES, so it lands in a file and is checked as it lands


async def send_payload(ws: ClientConnection, data: bytes, sha256: str | None = None) -> str:
    """Announce ``data`` (with ``sha256``, its own by default) and send it in 256 KiB chunks."""
    transfer = secrets.token_hex(m.TRANSFER_ID_BYTES // 2)
    start = {"transfer": transfer, "size": len(data), "sha256": sha256 or hashlib.sha256(data).hexdigest()}
    await ws.send(frame("blob", f"b{transfer}", **start))
    for at in range(0, len(data), 256 << 10):
        await ws.send(transfer.encode("ascii") + data[at : at + (256 << 10)])
    return transfer


def run_rogue(fed: Federation, decoy: bytes | None, update: bytes, decoy_sha: str | None = None) -> dict[str, Any]:
    """A round on combiner c1 (no bound on an update's change: only the value check stands
    between a NaN and the sums) whose one client, asked for its update, first sends ``decoy``
    (announced with ``decoy_sha``), a payload no message names, then ``update``, named by its reply."""
    fed.controller()
    fed.admin("model.set_seed", {}, payload.encode([np.linspace(-1, 1, N, dtype=np.float32)]))
    c1 = fed.combiner("c1")
    assert c1.url is not None
    headers = {"Authorization": f"Bearer {fed.assigned_ticket('rogue')}"}

    async def go() -> dict[str, Any]:
        async with connect(c1.url, ssl=client_context(fed.ca), additional_headers=headers, proxy=None, max_size=None) as ws:
            await ws.send(frame("hello", "h1", name="rogue"))
            await admin(fed, "client.wait", {"count": 1, "timeout": TIMEOUT})
            config = {"rounds": 1, "min_clients": 1, "round_timeout": 60, "validate": False, "max_update_norm": "off"}
            session = (await admin(fed, "session.start", config))["session"]
            task = await next_text(ws, "task")
            meta = {"metadata": {"training_metadata": {"num_examples": 5}}}
            await ws.send(frame("task.result", "r1", task_id=task["task_id"], ok=True, size=len(update), data=meta))
            pull = await next_text(ws, "request")
            assert pull["op"] == "update.get", pull
            if decoy is not None:
                await send_payload(ws, decoy, decoy_sha)
            named = await send_payload(ws, update)
            await ws.send(frame("reply", "r2", re=pull["id"], ok=True, blob=named))
            return (await admin(fed, "session.wait", {"id": session["id"]}))["session"]

    session = asyncio.run(go())
    return {"session": session, "c1": c1.text(), "reports": rows(fed, "SELECT * FROM reports WHERE session_id=? AND client='rogue'", session["id"])}


def updates() -> tuple[bytes, bytes]:
    """A clean update and one of the same layout and size with a NaN in its second chunk."""
    good = np.linspace(-1, 1, N, dtype=np.float32) + np.float32(0.01)
    bad = good.copy()
    bad[N // 2] = np.nan
    clean, poisoned = payload.encode([good]), payload.encode([bad])
    assert len(clean) == len(poisoned)
    return clean, poisoned


def assert_refused_for_nan(result: dict[str, Any]) -> None:
    (rnd,) = result["session"]["rounds"]
    assert "update from rogue accepted" not in result["c1"], result["c1"][-3000:]
    assert "update from rogue refused" in result["c1"] and "contains NaN or inf" in result["c1"], result["c1"][-3000:]
    assert rnd["status"] != "succeeded", rnd  # its only update was refused: no model with a NaN in it
    (report,) = result["reports"]
    assert "contains NaN or inf" in (report["error"] or ""), report


def test_a_clean_decoy_sent_before_the_named_update_does_not_pass_a_nan_update(fed: Federation) -> None:
    # The landing check was attached to the first payload of the announced size after the pull
    # began: a clean payload no message names took it, and its verdict passed the NaN update.
    clean, poisoned = updates()
    assert_refused_for_nan(run_rogue(fed, clean, poisoned))


def test_a_decoy_that_fails_its_digest_does_not_pass_a_nan_update(fed: Federation) -> None:
    # The clean bytes announced under the poisoned update's sha256: refused by the link as corrupt,
    # yet they were checked as they landed; the verdict must not carry over to the real payload.
    clean, poisoned = updates()
    assert_refused_for_nan(run_rogue(fed, clean, poisoned, decoy_sha=hashlib.sha256(poisoned).hexdigest()))


def test_a_nan_update_without_a_decoy_is_refused(fed: Federation) -> None:
    # The baseline the two above break: the same update, alone, is refused.
    _, poisoned = updates()
    assert_refused_for_nan(run_rogue(fed, None, poisoned))



def test_a_clean_update_is_still_passed_by_its_landing_check(fed: Federation) -> None:
    # The digest tie above must not cost the honest path its one pass: checked as it landed, not again.
    clean, _ = updates()
    result = run_rogue(fed, None, clean)
    assert "update from rogue accepted" in result["c1"] and "update values checked as they landed" in result["c1"], result["c1"][-3000:]
    assert "update values checked whole" not in result["c1"]
    assert result["session"]["rounds"][0]["status"] == "succeeded", result["session"]
