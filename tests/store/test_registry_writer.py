"""The registry writer keeps writing when one queued row cannot be stored (issue 19 #17):
the batch is retried row by row, the bad row is quarantined with a log line, the rest kept."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from scaleout.store.registry import RegistryWriter
from scaleout.store.state import State


def stored_reports(path: Path) -> list[tuple[str, int]]:
    with closing(sqlite3.connect(path)) as db:
        return [(r[0], r[1]) for r in db.execute("SELECT client, round_index FROM reports ORDER BY id")]


def test_a_row_sqlite_cannot_hold_is_quarantined_and_the_batch_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.db"
    State(path).close()  # the schema, as the controller creates it

    async def go() -> RegistryWriter:
        writer = RegistryWriter(path)
        writer.start()
        writer.client("good-0", "online", "c1")
        writer.report("train", "s1", 1, "good-0", {"ok": 1}, None)
        writer.report("train", "s1", 2**63, "evil", {}, None)  # beyond SQLite's INTEGER: OverflowError
        writer.report("train", "s1", 1, "good-1", {"ok": 1}, None)
        await writer.flush()
        # The writer goes on: its background task is alive and later changes are written.
        assert writer._task is not None and not writer._task.done()
        writer.report("train", "s1", 2, "good-2", {}, None)
        writer.combiner("c1", "online", 1)
        await writer.flush()
        await writer.close()
        return writer

    with caplog.at_level(logging.WARNING, logger="scaleout.store"):
        writer = asyncio.run(go())
    assert stored_reports(path) == [("good-0", 1), ("good-1", 1), ("good-2", 2)]
    assert writer.quarantined == 1 and writer.written == 5
    quarantined = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(quarantined) == 1, caplog.text
    assert "train report of client evil" in quarantined[0] and "OverflowError" in quarantined[0], quarantined
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT name, status FROM clients").fetchall() == [("good-0", "online")]
        assert db.execute("SELECT name, status FROM combiners").fetchall() == [("c1", "online")]


def test_rows_stored_before_numbers_were_bounded_read_back_as_json(tmp_path: Path) -> None:
    from scaleout.core.messages import to_json
    from scaleout.store.metrics import logged_metrics

    st = State(tmp_path / "state.db")
    try:
        # As an older controller stored them: text SQLite and Python read as inf or a 400-digit int.
        for data in (
            '{"metrics": {"loss": 1e309, "acc": 0.5}, "step": 1%s}' % ("0" * 400),
            '{"metrics": {"big": 1%s, "ok": 2}, "step": 3}' % ("0" * 400),
        ):
            st.db.execute(
                "INSERT INTO reports(kind, session_id, round_index, client, data, error, created) VALUES('metric', 's1', 1, 'c', ?, NULL, 0)", (data,)
            )
        st.db.execute(
            "INSERT INTO reports(kind, session_id, round_index, client, data, error, created) VALUES('train', 's1', 1, 'c', ?, NULL, 0)",
            ('{"metadata": {"x": 1e309, "n": 1%s, "m": -Infinity}}' % ("0" * 400),),
        )
        rows, total = logged_metrics(st)
        assert [(r["key"], r["value"], r["step"]) for r in rows] == [("acc", 0.5, None), ("ok", 2, 3)]
        assert total == 2
        to_json(rows)  # a listing is always JSON
        (train,) = st.reports("s1", kind="train")
        assert train["data"] == {"metadata": {"x": None, "n": None, "m": None}}
    finally:
        st.close()
