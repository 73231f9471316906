"""The signed audit head of a PostgreSQL store is a row of the store (meta audit_anchor), written in
the transaction of the entry it names (issue 18): `audit verify --store URL` checks it with any
controller's data dir, or with the key file alone, and finds it removed, replaced or forged."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import scaleout

from scaleout.core.audit import parse_anchor
from scaleout.store import vault
from scaleout.store.audithead import HeadFile
from scaleout.store.state import AUDIT_ANCHOR, State

WHERE = "in the store (meta audit_anchor)"


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "store.key"
    vault.keygen(path)
    return path


def controller_dir(tmp_path: Path, name: str, pg_url: str, key: Path) -> HeadFile:
    """A controller's data dir on the store: its audit.key sealed into the store by the first, unsealed by the next."""
    d = tmp_path / name
    d.mkdir()
    heads: list[HeadFile] = []
    vault.sync(pg_url, vault.load_key(key), d, lambda: heads.append(HeadFile.load_or_create(d)))
    return heads[0]


@pytest.fixture
def st(pg_url: str) -> Iterator[State]:
    state = State(pg_url)
    yield state
    state.close()


def anchor_row(pg_url: str) -> str | None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key=%s", (AUDIT_ANCHOR,)).fetchone()
    return str(row[0]) if row else None


def tamper(pg_url: str, *statements: tuple[str, tuple[object, ...]]) -> None:
    with psycopg.connect(pg_url) as conn:  # one transaction, as the database's owner would
        conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
        for sql, args in statements:
            conn.execute(sql, args)  # type: ignore[arg-type]
        conn.execute("ALTER TABLE audit ENABLE TRIGGER USER")


def verify(pg_url: str, *args: str) -> tuple[int, str]:
    r = scaleout("audit", "verify", "--store", pg_url, *args, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout + r.stderr


def test_the_head_is_written_with_its_entry_and_shared_by_every_controller(tmp_path: Path, pg_url: str, key: Path, st: State) -> None:
    a = controller_dir(tmp_path, "ctl-a", pg_url, key)
    b = controller_dir(tmp_path, "ctl-b", pg_url, key)
    assert (tmp_path / "ctl-a" / "audit.key").read_bytes() == (tmp_path / "ctl-b" / "audit.key").read_bytes()

    assert st.anchor_audit(a) == "missing"  # a new store: its (empty) head written at the first start
    for i in range(3):
        st.audit("admin:t1", "token.create", n=i)
        anchor = a.check(anchor_row(pg_url) or "", WHERE)
        assert (anchor.id, anchor.count) == (i + 1, i + 1)  # committed with the entry, not after it
    assert not (tmp_path / "ctl-a" / "audit.head").exists()  # not per data dir any more
    before = anchor_row(pg_url)
    with pytest.raises(RuntimeError), st.transaction():
        st.audit("admin:t1", "token.create", n=99)
        raise RuntimeError("rolled back")
    assert anchor_row(pg_url) == before  # never names an entry that was not committed

    # A takeover (another controller, another data dir, the same store) finds the head as it is.
    other = State(pg_url)
    try:
        assert other.anchor_audit(b) is None
        other.audit("controller", "model.commit", id="x")
    finally:
        other.close()
    assert a.check(anchor_row(pg_url) or "", WHERE).count == 4

    for args in (["--data-dir", str(tmp_path / "ctl-a")], ["--data-dir", str(tmp_path / "ctl-b")], ["--key-file", str(key)]):
        code, out = verify(pg_url, *args)
        assert code == 0 and "audit log intact: 4 entries" in out and f"matches the signed head {WHERE}" in out, (args, out)
    code, out = verify(pg_url, "--key-file", str(key), "--json")
    assert code == 0 and json.loads(out)["anchored"] == [WHERE], out

    # Nothing to check the head's signature with: a usage error (exit 2) saying what to give, not a verdict on the log.
    code, out = verify(pg_url)
    assert code == 2 and "no key to check the store's signed audit head with: pass --key-file KEY" in out and "broken" not in out, out
    code, out = verify(pg_url, "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and f"no audit.key in {tmp_path / 'nowhere'}" in out, out
    code, out = verify(pg_url.rsplit("/", 1)[0])
    assert code == 2 and "--store names no database" in out, out
    wrong = tmp_path / "wrong.key"
    vault.keygen(wrong)
    code, out = verify(pg_url, "--key-file", str(wrong))
    assert code == 2 and "does not open the secrets in the store" in out, out
    r = scaleout("audit", "verify", "--key-file", str(key), "--state", str(tmp_path / "state.db"))
    assert r.returncode == 2 and "--key-file goes with --store" in r.stderr, r.stderr


def test_a_replaced_head_or_an_altered_entry_fails_verify(tmp_path: Path, pg_url: str, key: Path, st: State) -> None:
    a = controller_dir(tmp_path, "ctl-a", pg_url, key)
    st.anchor_audit(a)
    for i in range(3):
        st.audit("admin:t1", "token.create", n=i)
    older = anchor_row(pg_url)  # at entry 3
    st.audit("admin:t1", "token.create", n=3)
    st.audit("admin:t1", "token.create", n=4)
    newest = anchor_row(pg_url)
    assert older and newest
    kept = tmp_path / "kept.head"
    kept.write_text(newest)  # an operator's copy, at entry 5
    by_key = ("--key-file", str(key))

    put = ("UPDATE meta SET value=%s WHERE key='audit_anchor'",)
    tamper(pg_url, (*put, (older,)))  # an older head put back while the log goes on
    code, out = verify(pg_url, *by_key)
    assert code == 1 and "audit log broken at entry 3: the log goes on past the signed head's entry 3 (5 entries, the head says 3)" in out, out
    tamper(pg_url, (*put, (newest,)))  # the newest head back (a removed or forged one: the test after this one)

    # The tail cut and meta.audit_head pointed at entry 3: the signed head still names entry 5.
    cut = ("UPDATE meta SET value=(SELECT id || ' ' || hash FROM audit WHERE id=3) WHERE key='audit_head'", ())
    tamper(pg_url, ("DELETE FROM audit WHERE id > 3", ()), cut)
    code, out = verify(pg_url, *by_key)
    assert code == 1 and "audit log broken at entry 4: entries after 3 were removed: the signed head names entry 5 of 5" in out, out
    # With the older signed head put back as well, only a copy kept elsewhere tells.
    tamper(pg_url, (*put, (older,)))
    code, out = verify(pg_url, *by_key)
    assert code == 0, out
    code, out = verify(pg_url, *by_key, "--head", str(kept))
    assert code == 1 and "entries after 3 were removed: the signed head names entry 5 of 5" in out, out

    tamper(pg_url, ("UPDATE audit SET actor='admin:someone-else' WHERE id=2", ()))
    code, out = verify(pg_url, "--data-dir", str(tmp_path / "ctl-a"))
    assert code == 1 and "audit log broken at entry 2: its content or position does not match its hash" in out, out
    assert parse_anchor(anchor_row(pg_url) or "", WHERE)[0].id == 3


@pytest.mark.parametrize(
    ("forge", "says", "reason"),
    [
        (lambda newest: ("DELETE FROM meta WHERE key='audit_anchor'", ()),
         f"the signed head {WHERE} is missing (removed with the entries it named?)", "missing"),
        # not signed with the store's audit key
        (lambda newest: ("UPDATE meta SET value=%s WHERE key='audit_anchor'", (json.dumps({**json.loads(newest), "count": 9}),)),
         f"the signed head {WHERE} is not signed by this controller (its signature does not verify)", "not signed with the store's audit.key"),
    ],
    ids=["removed", "forged"],
)
def test_a_removed_or_forged_head_fails_verify_and_a_controller_on_it_signs_the_log_again(
    tmp_path: Path, pg_url: str, key: Path, st: State,
    forge: Callable[[str], tuple[str, tuple[object, ...]]], says: str, reason: str,
) -> None:
    a = controller_dir(tmp_path, "ctl-a", pg_url, key)
    st.anchor_audit(a)
    for i in range(5):
        st.audit("admin:t1", "token.create", n=i)
    newest = anchor_row(pg_url)
    assert newest
    tamper(pg_url, forge(newest))
    code, out = verify(pg_url, "--key-file", str(key))
    assert code == 1 and says in out, out
    # A controller that starts on it signs the log as it is, and says why (audit.head_rewritten follows).
    other = State(pg_url)
    try:
        assert other.anchor_audit(a) == reason
    finally:
        other.close()
    assert anchor_row(pg_url) == newest


def test_appends_from_several_connections_and_threads_keep_the_head_at_the_end(
    tmp_path: Path, pg_url: str, key: Path, append_concurrently: Callable[[list[State], int], list[BaseException]],
) -> None:
    head = controller_dir(tmp_path, "ctl-a", pg_url, key)
    states = [State(pg_url) for _ in range(3)]
    for s in states:
        s.anchor_audit(head)
    assert append_concurrently(states * 2, 15) == []  # two threads on each connection
    anchor = head.check(anchor_row(pg_url) or "", WHERE)
    assert (anchor.id, anchor.count) == (90, 90)
    assert states[0].audit_verify(anchor, exact=True) == (90, None)
    for s in states:
        s.close()
