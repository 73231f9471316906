"""The store's lease (one active controller) and the sealed secrets, on a real PostgreSQL server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scaleout.core.errors import ConfigError
from scaleout.store import vault
from scaleout.store.lease import Lease


def test_two_leases_one_wins_and_closing_hands_over(pg_url: str) -> None:
    a, b = Lease(pg_url), Lease(pg_url)
    try:
        assert a.try_acquire() is True
        assert b.try_acquire() is False
        assert a.check() is True
        a.set_active("wss://a:8090")
        assert b.active() == "wss://a:8090"
        a.close()
        assert b.try_acquire() is True
        assert b.check() is True
        assert a.check() is False
    finally:
        a.close()
        b.close()


def test_the_lock_goes_with_its_session(pg_url: str) -> None:
    """The holder's session ended from the server side (as when its machine is gone): the
    holder sees it has lost the lock, and another takes it."""
    import psycopg

    a, b = Lease(pg_url), Lease(pg_url)
    try:
        assert a.try_acquire()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'scaleout-lease-' || %s AND pid <> pg_backend_pid()", (str(os.getpid()),))
        assert a.check() is False
        assert b.try_acquire() is True
    finally:
        a.close()
        b.close()


def test_a_killed_holder_hands_over(pg_url: str, tmp_path: Path) -> None:
    """A process holding the lock is SIGKILLed: the next try elsewhere takes it."""
    script = (
        "import sys, time\nfrom scaleout.store.lease import Lease\n"
        "l = Lease(sys.argv[1]); assert l.try_acquire(); print('held', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, pg_url], stdout=subprocess.PIPE, text=True)
    b = Lease(pg_url)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert b.try_acquire() is False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The server notices the closed socket at once; give it a few tries (no sleep: each try is a round trip).
        got = False
        for _ in range(200):
            if b.try_acquire():
                got = True
                break
        assert got
    finally:
        proc.kill()
        b.close()


def test_secrets_are_sealed_once_and_shared(pg_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "store.key"
    vault.keygen(key_file)
    assert (key_file.stat().st_mode & 0o777) == 0o600
    key = vault.load_key(key_file)
    first, second = tmp_path / "a", tmp_path / "b"
    for d in (first, second):
        d.mkdir()

    def make(d: Path) -> None:
        for name in vault.SHARED:
            if not (d / name).exists():
                (d / name).write_bytes(os.urandom(16))

    assert vault.sync(pg_url, key, first, lambda: make(first)) == (0, len(vault.SHARED))
    assert vault.sync(pg_url, key, second, lambda: make(second)) == (len(vault.SHARED), 0)
    for name in vault.SHARED:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    other = tmp_path / "other.key"
    vault.keygen(other)
    with pytest.raises(ConfigError, match="does not open the secrets"):
        vault.sync(pg_url, vault.load_key(other), tmp_path, lambda: None)


def test_first_starts_at_once_on_an_empty_store_share_one_set_of_secrets(pg_url: str, tmp_path: Path) -> None:
    """Two or more controllers started together on an empty store (a Helm release's replicas):
    none fails on the schema both create (a UniqueViolation traceback before), and every one
    ends with the secrets the first sealed."""
    import threading

    key_file = tmp_path / "store.key"
    vault.keygen(key_file)
    key = vault.load_key(key_file)
    dirs = [tmp_path / f"c{i}" for i in range(6)]
    barrier = threading.Barrier(len(dirs))
    results: dict[Path, object] = {}

    def start(d: Path) -> None:
        d.mkdir()

        def make() -> None:
            for name in vault.SHARED:
                if not (d / name).exists():
                    (d / name).write_bytes(os.urandom(16))

        barrier.wait()
        try:
            results[d] = vault.sync(pg_url, key, d, make)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[d] = exc

    threads = [threading.Thread(target=start, args=(d,)) for d in dirs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in results.values() if isinstance(r, Exception)], results
    assert sorted(results.values()) == [(0, len(vault.SHARED))] + [(len(vault.SHARED), 0)] * (len(dirs) - 1)
    for name in vault.SHARED:
        assert len({(d / name).read_bytes() for d in dirs}) == 1


def test_a_store_away_is_logged_once_not_at_every_poll(caplog: pytest.LogCaptureFixture) -> None:
    """A standby tries the lock every second: a store that cannot be reached is one warning
    (then one every 10 s), not one line a second for as long as it is away."""
    import socket

    with socket.socket() as s:  # a port nothing listens on: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lease = Lease(f"postgresql://postgres@127.0.0.1:{port}/scaleout")
    with caplog.at_level("WARNING", logger="scaleout.lease"):
        assert [lease.try_acquire() for _ in range(5)] == [False] * 5
    lines = [r.getMessage() for r in caplog.records if r.name == "scaleout.lease"]
    assert len(lines) == 1 and lines[0].startswith("cannot try the store's lock: "), lines


def test_key_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "k"
    vault.keygen(path)
    with pytest.raises(ConfigError, match="never replaced"):
        vault.keygen(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        vault.load_key(path)
    path.write_text("nonsense\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not a scaleout key file"):
        vault.load_key(path)
    with pytest.raises(ConfigError, match="does not exist .create one with: scaleout store keygen"):
        vault.load_key(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is a directory: give the key file's path"):
        vault.load_key(tmp_path)


def test_sealed_secrets_are_bound_to_their_name() -> None:
    key = os.urandom(32)
    sealed = vault.seal(key, "ca.key", b"secret")
    assert vault.unseal(key, "ca.key", sealed) == b"secret"
    with pytest.raises(ConfigError):
        vault.unseal(key, "token.key", sealed)


def test_a_controller_taken_over_writes_no_more_steps(pg_url: str) -> None:
    # The attack that found it: the old active's pooled connections wrote one more session
    # step after the new active had begun, and no controller could load the state after.
    from scaleout.core.errors import StorageError
    from scaleout.store.state import State

    old, new = State(pg_url), State(pg_url)
    try:
        assert old.take_term() == 1
        old.add_session("s1", {}, "m")
        with old.transaction():
            old.add_step("s1", {"kind": "round.started"})
        assert new.take_term() == 2
        with pytest.raises(StorageError, match="another controller took this store over"), old.transaction():
            old.add_step("s1", {"kind": "partial.received"})
        with new.transaction():
            new.add_step("s1", {"kind": "round.retried"})
        assert [s["kind"] for s in new.steps("s1")] == ["round.started", "round.retried"]
    finally:
        old.close()
        new.close()
