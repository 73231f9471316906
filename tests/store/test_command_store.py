from __future__ import annotations

from pathlib import Path

import pytest

from scaleout.core.errors import NotFoundError
from scaleout.store.commands import CommandStore
from scaleout.store.state import State


def job(job_id: str, kind: str = "command", created: float = 1.0) -> dict:
    return {"id": job_id, "kind": kind, "name": "x" if kind == "command" else "", "params": {"k": "ä"}, "model_id": None, "timeout": 5.0, "created": created}


def test_jobs_results_and_a_controller_restart(tmp_path: Path) -> None:
    store = CommandStore(tmp_path / "state.db")
    store.add_job(job("c-aaa111"), {"a": "c1", "b": "c1", "c": "c2"}, {"d": ("not_connected", "not connected")})
    store.record("c-aaa111", [{"client": "a", "ok": True, "data": {"y": 1}, "duration_s": 0.5}])
    store.record("c-aaa111", [{"client": "a", "ok": False, "error": "late twin", "code": "raised"}])  # the first outcome stands
    store.record("c-aaa111", [{"client": "b", "ok": False, "data": {}, "error": "boom", "code": "raised"}])
    shown = store.job("command", "c-aaa")
    assert shown["params"] == {"k": "ä"} and shown["status"] == "running"
    results = {r["client"]: r for r in shown["results"]}
    assert (results["a"]["status"], results["a"]["data"], results["a"]["duration_s"]) == ("ok", {"y": 1}, 0.5)
    assert (results["b"]["status"], results["b"]["code"], results["b"]["data"]) == ("error", "raised", None)
    assert results["c"]["status"] == "pending" and results["d"]["code"] == "not_connected"
    store.add_job(job("p-bbb222", "predict", created=2.0), {"a": "c1"}, {})
    assert [(j["id"], j["ok"], j["error"], j["pending"]) for j in store.jobs("command")] == [("c-aaa111", 1, 2, 1)]
    assert store.job("predict", "latest")["id"] == "p-bbb222"
    with pytest.raises(NotFoundError, match="no command 'p-bbb'"):
        store.job("command", "p-bbb")  # a prediction is not a command
    assert store.interrupt_running("the controller stopped") == 2
    shown = store.job("command", "c-aaa111")
    assert shown["status"] == "finished" and shown["reason"] == "the controller stopped"
    assert {r["client"]: r["code"] for r in shown["results"]}["c"] == "lost"
    store.close()


def test_client_info_waits_for_the_registry_row_and_bounds_attributes(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = CommandStore(path)
    assert store.client_info({"a": {"site": "x"}}, {"b": ("abc", None)}, [("a", None, '{"key":"t","payload":{"value":1}}', 5.0)]) == {"a", "b"}
    st = State(path)
    st.upsert_client("a", "online", combiner="c1")
    st.upsert_client("b", "online", combiner="c1")
    assert store.client_info({"a": {"site": "x"}}, {"b": ("abc", "bad")}, []) == set()
    assert store.client_info({"a": {"gpu": 0}}, {}, []) == set()  # merged
    assert store.client_info({"a": {"huge": "y" * (70 << 10)}}, {}, []) == set()  # beyond 64 KiB in all: not stored
    a, b = st.clients()
    assert a["attributes"] == {"site": "x", "gpu": 0} and (b["package"], b["package_error"]) == ("abc", "bad")
    assert a["first_seen"] <= a["last_seen"]
    assert [(r["client"], r["key"], r["payload"]) for r in store.telemetry("a", "t", 10)] == [("a", "t", {"value": 1})]
    assert store.telemetry("b", None, 10) == []
    assert store.client("a")["attributes"] == {"site": "x", "gpu": 0}
    with pytest.raises(NotFoundError, match="no client 'zed'"):
        store.client("zed")
    st.close()
    store.close()


def test_the_attribute_trail_keeps_each_change_once(tmp_path: Path) -> None:
    from scaleout.store.commands import attribute_trail

    path = tmp_path / "state.db"
    store = CommandStore(path)
    st = State(path)
    st.upsert_client("a", "online", combiner="c1")
    store.client_info({"a": {"site": "x", "gpu": 0}}, {}, [])
    store.client_info({"a": {"site": "x", "gpu": 0}}, {}, [])  # sent again on a reconnect: nothing new
    store.client_info({"a": {"site": "x", "gpu": 1}}, {}, [])
    store.client_info({"a": {"huge": "y" * (70 << 10)}}, {}, [])  # not stored: not in the trail either
    rows, total = attribute_trail(st, "a")
    assert [(r["key"], r["value"]) for r in rows] == [("site", "x"), ("gpu", 0), ("gpu", 1)] and total == 3
    assert all(r["client"] == "a" and r["created"] > 0 for r in rows)
    assert attribute_trail(st, "a", limit=1) == (rows[-1:], 3)
    with pytest.raises(NotFoundError, match="no client 'zed'"):
        attribute_trail(st, "zed")
    st.close()
    store.close()
