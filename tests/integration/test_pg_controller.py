"""The controller on PostgreSQL (issue 18): `scaleout serve --store postgresql://...` runs
sessions with real combiners and clients over TLS, and resumes one after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import FIXTURES, Federation, scaleout, wait_stdout

RECOVER = FIXTURES / "recover_client"


@pytest.fixture(autouse=True)
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The key file a controller on a postgresql store needs (serve --key-file), for every serve here."""
    from scaleout.store.vault import keygen

    path = tmp_path / "store.key"
    keygen(path)
    monkeypatch.setenv("SCALEOUT_KEY_FILE", str(path))
    return path


def test_a_session_on_postgresql_end_to_end_then_resumed_after_a_kill(fed: Federation, pg_url: str, tmp_path: Path) -> None:
    first = fed.controller("--store", pg_url)
    seed = fed.seed_from(RECOVER)
    fed.combiner("c1")
    clients = [fed.client(name, package=RECOVER) for name in ("r1", "r2")]
    fed.wait_clients(2)
    done = fed.run_session(rounds=2, validate=False)
    assert done["status"] == "finished" and [r["status"] for r in done["rounds"]] == ["succeeded"] * 2, done

    # The rows are in PostgreSQL, not in a state.db beside the data dir.
    import psycopg

    with psycopg.connect(pg_url) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM rounds WHERE session_id=%s AND status='succeeded'", (done["id"],)).fetchone()  # type: ignore[misc]
        (blobs,) = conn.execute("SELECT COUNT(*) FROM blobs WHERE kind='models'").fetchone()  # type: ignore[misc]
    assert n == 2 and blobs == 3  # the seed and two rounds' models, as large objects
    assert not (fed.data / "state.db").stat().st_size and not any((fed.data / "models").glob("*"))
    data = ["--data-dir", str(fed.data), "--json"]
    models = json.loads(scaleout("model", "ls", *data).stdout)
    assert {m["id"] for m in models} >= {seed, *(r["model_id"] for r in done["rounds"])}
    sessions = json.loads(scaleout("session", "ls", *data).stdout)
    assert [s["id"] for s in sessions] == [done["id"]]
    verify = scaleout("audit", "verify", *data)
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout + verify.stderr

    # SIGKILL in round 2 of a second session; restarted on the same store, it finishes.
    gate = tmp_path / "gate"
    config = {"rounds": 3, "round_timeout": 30, "validate": False, "settings": {"gate": str(gate), "gate_from": 4}}  # its 4th train call: round 2 here
    session = fed.admin("session.start", config)[0]["session"]
    wait_stdout(clients[0], "recover_client: held")  # round 2's tasks are out
    port = int(fed.url.rsplit(":", 1)[1])
    first.popen.send_signal(signal.SIGKILL)
    assert first.popen.wait(10) == -signal.SIGKILL
    gate.touch()
    fed.controller("--store", pg_url, name="controller-2", port=port)
    again = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
    assert again["status"] == "finished", again
    assert [r["status"] for r in again["rounds"]] == ["succeeded"] * 3, again["rounds"]
    assert again["rounds"][1]["attempt"] == 2 and again["rounds"][1]["retried"] == ["controller restarted"]
    parents = [r["parent"] for r in again["rounds"]]
    assert parents == [done["end_model"]] + [r["model_id"] for r in again["rounds"][:-1]]
    verify = scaleout("audit", "verify", *data)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_store_migrate_moves_a_data_dir_with_three_sessions_into_postgresql(fed: Federation, pg_url: str, key_file: Path) -> None:
    fed.store = None  # SQLite, the default (under SCALEOUT_TEST_STORE=postgresql too): what migrate moves
    ctl = fed.controller()
    fed.seed_from(RECOVER)
    fed.combiner("c1")
    fed.client("r1", package=RECOVER)
    fed.wait_clients(1)
    for rounds in (1, 2, 1):
        assert fed.run_session(rounds=rounds, validate=False)["status"] == "finished"
    fed.admin("token.create", {"role": "client", "ttl_s": 60})
    data = ["--data-dir", str(fed.data), "--json"]
    before = {what: json.loads(scaleout(what, "ls", *data).stdout) for what in ("model", "session")}
    assert len(before["session"]) == 3 and len(before["model"]) == 5
    log_before = fed.admin("audit.ls", {"limit": 0})[0]["entries"]
    fed.stop_all()
    assert ctl.popen.returncode is not None
    # Before it is moved, a postgresql store on this data dir is refused: its state.db (and
    # the signed head that names its log) would be ignored (an attacker's finding).
    r = scaleout("serve", "--data-dir", str(fed.data), "--store", pg_url, "--port", "0")
    assert r.returncode == 2 and "holds a SQLite store (3 sessions, 5 models" in r.stderr and "store migrate --from" in r.stderr, r.stderr

    r = scaleout("store", "migrate", "--from", str(fed.data), "--to", pg_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "table audit: " in r.stderr and "blob 5/5: " in r.stderr  # progress, as it goes
    assert f"migrated {fed.data} into {pg_url}: " in r.stdout and "5 blobs" in r.stdout
    verify = scaleout("audit", "verify", "--store", pg_url, "--data-dir", str(fed.data), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    result = json.loads(verify.stdout)
    # The data dir's signed head is the store's now (checked with that data dir's audit.key).
    assert result["ok"] and result["entries"] == len(log_before) and result["anchored"] == ["in the store (meta audit_anchor)"], result
    assert "signed audit head: " in r.stderr
    # Without a key to check the signed head with (or a kept copy), a log that may have been cut does not pass.
    bare = scaleout("audit", "verify", "--store", pg_url)
    assert bare.returncode == 2 and "no key to check the store's signed audit head with" in bare.stderr, bare.stdout + bare.stderr
    early = scaleout("audit", "verify", "--store", pg_url, "--key-file", str(key_file))  # no controller sealed the audit key there yet
    assert early.returncode == 2 and "opens no audit.key in the store" in early.stderr, early.stdout + early.stderr

    # The moved data dir is not served from its old state.db by mistake (a second history with the same keys).
    env = {k: v for k, v in os.environ.items() if k not in ("SCALEOUT_STORE", "SCALEOUT_KEY_FILE")}
    r = scaleout("serve", "--data-dir", str(fed.data), "--port", "0", env=env)
    assert r.returncode == 2 and f"was moved into {pg_url}" in r.stderr and "state.db.migrated" in r.stderr, r.stderr

    # A second migrate into the same database is refused, unless told.
    again = scaleout("store", "migrate", "--from", str(fed.data), "--to", pg_url)
    assert again.returncode == 2 and "already holds a Scaleout store" in again.stderr and "--replace" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr

    # A controller on the migrated store lists the same models and sessions, and the same log.
    fed.procs.clear()
    fed.controller("--store", pg_url, name="controller-pg")
    r = scaleout("store", "migrate", "--from", str(fed.data), "--to", pg_url)  # its controller runs
    assert r.returncode == 2 and "in use by another running controller" in r.stderr and "--from must name a stopped" in r.stderr, r.stderr
    after = {what: json.loads(scaleout(what, "ls", *data).stdout) for what in ("model", "session")}
    assert after == before
    log_after = fed.admin("audit.ls", {"limit": 0})[0]["entries"]
    assert log_after[: len(log_before)] == log_before
    assert "audit.head_rewritten" not in [e["action"] for e in log_after]  # the head came along, signed with the key it goes on with
    verify = scaleout("audit", "verify", *data)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    verify = scaleout("audit", "verify", "--store", pg_url, "--key-file", str(key_file))  # its audit.key is sealed in the store now
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert fed.admin("model.get", {"id": before["model"][-1]["id"]})[1] is not None  # its bytes came along
    from scaleout.store.state import State

    st = State(pg_url)  # new rows after the copied ones (the reports' id sequence went on past them)
    st.add_report("train", "s-x", 1, "r1", {}, None)
    st.close()
    # --replace does not drop a store a controller is active on.
    other = fed.tmp / "other"
    other.mkdir()
    (other / "state.db").write_bytes((fed.data / "state.db").read_bytes())
    r = scaleout("store", "migrate", "--from", str(other), "--to", pg_url, "--replace")
    assert r.returncode == 2 and "a controller is active on" in r.stderr, r.stderr
    assert json.loads(scaleout("session", "ls", *data).stdout) == before["session"]


class Relay:
    """A TCP relay between the controller and PostgreSQL that the test can cut (every
    connection through it dropped, new ones refused) and restore, leaving the server and
    the other tests' connections to it alone."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        self.up = False
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _wait_log(proc: Any, text: str, timeout: float = 60) -> None:
    """Until the role's log (its stderr) holds ``text``: the event, not a fixed delay."""
    deadline = time.monotonic() + timeout
    while text not in proc.text():
        assert proc.popen.poll() is None and time.monotonic() < deadline, f"{proc.name} did not log {text!r}:\n{proc.text()}"
        time.sleep(0.1)  # a poll of the log file


def _trail_checks(fed: Federation, pg_url: str, seed: str, session_id: str, rounds: list[dict[str, Any]]) -> None:
    """Every round starts from the model committed before it; each succeeded round committed
    one whole model, once; a failed one none."""
    import psycopg

    committed = [r["model_id"] for r in rounds if r["status"] == "succeeded"]
    parents = [r["parent"] for r in rounds]
    expected, last = [], seed
    for r in rounds:
        expected.append(last)
        last = r["model_id"] or last
    assert parents == expected, rounds
    assert all(r["model_id"] is None for r in rounds if r["status"] == "failed"), rounds
    for model_id in committed:
        assert fed.admin("model.get", {"id": model_id})[1] is not None  # its bytes, verified against its id
    with psycopg.connect(pg_url) as conn:
        steps = [json.loads(row[0]) for row in conn.execute("SELECT step FROM session_steps WHERE session_id=%s ORDER BY seq", (session_id,))]
        models = [row[0] for row in conn.execute("SELECT id FROM models WHERE session_id=%s ORDER BY round_index", (session_id,))]
        commits = [row[0] for row in conn.execute("SELECT detail FROM audit WHERE action='model.commit'")]
    assert [s["round_index"] for s in steps if s["kind"] == "round.committed"] == [r["idx"] for r in rounds if r["status"] == "succeeded"], steps
    assert models == committed
    assert sum(c.count(f'"session": "{session_id}"') + c.count(f'"session":"{session_id}"') for c in commits) == len(committed), commits


@dataclass
class GatedFederation:
    """A federation on a PostgreSQL store reached through a Relay, its session held in round 2."""

    relay: Relay
    ctl: Any
    seed: str
    clients: list[Any]
    session: dict[str, Any]
    gate: Path  # touched: round 2's updates come in
    where: str  # host:port/database the controller names in its log


@contextmanager
def gated_federation_behind_relay(fed: Federation, pg_url: str, password: str | None = None) -> Iterator[GatedFederation]:
    """The controller on ``pg_url`` behind a Relay (``password`` in its URL if given), the seed,
    combiner c1 and clients r1/r2, and a 3-round session whose round 2 is in flight and held at
    its gate. Stops the roles and closes the relay at the end."""
    parts = urlsplit(pg_url)
    relay = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    user = f"{parts.username}:{password}" if password else f"{parts.username}"
    url = f"postgresql://{user}@127.0.0.1:{relay.port}{parts.path}"
    try:
        ctl = fed.controller("--store", url)
        seed = fed.seed_from(RECOVER)
        fed.combiner("c1")
        clients = [fed.client(name, package=RECOVER) for name in ("r1", "r2")]
        fed.wait_clients(2)
        gate = fed.tmp / "gate"
        config = {"rounds": 3, "round_timeout": 60, "validate": False, "settings": {"gate": str(gate), "gate_from": 2}}
        session = fed.admin("session.start", config)[0]["session"]
        wait_stdout(clients[0], "recover_client: held")  # round 2 in flight
        yield GatedFederation(relay, ctl, seed, clients, session, gate, f"127.0.0.1:{relay.port}{parts.path}")
    finally:
        fed.stop_all()
        relay.close()


def test_the_link_to_postgresql_cut_for_10s_mid_round(fed: Federation, pg_url: str) -> None:
    """The controller waits for the store and goes on: the round in flight is delayed, not
    failed, and the session finishes all its rounds, each from the model committed before it,
    none committed twice. The outage is logged in a few lines, not a warning per attempt."""
    # A password (the test server trusts local connections and never asks for it): never logged.
    with gated_federation_behind_relay(fed, pg_url, password="s3cret-pw") as g:
        ctl, relay, session = g.ctl, g.relay, g.session
        relay.cut()
        g.gate.touch()  # round 2's updates come in while the store is unreachable
        cut_at = time.monotonic()
        time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))  # the outage itself lasts 10 s (not a synchronisation)
        # ... and until the round's commit found the store away (a first try waits 5 s for a
        # connection: it began a few seconds into the outage, so it may end just after 10 s).
        _wait_log(ctl, "round 2: the store is unreachable: waiting up to 60 s")
        relay.restore()
        done = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
        assert ctl.popen.poll() is None, "the controller died"
        rounds = done["rounds"]
        assert done["status"] == "finished" and [r["status"] for r in rounds] == ["succeeded"] * 3, done
        assert rounds[1]["attempt"] == 1  # waited for, not retried
        _trail_checks(fed, pg_url, g.seed, session["id"], rounds)
        again = fed.run_session(rounds=1, validate=False)
        assert again["status"] == "finished", again
        verify = scaleout("audit", "verify", "--data-dir", str(fed.data))
        assert verify.returncode == 0, verify.stdout + verify.stderr

        log = ctl.text()
        assert "Traceback" not in log and "psycopg.pool" not in log and "s3cret-pw" not in log, log
        assert log.count(f"lost the PostgreSQL store at {g.where} (") == 1, log
        assert log.count("PostgreSQL store back after ") == 1, log
        assert log.count("is still unreachable after") <= 2, log
        assert log.count("round 2: the store is unreachable: waiting up to 60 s") == 1, log
        assert log.count("round 2: the store is back after") == 1, log
        outage = log[log.index("lost the PostgreSQL store"):log.index("PostgreSQL store back after")]
        assert outage.count("\n") <= 15, outage  # a few lines in all (the lock, the registry, the round), no flood


def test_an_outage_longer_than_the_wait_fails_that_round_and_the_session_goes_on(
    fed: Federation, pg_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store away for longer than the runner waits for it (SCALEOUT_STORE_WAIT_S, short
    here): the round in flight fails saying why, commits nothing, and once the store is back
    the next round starts from the last committed model and the session runs to its end."""
    monkeypatch.setenv("SCALEOUT_STORE_WAIT_S", "2")
    with gated_federation_behind_relay(fed, pg_url) as g:
        ctl, relay, session = g.ctl, g.relay, g.session
        relay.cut()
        g.gate.touch()
        _wait_log(ctl, "round 2: could not commit the new global model")  # the wait ran out with the store still away
        relay.restore()
        done = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
        assert ctl.popen.poll() is None, "the controller died"
        rounds = done["rounds"]
        # It ran all its rounds (a session with a failed round ends "failed", naming that round).
        assert [r["status"] for r in rounds] == ["succeeded", "failed", "succeeded"], done
        assert "no connection to PostgreSQL" in rounds[1]["reason"], rounds[1]
        assert done["status"] == "failed" and done["reason"] == f"round 2: {rounds[1]['reason']}", done
        _trail_checks(fed, pg_url, g.seed, session["id"], rounds)
        assert "Traceback" not in ctl.text()
        verify = scaleout("audit", "verify", "--data-dir", str(fed.data))
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_store_settings_flag_config_and_environment(tmp_path: Path) -> None:
    import os

    data = ["serve", "--data-dir", str(tmp_path / "d"), "--port", "0"]
    r = scaleout(*data, "--store", "mysql://x")
    assert r.returncode == 2 and "--store must be a postgresql://" in r.stderr, r.stderr
    config = tmp_path / "c.toml"
    config.write_text('[controller]\nstore = "postgresql://postgres@127.0.0.1:1/x"\n')
    r = scaleout(*data, "--config", str(config))
    assert r.returncode == 3 and "while connecting to the PostgreSQL store postgresql://postgres@127.0.0.1:1/x" in r.stderr, r.stderr  # cannot reach it
    env = {**os.environ, "SCALEOUT_STORE": "postgresql://u:secret@127.0.0.1:1/x"}
    r = scaleout(*data, env=env)
    assert r.returncode == 3 and "postgresql://u:***@127.0.0.1:1/x" in r.stderr and "secret" not in r.stderr, r.stderr
    r = scaleout(*data, "--config", str(config), env=env)  # the environment before the file, as for the other settings
    assert "postgresql://u:***@" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # No database named (libpq would choose one after the user), and a key file with no store to seal into.
    r = scaleout(*data, "--store", "postgresql://postgres@127.0.0.1:1")
    assert r.returncode == 2 and "--store names no database" in r.stderr, r.stderr
    r = scaleout(*data, "--key-file", str(tmp_path))
    assert r.returncode == 2 and "--key-file seals the CA and keys in a postgresql store" in r.stderr, r.stderr
    # A directory, or no file, as the key file: what to give instead (the keygen hint only where it helps).
    unreachable = ["--store", "postgresql://postgres@127.0.0.1:1/x"]
    r = scaleout(*data, *unreachable, "--key-file", str(tmp_path))
    assert r.returncode == 2 and f"{tmp_path} is a directory: give the key file's path" in r.stderr and f"--out {tmp_path}" not in r.stderr, r.stderr
    r = scaleout(*data, *unreachable, "--key-file", str(tmp_path / "none.key"))
    assert r.returncode == 2 and "does not exist (create one with: scaleout store keygen --out" in r.stderr, r.stderr


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte (unbuffered: nothing left to flush at close)."""
    for name, block in (("filler", 65536), ("filler2", 1)):  # then the last partial block
        with open(folder / name, "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * block)
            except OSError as exc:
                assert exc.errno == 28, exc


def test_the_data_dir_full_mid_round_on_postgresql_is_a_storage_error(fed: Federation, pg_url: str, tmp_path: Path) -> None:
    """On PostgreSQL the data dir holds what the controller keeps beside the store: the
    updates a strategy that needs each one (fedmedian) spills. Full mid-round (it was "internal
    error: [Errno 28]" once), the session fails saying so (no space left on device, spilling
    where), no model is committed by that round, and the controller stays up and runs the
    next session once there is room."""
    import subprocess

    fed.data.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(fed.data)], capture_output=True, text=True, check=False)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the data dir (needs root): {mount.stderr.strip()}")
    try:
        ctl = fed.controller("--store", pg_url)
        seed = fed.seed_from(RECOVER)
        fed.combiner("c1")
        clients = [fed.client(name, package=RECOVER) for name in ("r1", "r2")]
        fed.wait_clients(2)
        gate = tmp_path / "gate"
        config = {"rounds": 2, "round_timeout": 60, "validate": False, "aggregator": "fedmedian", "settings": {"gate": str(gate), "gate_from": 2}}
        session = fed.admin("session.start", config)[0]["session"]
        wait_stdout(clients[0], "recover_client: held")  # round 2 in flight
        _fill(fed.data)
        gate.touch()
        done = fed.admin("session.wait", {"id": session["id"]}, timeout=120)[0]["session"]
        assert ctl.popen.poll() is None, "the controller died"
        rounds = done["rounds"]
        assert [r["status"] for r in rounds] == ["succeeded", "failed"], done
        assert done["status"] == "failed" and "no space left on device while spilling a client's update " in done["reason"], done
        assert str(fed.data / "spill") in done["reason"], done
        _trail_checks(fed, pg_url, seed, session["id"], rounds)
        log = ctl.text()
        assert "internal error" not in log and "Traceback" not in log, log
        for filler in fed.data.glob("filler*"):
            filler.unlink()
        again = fed.run_session(rounds=1, validate=False)
        assert again["status"] == "finished", again
    finally:
        fed.stop_all()
        subprocess.run(["umount", "-l", str(fed.data)], capture_output=True, check=False)
