"""Files a node keeps (issue 19 #22): a corrupt stored model ends a session saying which
model and what to do, not "internal error"; a combiner's key and a client's unpacked package
left in a temporary folder by a SIGKILL are swept at the next start, and the log says so."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from conftest import QUICKSTART, Federation, Proc, sqlite_only

from scaleout.roles.common import OWNER_FILE


def test_a_corrupt_stored_model_fails_the_session_saying_which_and_what_to_do(fed: Federation) -> None:
    sqlite_only("it flips a byte of the model file in the data dir; on PostgreSQL the model is a large object")
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    fed.procs[0].stop()  # restarted below: nothing of the model is in its memory then
    stored = fed.data / "models" / f"{seed}.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    fed.controller(name="controller-2")
    fed.combiner("c1")
    fed.client("k1", package=QUICKSTART)
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, round_timeout=10, validate=False)
    assert session["status"] == "failed", session
    reason = session["reason"]
    assert "internal error" not in reason, reason
    assert f"model {seed[:12]} in {fed.data / 'models'} is corrupt (sha256 mismatch)" in reason, reason
    assert "scaleout model set-seed" in reason and "restore" in reason, reason
    # As the message says: setting the seed model again (the same file) repairs it, and the next session runs.
    assert fed.seed_from(QUICKSTART) == seed
    assert stored.read_bytes() != bytes(data)
    assert fed.run_session(rounds=1, round_timeout=30, validate=False)["status"] == "finished"


def leftovers(tmp: Path, prefix: str) -> list[Path]:
    return sorted(tmp.glob(f"{prefix}*"))


def test_temporary_folders_of_killed_nodes_are_swept_at_the_next_start(fed: Federation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the nodes' temporary folder: this test's alone
    fed.controller()
    fed.seed_from(QUICKSTART)
    fed.activate(QUICKSTART)
    combiner = fed.combiner("c1")
    (old_combiner,) = leftovers(tmp, "scaleout-combiner-")
    assert (old_combiner / "combiner.key").exists()

    def join(name: str) -> Proc:  # without --work-dir: the package is unpacked in a temporary folder
        args = ["join", "--controller", fed.url, "--token", fed.token("client"), "--ca", fed.ca, "--name", name]
        p = Proc(name, args, fed.logs, False)
        fed.procs.append(p)
        return p

    client = join("k1")
    fed.wait_clients(1)
    (old_client,) = leftovers(tmp, "scaleout-client-")
    assert (old_client / "package").is_dir() and (old_client / OWNER_FILE).read_text() == str(client.popen.pid)
    for node in (combiner, client):
        node.popen.send_signal(signal.SIGKILL)
        node.popen.wait()
    assert old_combiner.exists() and old_client.exists()  # nothing cleaned up after a SIGKILL

    again = fed.combiner("c2")
    assert not old_combiner.exists(), "the killed combiner's key was left behind"
    (new_combiner,) = leftovers(tmp, "scaleout-combiner-")  # its own, in use
    assert (new_combiner / "combiner.key").exists()
    assert f"removed 1 temporary folder(s) left by a process that was killed before it cleaned up: {old_combiner}" in again.text()
    client2 = join("k2")
    fed.wait_clients(1)
    assert not old_client.exists(), "the killed client's unpacked package was left behind"
    assert f"left by a process that was killed before it cleaned up: {old_client}" in client2.text()
    assert len(leftovers(tmp, "scaleout-client-")) == 1
