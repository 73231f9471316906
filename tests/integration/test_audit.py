"""The audit log: every admin action and model commit, hash-chained; tampering with
state.db (an edit, a deletion, a reordering) is caught by `scaleout audit verify`."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing

import pytest
from conftest import QUICKSTART, Federation, scaleout


def cli(fed: Federation, *args: str) -> tuple[int, str, str]:
    r = scaleout(*args, "--data-dir", str(fed.data), timeout=30)
    return r.returncode, r.stdout, r.stderr


def offline(fed: Federation, *args: str) -> list[str]:
    """`audit verify`'s arguments for the store with no controller running: state.db, or
    the PostgreSQL store with the data dir whose signed head goes with it."""
    if fed.store is None:
        return ["audit", "verify", "--state", str(fed.data / "state.db"), *args]
    return ["audit", "verify", "--store", fed.store, "--data-dir", str(fed.data), *args]


def signed_head(fed: Federation) -> str:
    """The text of the signed audit head: beside state.db, or the row a PostgreSQL store keeps."""
    if fed.store is None:
        return (fed.data / "audit.head").read_text()
    import psycopg

    with psycopg.connect(fed.store) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key='audit_anchor'").fetchone()
    assert row is not None
    return str(row[0])


def head_where(fed: Federation) -> str:
    return str(fed.data / "audit.head") if fed.store is None else "in the store (meta audit_anchor)"


def test_admin_actions_and_commits_are_listed_and_the_chain_verifies(fed: Federation) -> None:
    fed.controller()
    seed = fed.seed_from(QUICKSTART)
    fed.activate(QUICKSTART)
    fed.token("client")
    fed.combiner("c1")
    fed.client("a", package=QUICKSTART)
    fed.wait_clients(1)
    session = fed.run_session(rounds=1, validate=False)
    assert session["status"] == "finished", session
    code, out, err = cli(fed, "audit", "ls", "--json")
    assert code == 0, err
    entries = json.loads(out)
    actions = [e["action"] for e in entries]
    assert actions == [
        "model.set_seed", "package.set_active", "token.create", "token.create",
        "node.enrol", "combiner.register", "node.enrol", "session.start", "model.commit",
    ], actions
    # An admin taking a model away is recorded too (the combiner's fetch each round is not).
    code, _, err = cli(fed, "model", "download", "active", "-o", str(fed.tmp / "m.safetensors"))
    assert code == 0, err
    download = json.loads(cli(fed, "audit", "ls", "--json", "--limit", "1")[1])[0]
    assert download["action"] == "model.download" and download["detail"]["id"] == entries[-1]["detail"]["id"], download
    entries.append(download)
    admin = entries[0]
    assert admin["actor"].startswith("admin:") and admin["address"].startswith("127.0.0.1:"), admin
    assert admin["detail"]["id"] == seed and admin["time"].endswith("Z")
    created = entries[2]["detail"]
    assert set(created) == {"role", "jti", "exp", "name", "uses", "sans"}, created  # the token's id, never the token
    assert not any(isinstance(v, str) and v.startswith(("sco1.", "SCALEOUT-1.")) for v in created.values()), created
    commit = entries[-2]["detail"]
    assert commit["parent"] == seed and commit["aggregator"] == "fedavg" and commit["contributors"] == ["a"], commit
    assert commit["id"] == session["rounds"][0]["model_id"] and commit["session"] == session["id"]
    # Newest first in the table; --since and --limit narrow it.
    code, out, _ = cli(fed, "audit", "ls")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["ID", "TIME"] and "model.download" in out.splitlines()[-1], out
    code, out, _ = cli(fed, "audit", "ls", "--since", "1h", "--limit", "2", "--json")
    assert [e["action"] for e in json.loads(out)] == ["model.commit", "model.download"]
    code, out, _ = cli(fed, "audit", "ls", "--since", "2999-01-01T00:00:00Z")
    assert code == 0 and out.strip() == "no audit entries since 2999-01-01T00:00:00Z", out
    code, _, err = cli(fed, "audit", "ls", "--since", "yesterday")
    assert code == 2 and "since" in err and "Traceback" not in err, err
    code, out, err = cli(fed, "audit", "verify")
    assert code == 0, out + err
    first, anchored, head_line = out.strip().splitlines()
    assert first == f"audit log intact: {len(entries)} entries, hash chain and head verified"
    assert anchored == f"matches the signed head {head_where(fed)}", out
    code, out_json, err = cli(fed, "audit", "verify", "--json")
    verified = json.loads(out_json)
    assert code == 0 and verified["ok"] and verified["entries"] == len(entries), out_json + err
    newest = json.loads(cli(fed, "audit", "ls", "--json", "--limit", "1")[1])[0]
    assert verified["head"] == f"{newest['id']} {newest['hash']}" and head_line.startswith(f"head: {verified['head']}"), (verified, newest)
    fed.stop_all()
    r = scaleout(*offline(fed))
    assert r.returncode == 0 and r.stdout == out, r.stdout + r.stderr
    r = scaleout("audit", "verify", "--state", str(fed.tmp / "nope.db"))
    assert r.returncode == 2 and "is not a file" in r.stderr, r.stderr


def tamper(fed: Federation, *statements: str) -> None:
    """Change the store behind the controller's back, as someone with the file (or the
    database's owner) would."""
    if fed.store is not None:
        import psycopg

        with psycopg.connect(fed.store) as conn:  # one transaction
            conn.execute("ALTER TABLE audit DISABLE TRIGGER USER")
            for sql in statements:
                conn.execute(sql)  # type: ignore[arg-type]
            conn.execute("ALTER TABLE audit ENABLE TRIGGER USER")
        return
    with closing(sqlite3.connect(fed.data / "state.db")) as db:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for sql in statements:
            db.execute(sql)
        db.commit()


@pytest.mark.parametrize(
    ("statements", "broken_id", "why"),
    [
        (["UPDATE audit SET actor='admin:someone-else' WHERE id=2"], 2, "does not match its hash"),
        (["UPDATE audit SET detail='{}' WHERE id=3"], 3, "does not match its hash"),
        (["DELETE FROM audit WHERE id=2"], 3, "entry 2 is missing"),
        (["DELETE FROM audit WHERE id=1"], 2, "does not match its hash"),
        (["DELETE FROM audit WHERE id=(SELECT MAX(id) FROM audit)"], 4, "were removed"),
        # Swap two entries' contents but keep their ids and hashes: the order is part of the chain.
        (
            [
                "CREATE TEMP TABLE t AS SELECT * FROM audit WHERE id IN (2, 3)",
                "UPDATE audit SET actor=(SELECT actor FROM t WHERE id=3), action=(SELECT action FROM t WHERE id=3), "
                "detail=(SELECT detail FROM t WHERE id=3), time=(SELECT time FROM t WHERE id=3) WHERE id=2",
                "UPDATE audit SET actor=(SELECT actor FROM t WHERE id=2), action=(SELECT action FROM t WHERE id=2), "
                "detail=(SELECT detail FROM t WHERE id=2), time=(SELECT time FROM t WHERE id=2) WHERE id=3",
            ],
            2,
            "does not match its hash",
        ),
    ],
    ids=["edit-actor", "edit-detail", "delete-middle", "delete-first", "delete-last", "reorder"],
)
def test_verify_finds_the_first_tampered_entry(fed: Federation, statements: list[str], broken_id: int, why: str) -> None:
    fed.controller()
    for role in ("client", "combiner", "admin"):
        fed.token(role)  # three token.create entries ...
    fed.seed_from(QUICKSTART)  # ... and a model.set_seed: ids 1 to 4
    code, out, err = cli(fed, "audit", "verify")
    assert code == 0, out + err
    # The log is append-only for SQLite (and PostgreSQL) too: changing it needs the triggers dropped first.
    if fed.store is None:
        with closing(sqlite3.connect(fed.data / "state.db")) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit WHERE id=1")
    else:
        import psycopg

        with psycopg.connect(fed.store) as conn, pytest.raises(psycopg.Error, match="append-only"):
            conn.execute("DELETE FROM audit WHERE id=1")
    tamper(fed, *statements)
    code, out, err = cli(fed, "audit", "verify", "--json")
    assert code == 1, out + err
    result = json.loads(out)
    assert result["ok"] is False and result["broken"]["id"] == broken_id and why in result["broken"]["reason"], result
    code, out, _ = cli(fed, "audit", "verify")
    assert code == 1 and out.startswith(f"audit log broken at entry {broken_id}: "), out
    # The same verdict from the file alone, with the controller stopped.
    fed.stop_all()
    r = scaleout(*offline(fed, "--json"))
    assert r.returncode == 1 and json.loads(r.stdout)["broken"]["id"] == broken_id, r.stdout + r.stderr


def test_a_cut_tail_with_a_rewritten_head_is_caught_by_the_signed_head(fed: Federation) -> None:
    # Issue 20 #10: no hashing needed to cut entries off and point meta.audit_head at the
    # new last one; the head the controller signs beside state.db (and a copy the operator
    # kept) catch it, and so does emptying the log.
    fed.controller()
    for role in ("client", "combiner", "admin"):
        fed.token(role)
    kept = fed.tmp / "kept.head"
    kept.write_text(signed_head(fed))  # the operator's copy, at entry 3
    fed.seed_from(QUICKSTART)  # entry 4
    code, out, err = cli(fed, "audit", "verify", "--head", str(kept))
    assert code == 0 and f"matches the signed head {kept}" in out, out + err
    newest = json.loads(signed_head(fed))
    assert newest["id"] == 4 and newest["count"] == 4, newest
    forged = fed.tmp / "forged.head"
    forged.write_text(json.dumps({**newest, "id": 2}))
    code, out, err = cli(fed, "audit", "verify", "--head", str(forged))
    assert code == 1 and "is not signed by this controller" in out, out + err

    tamper(
        fed,
        "DELETE FROM audit WHERE id > 2",
        "UPDATE meta SET value=(SELECT id || ' ' || hash FROM audit WHERE id=2) WHERE key='audit_head'",
    )
    code, out, err = cli(fed, "audit", "verify")
    assert code == 1 and out.startswith("audit log broken at entry 3: entries after 2 were removed: the signed head names entry 4 of 4"), out + err
    code, out, err = cli(fed, "audit", "verify", "--json")
    assert code == 1 and json.loads(out)["ok"] is False, out + err
    fed.stop_all()
    r = scaleout(*offline(fed))
    assert r.returncode == 1 and "entries after 2 were removed" in r.stdout, r.stdout + r.stderr
    # The operator's copy names entry 3, which is gone too.
    r = scaleout(*offline(fed, "--head", str(kept)))
    assert r.returncode == 1, r.stdout + r.stderr

    tamper(fed, "DELETE FROM audit", "DELETE FROM meta WHERE key='audit_head'")
    r = scaleout(*offline(fed))
    assert r.returncode == 1 and "the log is empty, but the signed head names entry 4 of 4" in r.stdout, r.stdout + r.stderr
    if fed.store is None:
        (fed.data / "audit.head").unlink()
    else:
        tamper(fed, "DELETE FROM meta WHERE key='audit_anchor'")
    r = scaleout(*offline(fed))
    assert r.returncode == 1 and f"the signed head {head_where(fed)} is missing" in r.stdout, r.stdout + r.stderr


def test_no_signed_head_beside_a_log_fails_verify_and_a_rewritten_head_stays_in_the_chain(fed: Federation) -> None:
    # The cut tail again, with audit.head and audit.key deleted too: nothing beside state.db
    # to check against is itself a failure (a kept copy, --head, decides then); a controller
    # that finds no head writes one and says so in the chain, for good.
    if fed.store is not None:
        pytest.skip("a PostgreSQL store keeps its signed head in the store, not beside state.db: tests/integration/test_pg_audit_head.py")
    fed.controller()
    for role in ("client", "combiner", "admin"):
        fed.token(role)
    kept = fed.tmp / "kept.head"
    kept.write_bytes((fed.data / "audit.head").read_bytes())  # at entry 3
    fed.seed_from(QUICKSTART)  # entry 4
    fed.stop_all()
    (fed.data / "audit.head").unlink()
    (fed.data / "audit.key").unlink()
    r = scaleout(*offline(fed))
    assert r.returncode == 1 and "no signed audit head" in r.stdout, r.stdout + r.stderr
    r = scaleout(*offline(fed, "--head", str(kept)))
    assert r.returncode == 0 and f"matches the signed head {kept}" in r.stdout, r.stdout + r.stderr
    tamper(
        fed,
        "DELETE FROM audit WHERE id > 2",
        "UPDATE meta SET value=(SELECT id || ' ' || hash FROM audit WHERE id=2) WHERE key='audit_head'",
    )
    r = scaleout(*offline(fed))
    assert r.returncode == 1 and "no signed audit head" in r.stdout, r.stdout + r.stderr  # was: intact, rc 0
    r = scaleout(*offline(fed, "--head", str(kept)))
    assert r.returncode == 1, r.stdout + r.stderr
    # A controller started on it writes a new head, and an entry that says so.
    fed.controller()
    code, out, err = cli(fed, "audit", "verify")
    assert code == 0 and "warning: entry 3: the signed audit head was missing at start and was rewritten" in out, out + err
    entries = json.loads(cli(fed, "audit", "ls", "--json")[1])
    assert [e["action"] for e in entries] == ["token.create", "token.create", "audit.head_rewritten"], entries
    code, out, err = cli(fed, "audit", "verify", "--head", str(kept))
    assert code == 1, out + err  # the operator's copy (signed with the deleted key, naming the cut entry 3) does not pass
