"""State, its neighbours and the blob store on a real PostgreSQL server (store/pg.py, store/pgblobs.py).

Where a SQLite test of the same store exists, it runs here again unchanged against PostgreSQL
(the two must answer alike); the rest checks what only PostgreSQL has."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import test_command_store
import test_logged_metrics

from scaleout.core.errors import (
    IntegrityError,
    NotFoundError,
    StorageError,
    StoreUnreachable,
)
from scaleout.store.identities import Identities
from scaleout.store.metrics import dropped_metrics, glob_regex
from scaleout.store.pg import link_failure, redact
from scaleout.store.pgblobs import CHUNK, PgBlobStore
from scaleout.store.state import AUDIT_HEAD, State


@pytest.fixture
def st(pg_url: str) -> Iterator[State]:
    state = State(pg_url)
    yield state
    state.close()


class _At:
    """Stands in for a SQLite test's tmp_path: ``tmp_path / "state.db"`` is the PostgreSQL URL."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __truediv__(self, name: str) -> str:
        return self.url


def test_the_command_store_tests_pass_on_postgresql(pg_url: str, postgres_server) -> None:  # type: ignore[no-untyped-def]
    test_command_store.test_jobs_results_and_a_controller_restart(_At(pg_url))  # type: ignore[arg-type]
    for test in (test_command_store.test_client_info_waits_for_the_registry_row_and_bounds_attributes,
                 test_command_store.test_the_attribute_trail_keeps_each_change_once):
        test(_At(postgres_server.url(postgres_server.create_database())))  # type: ignore[arg-type]


def test_the_logged_metrics_tests_pass_on_postgresql(pg_url: str) -> None:
    fill = test_logged_metrics.state.__wrapped__  # type: ignore[attr-defined]
    gen = fill(_At(pg_url))
    state = next(gen)
    try:
        test_logged_metrics.test_every_value_is_a_row_oldest_first(state)
        test_logged_metrics.test_filters_and_globs(state)
        test_logged_metrics.test_limit_keeps_the_latest_and_counts_them_all(state)
        state.add_report("metric", "s1", 1, "site-1", {"dropped": 4}, None)
        state.add_report("metric", "s1", 1, "site-1", {"dropped": 2}, None)
        assert [(r["client"], r["dropped"]) for r in dropped_metrics(state, client="site-?")] == [("site-1", 6)]
    finally:
        gen.close()


def test_glob_patterns_as_regular_expressions() -> None:
    import re

    for pattern, yes, no in (("train_*", "train_loss", "xtrain_"), ("a?c", "abc", "ac"), ("[ab]x", "bx", "cx"), ("[^a]x", "bx", "ax"), ("a.b", "a.b", "axb")):
        assert re.fullmatch(glob_regex(pattern), yes) and not re.fullmatch(glob_regex(pattern), no), pattern


def test_registry_models_sessions_rounds_steps_and_reports(st: State) -> None:
    st.upsert_combiner("c1", "online", url="wss://x", clients=2)
    st.upsert_combiner("c1", "offline")  # url and clients kept (COALESCE on the row there)
    st.upsert_client("a", "online", combiner="c1")
    st.upsert_client("b", "online", combiner="c1")
    st.set_clients_offline("c1", keep={"a"})
    assert [(c["name"], c["url"], c["clients"], c["status"]) for c in st.combiners()] == [("c1", "wss://x", 2, "offline")]
    assert [(c["name"], c["status"], c["attributes"]) for c in st.clients()] == [("a", "online", {}), ("b", "offline", {})]

    seed, m1 = "a" * 64, "b" * 64
    st.add_package("p" * 64, "pkg.tgz", 10, signature="sig")
    st.add_package("p" * 64, "pkg.tgz", 10)  # INSERT OR IGNORE: the first stays
    assert st.package("p" * 64)["signature"] == "sig"
    st.commit_model(seed, 5)
    st.add_session("s1", {"rounds": 2}, seed)
    st.start_round("s1", 1, seed, ["a", "b"], selection={"picked": 2})
    st.add_step("s1", {"step": "round_started", "index": 1})
    st.commit_round("s1", 1, m1, 6, parent=seed, aggregator="fedavg", contributors=["a"])
    st.finish_round("s1", 1, validation={"acc": 0.5}, timing={"total": 1.0})
    st.add_step("s1", {"step": "model_committed", "index": 1})
    assert st.steps("s1") == [{"step": "round_started", "index": 1}, {"step": "model_committed", "index": 1}]
    assert st.get_meta("active_model") == m1 and st.model("bbbbbb")["parent"] == seed  # a unique prefix
    assert [m["id"] for m in st.models("s1")] == [m1] and len(st.models()) == 2
    (row,) = st.rounds("s1")
    assert (row["status"], row["model_id"], row["participants"], row["validation"], row["selection"]) == ("succeeded", m1, ["a"], {"acc": 0.5}, {"picked": 2})
    # A round started again (after a restart) replaces the row: what it had is gone, as in SQLite.
    st.start_round("s1", 1, seed, ["a"], attempt=2, retried=["controller restarted"])
    (row,) = st.rounds("s1")
    assert (row["status"], row["model_id"], row["finished"], row["attempt"], row["retried"], row["validation"]) == ("running", None, None, 2, ["controller restarted"], {})
    st.add_report("train", "s1", 1, "a", {"n": 1}, None)
    st.add_report("validate", "s1", 1, "a", {"acc": 1}, "boom")
    assert [(r["kind"], r["error"]) for r in st.reports("s1")] == [("train", None), ("validate", "boom")]
    assert [r["kind"] for r in st.reports("s1", 1, "train")] == ["train"]
    st.end_session("s1", "failed", m1, "stopped")
    assert st.sessions()[0]["status"] == "failed" and st.sessions()[0]["rounds_done"] == 1
    assert st.rounds("s1")[0]["reason"] == "stopped"
    assert st.blob_ids() == {"models": {seed, m1}, "packages": {"p" * 64}, "state": set()}
    with pytest.raises(NotFoundError):
        st.session("nope")


def test_the_audit_chain_is_append_only_and_verifies(st: State, pg_url: str) -> None:
    import psycopg

    for i in range(5):
        st.audit("admin:t1", "token.create", address="127.0.0.1", n=i)
    assert st.audit_verify() == (5, None)
    assert [e["detail"]["n"] for e in st.audit_log(limit=100)] == [4, 3, 2, 1, 0]
    assert len(st.audit_log(-1)) == 5  # no limit
    head = st.get_meta(AUDIT_HEAD)
    assert head is not None and head.startswith("5 ")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for sql in ("UPDATE audit SET actor='x' WHERE id=2", "DELETE FROM audit WHERE id=5", "TRUNCATE audit"):
            with pytest.raises(psycopg.Error, match="append-only"):
                conn.execute(sql)
        # Whoever drops the trigger first is caught by the chain.
        conn.execute("ALTER TABLE audit DISABLE TRIGGER audit_no_update")
        conn.execute("UPDATE audit SET actor='someone else' WHERE id=3")
    _, broken = st.audit_verify()
    assert broken is not None and broken.id == 3


def test_concurrent_audit_appends_from_several_connections_keep_one_chain(pg_url: str, append_concurrently: Callable[[list[State], int], list[BaseException]]) -> None:
    states = [State(pg_url) for _ in range(3)]
    assert append_concurrently(states, 15) == []
    assert states[0].audit_verify() == (45, None)
    for s in states:
        s.close()


def test_tokens_and_identities(st: State) -> None:
    ids = Identities(st)
    ids.add_token("j1", "client", None, 9e9, 1, ["x"], "admin")
    assert ids.enrol("n1", "client", "a", "j1", [], 1.0, key="k") == "n1"
    assert ids.enrol("n2", "client", "a", "j1", [], 2.0, key="k") == "n1"  # the same enrolment finished again
    with pytest.raises(Exception, match="used up"):
        ids.enrol("n3", "client", "b", "j1", [], 3.0)
    (tok,) = ids.tokens()
    assert (tok["uses"], tok["nodes"], tok["recent"], tok["sans"]) == (1, 1, ["a"], ["x"])
    assert ids.find_token("j1")["id"] == "j1"
    ids.revoke_token("j1", True, 4.0)
    assert ids.revoked_ids() == {"j1", "n1"}


def test_blobs_in_large_objects_round_trip_chunked_and_verified(pg_url: str, tmp_path: Path) -> None:
    import psycopg

    blobs = PgBlobStore(pg_url, tmp_path)
    big = os.urandom(2 * CHUNK + 12345)  # three chunks
    digest = blobs.put("models", big, ".safetensors")
    assert digest == hashlib.sha256(big).hexdigest()
    assert blobs.put("models", big, ".safetensors") == digest  # stored once
    assert blobs.get("models", digest, ".safetensors") == big
    assert [len(c) for c in blobs.chunks("models", digest, "")] == [CHUNK, CHUNK, 12345]
    # A committed model comes as pieces (a header, views of arrays): stored as the bytes they make.
    from scaleout.transport.link import Pieces

    other = big[::-1]
    pieces = Pieces([other[:10], memoryview(other)[10 : CHUNK + 3], b"", other[CHUNK + 3 :]])
    assert blobs.put("state", pieces, ".safetensors") == hashlib.sha256(other).hexdigest()
    assert blobs.get("state", hashlib.sha256(other).hexdigest(), ".safetensors") == other
    assert blobs.sweep("state", ".safetensors", set()) == [f"{hashlib.sha256(other).hexdigest()}.safetensors"]
    small = blobs.put("packages", b"pkg", ".tgz")
    assert blobs.has("packages", small, ".tgz") and not blobs.has("models", small, ".safetensors")
    with pytest.raises(NotFoundError):
        blobs.get("models", "0" * 64, ".safetensors")
    with pytest.raises(NotFoundError):
        blobs.get("models", "../etc", ".safetensors")
    out = tmp_path / "copy"
    with open(out, "wb") as fh:
        assert blobs.copy_to("models", digest, "", fh) == len(big)
    assert out.read_bytes() == big
    # One byte changed in the server's copy: the read says so.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        (oid,) = conn.execute("SELECT oid FROM blobs WHERE id=%s", (digest,)).fetchone()  # type: ignore[misc]
        conn.execute("SELECT lo_put(%s, %s, %s)", (oid, CHUNK + 7, bytes([big[CHUNK + 7] ^ 1])))
    with pytest.raises(IntegrityError):
        blobs.get("models", digest, ".safetensors")
    assert blobs.put("models", big, ".safetensors") == digest  # putting it again repairs it
    assert blobs.get("models", digest, ".safetensors") == big
    # What no row names goes at the next start; large objects with it.
    assert blobs.sweep_unnamed({"models": set(), "packages": {small}}) == {"models": [f"{digest}.safetensors"]}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM pg_largeobject_metadata").fetchone()  # type: ignore[misc]
    assert n == 1
    blobs.close()


def test_an_unreachable_or_stopped_server_is_a_storage_error(postgres_server, pg_url: str, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StorageError, match="connecting to the PostgreSQL store postgresql://postgres@127.0.0.1:1/x"):
        State("postgresql://postgres@127.0.0.1:1/x")
    with pytest.raises(StorageError, match="does not exist"):
        State(postgres_server.url("no_such_db"))
    assert redact("postgresql://u:secret@h:5/d") == "postgresql://u:***@h:5/d"
    st = State(pg_url)
    st.add_session("s1", {}, "m")
    caplog.set_level(logging.INFO)
    postgres_server.stop()
    try:
        with pytest.raises(StoreUnreachable, match="PostgreSQL store"):  # one the session runner waits for
            st.add_session("s2", {}, "m")
        with pytest.raises(StoreUnreachable), st.transaction():
            st.add_step("s1", {"x": 1})
    finally:
        postgres_server.start()
    st.add_session("s3", {}, "m")  # the pool connects again by itself
    assert [s["id"] for s in st.sessions()] == ["s1", "s3"]
    st.close()
    # The outage in a few lines: lost (once), at most one a SAY_EVERY_S meanwhile, back (once);
    # none of psycopg_pool's warning per attempt.
    parts = urlsplit(pg_url)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(x.startswith(f"lost the PostgreSQL store at 127.0.0.1:{parts.port}{parts.path} (") for x in lines) == 1, lines
    assert sum(x.startswith("PostgreSQL store back after ") for x in lines) == 1, lines
    assert len(lines) <= 4 and not [r for r in caplog.records if r.name == "psycopg.pool" and r.levelno >= logging.WARNING], lines


def test_a_lost_link_is_told_from_a_full_disk() -> None:
    """What the session runner waits for (the link: lost, refused, the server shutting down)
    and what it does not (the server's disk full, a constraint)."""
    import psycopg
    from psycopg import errors

    assert link_failure(psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"))
    assert link_failure(errors.AdminShutdown("terminating connection due to administrator command"))
    assert link_failure(errors.ConnectionFailure("connection failure"))
    assert link_failure(psycopg.InterfaceError("the connection is closed"))
    assert not link_failure(errors.DiskFull("could not extend file: No space left on device"))
    assert not link_failure(errors.UniqueViolation("duplicate key"))
    assert not link_failure(OSError(28, "No space left on device"))


def test_the_readme_section_says_what_the_cli_takes() -> None:
    """README's "PostgreSQL store": each scaleout command in it parses as written."""
    import re
    import shlex

    from scaleout.cli import build_parser

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    text = re.search(r"^## PostgreSQL store\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert text is not None
    lines = [line for block in re.findall(r"^```\n(.*?)^```", text[1], re.MULTILINE | re.DOTALL) for line in block.splitlines() if line.startswith("scaleout ")]
    assert [shlex.split(line)[1] for line in lines] == ["store", "serve", "store", "audit", "serve"]
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        if getattr(args, "out", None):  # store keygen
            continue
        assert (getattr(args, "store", None) or getattr(args, "to", None) or "").startswith("postgresql://"), line
        if shlex.split(line)[1] == "serve":  # a postgresql store needs the key file: the README must say so
            assert args.key_file, line
    assert "SCALEOUT_STORE" in text[1] and 'store = "postgresql://..."' in text[1]
