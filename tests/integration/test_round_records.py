"""A round is published once, when its record is final, and `session watch --json` is JSON
Lines ending with the session's outcome (issue 19 #7, #10)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from conftest import FIXTURES, START_TIMEOUT, Federation, scaleout, wait_stdout

from scaleout.commands.admin import follow

PACKAGE = FIXTURES / "validate_gate_client"


def test_a_follower_sees_each_round_once_and_whole(fed: Federation, tmp_path: Path) -> None:
    fed.controller()
    fed.seed_from(PACKAGE)
    fed.combiner("c1")
    client = fed.client("v1", package=PACKAGE)
    fed.wait_clients(1)
    gate = tmp_path / "gate"
    sid = fed.admin("session.start", {"rounds": 2, "round_timeout": 30, "validate": True, "settings": {"validate_gate": str(gate)}})[0]["session"]["id"]
    wait_stdout(client, "validate_gate_client: validating")
    # Round 1's model is committed and it is validating: its record is not final yet.
    (r1,) = fed.admin("session.show", {"id": sid})[0]["session"]["rounds"]
    assert r1["model_id"] and r1["finished"] is None and r1["duration_s"] is None, r1
    # A follower attaching now (as `session watch` and `session start --wait` do) sees it
    # only once it is whole: the gate opens only after the follower has read the session.
    seen: list[dict[str, Any]] = []

    def attached(key: str) -> None:
        assert key == sid
        gate.touch()

    async def go() -> dict[str, Any]:
        assert fed.conn is not None
        return await asyncio.wait_for(follow(fed.conn, sid, seen.append, attached), START_TIMEOUT)

    session = asyncio.run(go())
    assert gate.exists() and session["status"] == "finished", session
    assert [r["idx"] for r in seen] == [1, 2], seen
    for r in seen:
        assert r["status"] == "succeeded" and r["duration_s"] is not None and r["validation"] == {"accuracy": 0.5}, r
    # `session watch --json` is JSON Lines: a line per round, then the session's outcome.
    r = scaleout("session", "watch", sid, "--json", "--data-dir", str(fed.data))
    assert r.returncode == 0, r.stderr
    *rounds, end = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["index"] for x in rounds] == [1, 2] and all(x["duration_s"] is not None for x in rounds), rounds
    assert end == {
        "session_id": sid, "status": "finished", "reason": None, "rounds": 2, "rounds_planned": 2, "end_model": end["end_model"],
    }, end
    assert end["end_model"] == fed.admin("status")[0]["active_model"]
    # A session that failed says so in its last line too (and by its exit code).
    fed.admin("session.start", {"rounds": 3, "round_timeout": 1, "min_clients": 5, "validate": False})
    r = scaleout("session", "watch", "--json", "--data-dir", str(fed.data))
    assert r.returncode == 1, r.stderr
    end = json.loads(r.stdout.splitlines()[-1])
    assert end["status"] == "failed" and "at least 5 needed" in end["reason"] and end["rounds"] == 1 and end["rounds_planned"] == 3, end
