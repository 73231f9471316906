"""Listing logged metrics from state.db: one row per value, oldest first, the latest N."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scaleout.store.metrics import logged_metrics
from scaleout.store.state import State


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    st = State(tmp_path / "state.db")
    # What combiners report for log_metric calls (metric_body), with other reports between.
    st.add_report("metric", "s1", 1, "site-1", {"metrics": {"loss": 0.9, "acc": 0.5}, "step": 0}, None)
    st.add_report("train", "s1", 1, "site-1", {"metadata": {"training_metadata": {"num_examples": 3}}}, None)
    st.add_report("metric", "s1", 1, "site-2", {"metrics": {"loss": 0.8}, "step": None}, None)
    st.add_report("metric", "s1", 2, "site-1", {"metrics": {"loss": 0.7, "lr": 3}, "step": 1}, None)
    st.add_report("metric", "s2", 1, "other", {"metrics": {"loss": 0.1}, "step": 5}, None)
    # What a rogue combiner might store: nothing listed from it, and nothing breaks.
    st.add_report("metric", "s2", 1, "rogue", {"metrics": ["x", 1], "step": "soon"}, None)
    st.add_report("metric", "s2", 1, "rogue", {"metrics": {"name": "text", "n": 2}, "step": 1.5}, None)
    st.add_report("metric", "s2", 1, "rogue", {}, None)
    yield st
    st.close()


def values(rows: list[dict[str, object]]) -> list[tuple[object, ...]]:
    return [(r["session_id"], r["round_index"], r["client"], r["step"], r["key"], r["value"]) for r in rows]


def test_every_value_is_a_row_oldest_first(state: State) -> None:
    rows, total = logged_metrics(state)
    assert values(rows) == [
        ("s1", 1, "site-1", 0, "loss", 0.9),
        ("s1", 1, "site-1", 0, "acc", 0.5),
        ("s1", 1, "site-2", None, "loss", 0.8),
        ("s1", 2, "site-1", 1, "loss", 0.7),
        ("s1", 2, "site-1", 1, "lr", 3),
        ("s2", 1, "other", 5, "loss", 0.1),
        ("s2", 1, "rogue", None, "n", 2),  # a non-integer step is not shown as one; text values are left out
    ]
    assert total == 7 and all(isinstance(r["created"], float) for r in rows)


def test_filters_and_globs(state: State) -> None:
    assert [r["value"] for r in logged_metrics(state, session_id="s1", key="loss")[0]] == [0.9, 0.8, 0.7]
    assert [r["key"] for r in logged_metrics(state, session_id="s1", round_index=2)[0]] == ["loss", "lr"]
    assert [r["client"] for r in logged_metrics(state, client="site-*", key="l*")[0]] == ["site-1", "site-2", "site-1", "site-1"]
    assert logged_metrics(state, key="LOSS") == ([], 0)  # names are case-sensitive, as logged
    assert logged_metrics(state, session_id="s9") == ([], 0)


def test_limit_keeps_the_latest_and_counts_them_all(state: State) -> None:
    rows, total = logged_metrics(state, session_id="s1", limit=2)
    assert values(rows) == [("s1", 2, "site-1", 1, "loss", 0.7), ("s1", 2, "site-1", 1, "lr", 3)] and total == 5
    rows, total = logged_metrics(state, session_id="s1", limit=5)
    assert len(rows) == 5 and total == 5
