from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

import scaleout.store.state as state_module
from scaleout.core.errors import NotFoundError
from scaleout.store.state import State

A = "a" * 64
AB = "ab" + "0" * 62
AC = "abcdef" + "1" * 58
AD = "abcdef" + "2" * 58


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    """Deterministic timestamps 1000, 1001, ... for every write."""
    ticks = itertools.count(1000.0)
    monkeypatch.setattr(state_module, "time", SimpleNamespace(time=lambda: next(ticks)))
    return ticks


@pytest.fixture
def state(tmp_path: Path, clock: Iterator[float]) -> Iterator[State]:
    st = State(tmp_path / "state.db")
    yield st
    st.close()


def test_meta(state: State) -> None:
    assert state.get_meta("active_model") is None
    state.set_meta("active_model", "x")
    state.set_meta("other", "y")
    state.set_meta("active_model", "z")
    assert state.get_meta("active_model") == "z" and state.get_meta("other") == "y"


def test_upsert_combiner(state: State) -> None:
    state.upsert_combiner("c2", "online")
    state.upsert_combiner("c1", "online", url="wss://h:1", clients=3)
    state.upsert_combiner("c1", "offline")  # url and clients not given: kept
    c1, c2 = state.combiners()
    assert c1 == {"name": "c1", "url": "wss://h:1", "status": "offline", "clients": 3, "first_seen": 1001.0, "last_seen": 1002.0}
    assert c2["clients"] == 0 and c2["url"] is None
    state.upsert_combiner("c1", "online", url="wss://h:2", clients=0)  # 0 is a value, not "not given"
    c1 = state.combiners()[0]
    assert (c1["status"], c1["url"], c1["clients"], c1["first_seen"], c1["last_seen"]) == ("online", "wss://h:2", 0, 1001.0, 1003.0)


def test_upsert_client(state: State) -> None:
    state.upsert_client("bob", "online", combiner="c1")
    state.upsert_client("alice", "online")
    state.upsert_client("bob", "offline")  # combiner kept
    state.upsert_client("alice", "online", combiner="c2")
    alice, bob = state.clients()
    assert bob == {
        "name": "bob", "combiner": "c1", "status": "offline", "first_seen": 1000.0, "last_seen": 1002.0,
        "attributes": {}, "package": None, "package_error": None,  # what the client says of itself (issue 9)
    }
    assert alice["combiner"] == "c2" and alice["first_seen"] == 1001.0 and alice["last_seen"] == 1003.0


def test_set_clients_offline(state: State) -> None:
    state.upsert_client("a", "online", combiner="c1")
    state.upsert_client("b", "online", combiner="c1")
    state.upsert_client("c", "offline", combiner="c1")
    state.upsert_client("d", "online", combiner="c2")
    before = {c["name"]: c for c in state.clients()}
    state.set_clients_offline("c1", keep={"a", "d"})
    after = {c["name"]: c for c in state.clients()}
    assert {n: c["status"] for n, c in after.items()} == {"a": "online", "b": "offline", "c": "offline", "d": "online"}
    assert after["b"]["last_seen"] > before["b"]["last_seen"] and after["b"]["combiner"] == "c1"
    assert after["a"] == before["a"] and after["c"] == before["c"] and after["d"] == before["d"]


def test_packages(state: State) -> None:
    state.add_package(A, "mnist.tgz", 123)
    state.add_package(A, "renamed.tgz", 999)  # content-addressed: first record stays
    assert state.package(A) == {"id": A, "name": "mnist.tgz", "size": 123, "created": 1000.0, "signature": None}
    state.add_package(A, "again.tgz", 999, signature="c2ln")  # set active again: signed, the record stays
    assert state.package(A)["name"] == "mnist.tgz" and state.package(A)["signature"] == "c2ln"
    with pytest.raises(NotFoundError) as info:
        state.package(AB)
    assert info.value.kind == "package" and info.value.key == AB


def test_add_model_keeps_first_record(state: State) -> None:
    state.add_model(A, 10)
    state.add_model(AB, 20, parent=A, session_id="s1", round_index=0, aggregator="fedavg", contributors=["x", "y"])
    state.add_model(AB, 99, parent=None, session_id="s2", contributors=["z"])
    assert state.model(A) == {
        "id": A, "parent": None, "session_id": None, "round_index": None, "aggregator": None,
        "contributors": [], "size": 10, "created": 1000.0,
    }  # fmt: skip
    model = state.model(AB)
    assert (model["parent"], model["session_id"], model["round_index"], model["size"]) == (A, "s1", 0, 20)
    assert model["contributors"] == ["x", "y"]


def test_commit_model_sets_active(state: State) -> None:
    state.commit_model(A, 10)
    assert state.get_meta("active_model") == A
    state.commit_model(AB, 20, parent=A, session_id="s1", round_index=0, contributors=["x"])
    assert state.get_meta("active_model") == AB
    assert state.model(AB)["parent"] == A
    state.commit_model(A, 55)  # rolling back to a known model keeps its record
    assert state.get_meta("active_model") == A and state.model(A)["size"] == 10
    assert not state.db.in_transaction


def test_commit_model_is_one_transaction(state: State, monkeypatch: pytest.MonkeyPatch) -> None:
    state.commit_model(A, 10)

    def fail(key: str, value: str) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(state, "set_meta", fail)
    with pytest.raises(RuntimeError):
        state.commit_model(AB, 20)
    monkeypatch.undo()
    assert state.get_meta("active_model") == A
    with pytest.raises(NotFoundError):
        state.model(AB)
    assert not state.db.in_transaction


def test_models_in_order_and_by_session(state: State) -> None:
    state.add_model(AD, 1, session_id="s1")
    state.add_model(A, 1)
    state.add_model(AC, 1, session_id="s1")
    assert [m["id"] for m in state.models()] == [AD, A, AC]
    assert [m["id"] for m in state.models("s1")] == [AD, AC]
    assert state.models("nope") == []


def test_model_lookup_by_prefix(state: State) -> None:
    for digest in (A, AB, AC, AD):
        state.add_model(digest, 1)
    assert state.model(A)["id"] == A
    assert state.model("aaaaaa")["id"] == A
    assert state.model("ab0000")["id"] == AB
    assert state.model("abcdef1")["id"] == AC


@pytest.mark.parametrize("key", ["abcdef", "abcde", "aaaaa", "a", "", "ffffff", "b" * 64])
def test_model_lookup_ambiguous_short_or_missing(state: State, key: str) -> None:
    for digest in (A, AB, AC, AD):
        state.add_model(digest, 1)
    with pytest.raises(NotFoundError) as info:
        state.model(key)
    assert info.value.kind == "model" and info.value.key == key


@pytest.mark.parametrize("key", ["%%%%%%", "______", "a%%%%%", "aaaaa%", "aaaa_a"])
def test_model_prefix_is_not_a_pattern(state: State, key: str) -> None:
    # BUG: the prefix goes into LIKE unescaped, so "%" and "_" act as wildcards.
    state.add_model(A, 1)
    with pytest.raises(NotFoundError):
        state.model(key)


def test_sessions_and_rounds(state: State) -> None:
    config = {"rounds": 2, "settings": {"epochs": 1}}
    state.add_session("s1", config, start_model=A)
    state.add_session("s0", {}, start_model=A)
    s1 = state.session("s1")
    assert s1["status"] == "running" and s1["config"] == config and s1["start_model"] == A
    assert s1["rounds"] == [] and s1["finished"] is None and s1["end_model"] is None

    state.start_round("s1", 1, parent=AB, participants=["y"])
    state.start_round("s1", 0, parent=A, participants=["x", "y"])
    state.start_round("s0", 0, parent=A, participants=[], started=7.0)  # begun before its row was written
    state.finish_round("s1", 0, status="succeeded", model_id=AB, participants=["x"], validation={"x": {"acc": 0.9}}, duration_s=1.5)
    state.finish_round("s1", 1, status="failed", reason="timeout", finished=42.0)

    r0, r1 = state.session("s1")["rounds"]
    assert r0["idx"] == 0 and r0["status"] == "succeeded" and r0["model_id"] == AB and r0["parent"] == A
    assert r0["participants"] == ["x"] and r0["validation"] == {"x": {"acc": 0.9}} and r0["duration_s"] == 1.5
    assert r0["finished"] is not None and r0["finished"] > r0["started"]
    assert r1["idx"] == 1 and r1["status"] == "failed" and r1["reason"] == "timeout" and r1["finished"] == 42.0
    assert r1["participants"] == ["y"] and r1["validation"] == {}
    assert [(r["session_id"], r["started"]) for r in state.rounds("s0")] == [("s0", 7.0)]

    state.finish_session("s1", "finished", end_model=AB)
    state.finish_session("s0", "failed", end_model=None, reason="no clients")
    s1, s0 = state.session("s1"), state.session("s0")
    assert (s1["status"], s1["end_model"], s1["reason"]) == ("finished", AB, None) and s1["finished"] is not None
    assert (s0["status"], s0["end_model"], s0["reason"]) == ("failed", None, "no clients")
    assert [s["id"] for s in state.sessions()] == ["s1", "s0"]
    assert "rounds" not in state.sessions()[0]


def test_start_round_again_resets_it(state: State) -> None:
    state.add_session("s1", {}, start_model=A)
    state.start_round("s1", 0, parent=A, participants=["x"])
    state.finish_round("s1", 0, status="failed", reason="timeout")
    state.start_round("s1", 0, parent=AB, participants=["y"])
    (r,) = state.rounds("s1")
    assert (r["status"], r["parent"], r["participants"], r["reason"], r["finished"]) == ("running", AB, ["y"], None, None)


def test_session_not_found(state: State) -> None:
    with pytest.raises(NotFoundError) as info:
        state.session("nope")
    assert info.value.kind == "session" and state.sessions() == []


def test_duplicate_session_refused(state: State) -> None:
    state.add_session("s1", {}, start_model=A)
    with pytest.raises(sqlite3.IntegrityError):
        state.add_session("s1", {}, start_model=A)


def test_reports_filtering(state: State) -> None:
    state.add_report("train", "s1", 0, "a", {"loss": 1.0}, None)
    state.add_report("validate", "s1", 0, "a", {"acc": 0.5}, None)
    state.add_report("train", "s1", 1, "b", {}, "NaN in update")
    state.add_report("train", "s2", 0, "a", {}, None)
    state.add_report("metric", "s1", 1, "a", {"step": 3}, None)

    def who(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
        return [(r["kind"], r["round_index"], r["client"]) for r in rows]

    assert who(state.reports("s1")) == [("train", 0, "a"), ("validate", 0, "a"), ("train", 1, "b"), ("metric", 1, "a")]
    assert who(state.reports("s1", round_index=1)) == [("train", 1, "b"), ("metric", 1, "a")]
    assert who(state.reports("s1", kind="train")) == [("train", 0, "a"), ("train", 1, "b")]
    assert who(state.reports("s1", round_index=0, kind="train")) == [("train", 0, "a")]
    assert state.reports("s1", round_index=2) == [] and state.reports("s3") == []
    first, _, failed, *_ = state.reports("s1")
    assert first["data"] == {"loss": 1.0} and first["error"] is None
    assert failed["data"] == {} and failed["error"] == "NaN in update"


def test_audit_newest_first(state: State) -> None:
    state.audit("admin", "session.start", session="s1", rounds=2)
    state.audit("combiner:c1", "connect")
    state.audit("admin", "session.stop", session="s1")
    log = state.audit_log()
    assert [(e["actor"], e["action"]) for e in log] == [("admin", "session.stop"), ("combiner:c1", "connect"), ("admin", "session.start")]
    assert log[2]["detail"] == {"session": "s1", "rounds": 2} and log[1]["detail"] == {}
    assert log[0]["time"] > log[2]["time"]
    assert [e["action"] for e in state.audit_log(limit=2)] == ["session.stop", "connect"]


def test_reopen_keeps_data(tmp_path: Path, clock: Iterator[float]) -> None:
    path = tmp_path / "state.db"
    st = State(path)
    assert st.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    st.commit_model(A, 10, contributors=["x"])
    st.add_session("s1", {"rounds": 1}, start_model=A)
    st.start_round("s1", 0, parent=A, participants=["x"])
    st.upsert_client("x", "online", combiner="c1")
    st.audit("admin", "seed")

    reader = State(path)  # a second connection sees committed writes while the first is open
    assert reader.get_meta("active_model") == A
    reader.close()
    st.close()

    st = State(path)
    try:
        assert st.get_meta("active_model") == A
        assert st.model(A)["contributors"] == ["x"]
        assert st.session("s1")["rounds"][0]["participants"] == ["x"]
        assert st.clients()[0]["name"] == "x"
        assert st.audit_log()[0]["action"] == "seed"
    finally:
        st.close()


def test_commit_round_records_model_active_and_round_together(tmp_path: Path) -> None:
    st = State(tmp_path / "state.db")
    st.add_session("s1", {"rounds": 1}, "seed")
    st.start_round("s1", 1, "seed", ["a", "b"])
    st.commit_round("s1", 1, "f" * 64, 10, parent="seed", aggregator="fedavg", contributors=["a"])
    assert st.get_meta("active_model") == "f" * 64
    (r,) = st.rounds("s1")
    assert r["status"] == "succeeded" and r["model_id"] == "f" * 64 and r["participants"] == ["a"]
    assert st.model("f" * 64)["parent"] == "seed"
    assert st.audit_log()[0]["action"] == "model.commit"


def test_an_older_state_db_gains_the_server_state_column(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute(
        "CREATE TABLE rounds (session_id TEXT NOT NULL, idx INTEGER NOT NULL, status TEXT NOT NULL, model_id TEXT, "
        "parent TEXT, participants TEXT NOT NULL DEFAULT '[]', started REAL NOT NULL, finished REAL, duration_s REAL, "
        "reason TEXT, validation TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (session_id, idx))"
    )
    db.execute("INSERT INTO rounds(session_id, idx, status, started) VALUES('s1', 1, 'succeeded', 1.0)")
    db.commit()
    db.close()
    st = State(tmp_path / "old.db")
    st.start_round("s1", 2, "seed", ["a"])
    st.commit_round("s1", 2, "f" * 64, 10, parent="seed", aggregator="fedadam", contributors=["a"], server_state="e" * 64)
    rounds = st.rounds("s1")
    assert [r["server_state"] for r in rounds] == [None, "e" * 64]
    st.close()


def test_transaction_groups_writes_and_nested_ones_join_it(state: State) -> None:
    state.commit_model(A, 10)
    with pytest.raises(RuntimeError), state.transaction():
        state.commit_model(AB, 20)  # its own transaction joins the outer one
        state.audit("admin", "model.set_seed", id=AB)
        raise RuntimeError("the disk filled up")
    assert state.get_meta("active_model") == A and state.audit_log() == []
    with pytest.raises(NotFoundError):
        state.model(AB)
    assert not state.db.in_transaction
    with state.transaction():
        state.commit_model(AB, 20)
        state.audit("admin", "model.set_seed", id=AB)
    assert state.get_meta("active_model") == AB and state.audit_log()[0]["action"] == "model.set_seed"


def test_end_session_fails_only_unfinished_rounds(state: State) -> None:
    state.add_session("s1", {"rounds": 3}, start_model=A)
    state.start_round("s1", 1, A, ["a"])
    state.finish_round("s1", 1, status="succeeded", reason=None)
    state.start_round("s1", 2, A, ["a"])
    state.end_session("s1", "failed", A, "round 2: disk full", finished=5000.0, round_reason="disk full")
    row = state.session("s1")
    assert (row["status"], row["reason"], row["finished"], row["end_model"]) == ("failed", "round 2: disk full", 5000.0, A)
    assert [(r["status"], r["reason"]) for r in row["rounds"]] == [("succeeded", None), ("failed", "disk full")]
    assert row["rounds"][1]["finished"] == 5000.0


def test_an_older_state_db_gains_the_command_tables_and_client_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE clients (name TEXT PRIMARY KEY, combiner TEXT, status TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL)")
        db.execute("INSERT INTO clients VALUES ('old', 'c1', 'offline', 1.0, 2.0)")
        db.commit()
    st = State(path)
    try:
        (row,) = st.clients()
        assert row["name"] == "old" and row["attributes"] == {} and row["package"] is None
        tables = {r[0] for r in st.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"commands", "command_results"} <= tables
    finally:
        st.close()
    State(path).close()  # opening it again changes nothing


def test_the_audit_chain_holds_with_writers_on_two_connections(tmp_path: Path) -> None:
    import threading

    first = State(tmp_path / "state.db")
    second = State(tmp_path / "state.db")  # as the registry writer's connection, in another thread

    def append(st: State, who: str) -> None:
        for i in range(50):
            st.audit(who, "x", i=i)
            st.add_report("metric", "s", 1, who, {"i": i}, None)  # other writes in between

    threads = [threading.Thread(target=append, args=(st, who)) for st, who in ((first, "a"), (second, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert first.audit_verify() == (100, None)
    first.close()
    second.close()


def test_an_older_audit_log_is_chained_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL)")
    db.execute("INSERT INTO audit(time, actor, action, detail) VALUES(1.0, 'admin', 'session.start', '{}')")
    db.commit()
    db.close()
    st = State(tmp_path / "old.db")
    st.audit("admin", "session.stop")
    assert st.audit_verify() == (2, None)
    assert [e["action"] for e in st.audit_log()] == ["session.stop", "session.start"]
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        st.db.execute("UPDATE audit SET actor='x' WHERE id=1")
    st.close()


HOLD_S = 0.5  # how long the other connection keeps its write lock once this one's write began


def _write_while_locked(path: Path, busy_wait: float | None) -> None:
    """``set_meta`` on a State of ``path`` while another connection holds the write lock (as
    the registry writer's or the command store's connection does), from the moment the write
    began until HOLD_S after it."""
    import threading

    st = State(path) if busy_wait is None else State(path, busy_wait=busy_wait)
    began = threading.Event()
    st.db.set_trace_callback(lambda sql: began.set() if "meta" in sql else None)  # sqlite3's own hook
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, until the commit

    def hold() -> None:
        began.wait(10)
        threading.Event().wait(HOLD_S)  # the lock is held this long into the write, not a synchronisation
        holder.execute("COMMIT")

    other = threading.Thread(target=hold)
    other.start()
    try:
        st.set_meta("k", "v")
        assert st.get_meta("k") == "v"
    finally:
        other.join()
        holder.close()
        st.db.close()


def test_a_write_waits_for_another_connections_lock_rather_than_failing(tmp_path: Path) -> None:
    """A statement waits up to ``busy_wait`` (BUSY_WAIT_S, 30 s, by default: sqlite3's own
    5 s was outwaited by a loaded box) for another connection's write to end; shorter than
    the lock is held, it fails with 'database is locked', which is what the wait is for."""
    path = tmp_path / "state.db"
    State(path).db.close()
    with closing(State(path).db) as db:
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == state_module.BUSY_WAIT_S * 1000 >= 30_000
    _write_while_locked(path, None)  # the default waits it out
    _write_while_locked(path, 2 * HOLD_S)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        _write_while_locked(path, HOLD_S / 10)
