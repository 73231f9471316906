"""Server functions in their worker process (real processes, no controller): Scaleout Edge's
published example unchanged, state across calls and restarts, and every way a method can
fail falling back to the built-in behaviour with the file and line named.

tests/fixtures/server_functions/edge_example.py is Scaleout Edge's server-functions example
(``examples/server-functions/server_functions.py``, the ``scaleoututil`` version of FEDn's
example of the same path; found in the public code index) saved unchanged;
edge_example_nocomments.py is the same code without its comments.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from scaleout.core import payload
from scaleout.core.aggregators.strategy import ClientUpdate, FedAdam, FedAvgStrategy
from scaleout.core.errors import ServerFunctionsError
from scaleout.core.serverfunctions import STATE_KEY
from scaleout.roles.serverfunctions import Runner, ServerFunctionsAggregate, ServerFunctionsStrategy, SessionFunctions

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "server_functions"
EDGE = FIXTURES / "edge_example.py"
MODEL = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.float64), "n": np.array([1, 2], np.int32)}


def attributes(name: str, args: list[Any]) -> Any:
    assert name == "get_current_attributes", name
    return {c: ({"charging": "False"} if c.endswith("-off") else {"charging": "True"} if c == "b" else {}) for c in args[0]}


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    made: list[Runner] = []
    yield made
    for r in made:
        r.close()


def start(runners: list[Runner], source: str, file: str = "sf.py", timeout: float = 10, state: bytes | None = None) -> tuple[SessionFunctions, list[str]]:
    lines: list[str] = []
    runner = Runner(source, file, timeout, attributes, lines.append)
    runners.append(runner)
    runner.start(state)
    return SessionFunctions("s-test", runner), lines


def updates(model: dict[str, np.ndarray], shifts: dict[str, tuple[float, int]]) -> list[ClientUpdate]:
    return [
        ClientUpdate(c, {k: (v + np.asarray(d).astype(v.dtype)) if v.dtype.kind == "f" else v + int(d * 10) for k, v in model.items()}, n, {"training_metadata": {"num_examples": n}})
        for c, (d, n) in shifts.items()
    ]


@pytest.mark.parametrize("path", [EDGE, FIXTURES / "edge_example_nocomments.py"], ids=["edge", "no-comments"])
def test_edge_example_selects_charging_clients_decays_lr_and_aggregates_by_weighted_mean(runners: list[Runner], path: Path) -> None:
    f, lines = start(runners, path.read_text(), path.name)
    assert f.methods == {"client_selection", "client_settings", "aggregate"}
    chosen = f.select_sync({"c0": ["a", "phone-off"], "c1": ["b"]}, "training")
    assert chosen == {"c0": ["a"], "c1": ["b"]}
    assert "Client phone-off is charging: False" in lines and "2 clients selected based on client attributes, out of 3 clients." in lines
    assert f.select_sync({"c0": ["a", "phone-off"]}, "validation") == {"c0": ["a"]}
    assert f.select_sync({"c0": ["a", "phone-off"]}, "prediction") == {"c0": ["a", "phone-off"]}  # every client predicts
    blob = payload.encode_named(MODEL, "dict")
    lrs = [f.settings_sync(blob)["learning_rate"] for _ in range(11)]
    assert lrs[:10] == pytest.approx([0.01] * 10) and lrs[10] == pytest.approx(0.001)  # lowered every 10 rounds

    ups = updates(MODEL, {"a": (0.5, 10), "b": (-0.25, 30)})
    strategy = f.wrap(FedAvgStrategy())
    assert isinstance(strategy, ServerFunctionsAggregate) and strategy.needs_updates
    model, state = strategy.aggregate(MODEL, ups, {})
    expected = {k: (ups[0].tensors[k].astype(np.float64) * 10 + ups[1].tensors[k].astype(np.float64) * 30) / 40 for k in MODEL}
    for k in ("w", "b"):
        np.testing.assert_allclose(model[k], expected[k], rtol=1e-6)
        assert model[k].dtype == MODEL[k].dtype
    np.testing.assert_array_equal(model["n"], np.rint(expected["n"]).astype(np.int32))
    assert "Models aggregated" in lines and not f.errors
    assert list(state) == [STATE_KEY]


STATEFUL = textwrap.dedent('''\
    from scaleoututil.serverfunctions.allowed_import import Dict, List, ServerFunctionsBase, Tuple, np


    class ServerFunctions(ServerFunctionsBase):
        def __init__(self) -> None:
            self.round = 0
            self.seen = []

        def client_settings(self, global_model: List[np.ndarray]) -> dict:
            self.round += 1
            return {"round": self.round, "sum": float(sum(float(p.sum()) for p in global_model))}

        def aggregate(self, previous_global, client_updates):
            self.seen.append(sorted(client_updates))
            print(f"aggregate of round {self.round}: {len(self.seen)} so far")
            return [p + len(self.seen) for p in previous_global]
''')


def test_state_is_kept_across_calls_and_a_new_worker_resumes_it(runners: list[Runner]) -> None:
    f, lines = start(runners, STATEFUL)
    blob = payload.encode_named(MODEL, "dict")
    strategy = f.wrap(FedAdam())
    for r in (1, 2):
        assert f.settings_sync(blob) == {"round": r, "sum": pytest.approx(sum(float(a.sum()) for a in MODEL.values()))}
        model, state = strategy.aggregate(MODEL, updates(MODEL, {"a": (0.1, 1)}), {"m/w": np.zeros((2, 3), np.float32), STATE_KEY: np.zeros(1, np.uint8)})
        np.testing.assert_allclose(model["b"], MODEL["b"] + r)  # the class's own aggregate, its state growing
        assert set(state) == {"m/w", STATE_KEY}  # the inner strategy's state is passed through
    assert "aggregate of round 2: 2 so far" in lines
    saved = state[STATE_KEY].tobytes()
    f2, _ = start(runners, STATEFUL, state=saved)  # as after a controller restart: the state of the last committed round
    assert f2.settings_sync(blob)["round"] == 3
    np.testing.assert_allclose(f2.wrap(FedAvgStrategy()).aggregate(MODEL, updates(MODEL, {"a": (0.1, 1)}), {})[0]["b"], MODEL["b"] + 3)


FAILING = textwrap.dedent('''\
    from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase, np


    class ServerFunctions(ServerFunctionsBase):
        def __init__(self) -> None:
            self.calls = 0

        def client_selection(self, client_ids, round_type):
            self.calls += 1
            if self.calls == 1:
                return {"not": "a list"}
            raise ValueError("no clients today")

        def client_settings(self, global_model):
            self.calls += 1
            while True:
                pass

        def aggregate(self, previous_global, client_updates):
            return [p[:1] for p in previous_global]
''')


def test_raising_hanging_and_wrong_results_fall_back_with_file_and_line(runners: list[Runner]) -> None:
    f, lines = start(runners, FAILING, "failing.py", timeout=1.5)
    offered = {"c0": ["a", "b"]}
    assert f.select_sync(offered, "training") == offered  # a dict, not a list: the built-in selection
    assert f.select_sync(offered, "training") == offered  # raised: the built-in selection
    wrong, raised = f.errors
    assert wrong["method"] == "client_selection" and "must return a list of client names" in wrong["error"]
    assert raised == {"method": "client_selection", "error": "ValueError: no clients today", "where": "failing.py:12 in client_selection"}
    state_before = f.runner.snapshot()

    assert f.settings_sync(payload.encode_named(MODEL, "dict")) == {}  # hung: killed, the built-in (no settings)
    hung = f.errors[-1]
    assert hung["method"] == "client_settings" and "did not return within 1.5 s" in hung["error"] and "started again" in hung["error"]
    assert f.runner.proc is not None and f.runner.proc.poll() is None  # a new worker, from the last kept state
    assert f.runner.saved == state_before

    ups = updates(MODEL, {"a": (0.5, 10), "b": (-0.25, 30)})
    model, _ = f.wrap(FedAvgStrategy()).aggregate(MODEL, ups, {})  # wrong shapes: FedAvg instead
    assert "returned shape (1, 3) at position 0; tensor 'w' has shape (2, 3)" in f.errors[-1]["error"]
    np.testing.assert_allclose(model["b"], (ups[0].tensors["b"] * 10 + ups[1].tensors["b"] * 30) / 40)
    assert f.select_sync(offered, "training") == offered  # the worker serves on after all that
    assert f.errors[-1]["where"] == "failing.py:12 in client_selection"


def test_a_forbidden_import_is_refused_with_its_name_file_and_line(runners: list[Runner]) -> None:
    source = "from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase\nimport os\n\n\nclass ServerFunctions(ServerFunctionsBase):\n    pass\n"
    with pytest.raises(ServerFunctionsError, match=r"^server functions may not import os; .* \(evil.py:2 in <module>\)$") as info:
        start(runners, source, "evil.py")
    assert info.value.where == "evil.py:2 in <module>"
    inside = textwrap.dedent('''\
        from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase


        class ServerFunctions(ServerFunctionsBase):
            def client_settings(self, global_model):
                import subprocess
                return {}
    ''')
    f, _ = start(runners, inside, "late.py")
    assert f.settings_sync(payload.encode_named(MODEL, "dict")) == {}
    assert f.errors[-1]["error"].startswith("server functions may not import subprocess; they may import numpy")
    assert f.errors[-1]["where"] == "late.py:6 in client_settings"
    for bad, why in (("x = 1\n", "defines no class named ServerFunctions"), ("def (:\n", "SyntaxError")):
        with pytest.raises(ServerFunctionsError, match=why):
            start(runners, bad)


FEDN = textwrap.dedent('''\
    from fedn.common.log_config import logger
    from fedn.network.combiner.hooks.allowed_import import Dict, List, ServerFunctionsBase, Tuple, np, random


    class ServerFunctions(ServerFunctionsBase):
        def __init__(self) -> None:
            self.round = 0
            self.lr = 0.1

        def client_selection(self, client_ids: List[str]) -> List[str]:
            logger.info("choosing from %d", len(client_ids))
            return sorted(client_ids)[:1]

        def client_settings(self, global_model: List[np.ndarray]) -> dict:
            if self.round % 10 == 0:
                self.lr *= 0.1
            self.round += 1
            return {"learning_rate": self.lr}
''')


def test_fedns_import_path_and_selection_without_a_round_type(runners: list[Runner]) -> None:
    from scaleoututil.serverfunctions.fedn_hooks import ServerFunctionsBase as FednBase

    import inspect

    assert list(inspect.signature(FednBase.client_selection).parameters) == ["self", "client_ids"]
    f, lines = start(runners, FEDN, "fedn_sf.py")
    assert f.select_sync({"c0": ["b", "a"]}, "training") == {"c0": ["a"]}
    assert "INFO choosing from 2" in lines
    assert f.select_sync({"c0": ["b", "a"]}, "validation") == {"c0": ["b", "a"]}  # FEDn selects for training only
    assert f.settings_sync(payload.encode_named(MODEL, "dict")) == {"learning_rate": pytest.approx(0.01)}
    assert isinstance(f.wrap(FedAvgStrategy()), ServerFunctionsStrategy) and not f.wrap(FedAvgStrategy()).needs_updates


INCREMENTAL = textwrap.dedent('''\
    from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase, np


    class ServerFunctions(ServerFunctionsBase):
        def __init__(self):
            self.total, self.acc = 0, None

        def incremental_aggregate(self, client_id, model, client_metadata, previous_global):
            n = client_metadata["num_examples"]
            self.acc = [p * n for p in model] if self.acc is None else [a + p * n for a, p in zip(self.acc, model)]
            self.total += n

        def get_incremental_aggregate_model(self):
            out = [a / self.total for a in self.acc]
            self.total, self.acc = 0, None
            return out
''')


def test_incremental_aggregate_sees_one_update_at_a_time(runners: list[Runner]) -> None:
    f, _ = start(runners, INCREMENTAL)
    ups = updates(MODEL, {"a": (0.5, 10), "b": (-0.25, 30), "c": (1.0, 20)})
    model, _ = f.wrap(FedAvgStrategy()).aggregate(MODEL, ups, {})
    np.testing.assert_allclose(model["b"], sum(u.tensors["b"] * u.num_examples for u in ups) / 60)
    assert not f.errors


PREDICT_ONE = textwrap.dedent('''\
    from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase
    from scaleoututil.serverfunctions.serverfunctionsbase import RoundType


    class ServerFunctions(ServerFunctionsBase):
        def client_selection(self, client_ids, round_type):
            return client_ids[:1] if round_type == RoundType.PREDICTION else client_ids
''')


def test_predictions_while_a_session_runs_are_narrowed_by_its_class(runners: list[Runner]) -> None:
    import asyncio
    from types import SimpleNamespace

    from scaleout.roles.serverfunctions import prediction_selection

    f, _ = start(runners, PREDICT_ONE)

    class Registry:  # the controller's registry writer: nothing is queued here
        async def flush(self) -> None:
            return None

    host = SimpleNamespace(registry=Registry())
    chosen = {"b": "c1", "a": "c0", "c": "c1"}
    assert asyncio.run(prediction_selection(SimpleNamespace(sfn=f), host, chosen)) == {"a": "c0"}
    assert asyncio.run(prediction_selection(None, host, chosen)) == chosen  # no session: every client


def test_closing_stops_a_call_in_flight_at_once(runners: list[Runner]) -> None:
    import threading

    hang = "from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase\n\n\nclass ServerFunctions(ServerFunctionsBase):\n    def client_settings(self, global_model):\n        while True:\n            pass\n"
    f, _ = start(runners, hang, timeout=600)
    outcome: list[Any] = []
    call = threading.Thread(target=lambda: outcome.append(f.settings_sync(payload.encode_named(MODEL, "dict"))))
    call.start()
    f.close()  # the controller stops: it must not wait for the call's 600 s
    call.join(timeout=30)
    assert not call.is_alive() and outcome == [{}]
    assert f.runner.proc is None  # and none started again
    assert any(w in f.errors[-1]["error"] for w in ("exited during client_settings", "not called"))  # killed mid-call, or closed before it


def test_the_wrapped_strategy_keeps_the_built_in_ones_train_settings(runners: list[Runner]) -> None:
    from scaleout.core.aggregators.strategy import make_strategy

    f, _ = start(runners, STATEFUL)
    prox = make_strategy("fedprox", {"mu": 0.25})
    assert f.wrap(prox).train_settings() == prox.train_settings() == {"mu": 0.25}


HOSTILE = textwrap.dedent('''\
    from scaleoututil.serverfunctions.allowed_import import ServerFunctionsBase, np


    class ServerFunctions(ServerFunctionsBase):
        def __init__(self):
            self.calls = 0

        def client_selection(self, client_ids, round_type):
            self.calls += 1
            worker = __builtins__["__import__"].__self__  # its raw pipe to the controller (a hostile admin's way)
            if round_type.value == "training":
                body = b"\\x00\\x00\\x00\\x05{bad}"  # a frame whose JSON does not parse
                worker.out.write(len(body).to_bytes(4, "big") + body)
            elif round_type.value == "validation":
                worker.out.write(b"\\x7f\\xff\\xff\\xff" + b"\\x00" * 64)  # a frame said to be 2 GiB
            worker.out.flush()
            return client_ids[:1]

        def client_settings(self, global_model):
            for i in range(1000):
                print(f"line {i} " + "y" * 3000)
            if self.calls:
                return {"blob": "x" * (2 << 20)}  # 2 MiB of settings
            return {"ok": 1}

        def aggregate(self, previous_global, client_updates):
            if len(client_updates) == 1:
                return [np.ones(1 << 21)] + previous_global[1:]  # 16 MiB, far more than the model
            return [[1, [2, 3]]] + [p.tolist() for p in previous_global[1:]]  # ragged: numpy raises ValueError
''')


def test_ragged_oversized_and_forged_answers_fall_back_and_the_worker_serves_on(runners: list[Runner]) -> None:
    f, lines = start(runners, HOSTILE, "hostile.py", timeout=10)
    ups = updates(MODEL, {"a": (0.5, 10), "b": (-0.25, 30)})
    strategy = f.wrap(FedAvgStrategy())
    model, _ = strategy.aggregate(MODEL, ups, {})  # ragged: FedAvg, not a crash
    assert f.errors[-1]["method"] == "aggregate" and "not an array at position 0" in f.errors[-1]["error"], f.errors
    np.testing.assert_allclose(model["b"], (ups[0].tensors["b"] * 10 + ups[1].tensors["b"] * 30) / 40)
    model, _ = strategy.aggregate(MODEL, ups[:1], {})  # 16 MiB for a model of 88 bytes: refused by the worker
    assert "bytes; at most" in f.errors[-1]["error"] and "started again" not in f.errors[-1]["error"], f.errors[-1]
    np.testing.assert_allclose(model["b"], ups[0].tensors["b"])

    pid = f.runner.proc.pid if f.runner.proc else None
    offered = {"c0": ["a", "b"]}
    assert f.select_sync(offered, "training") == offered  # a forged frame: the built-in selection
    assert "cannot be taken" in f.errors[-1]["error"] and "started again" in f.errors[-1]["error"], f.errors[-1]
    assert f.runner.proc is not None and f.runner.proc.pid != pid
    assert f.select_sync(offered, "validation") == offered  # 2 GiB announced: refused before its body is read
    assert "a frame of 2147483647 bytes, more than the 1048576 this answer may take" in f.errors[-1]["error"], f.errors[-1]
    assert f.select_sync(offered, "prediction") == {"c0": ["a"]}  # the restarted worker serves on

    blob = payload.encode_named(MODEL, "dict")
    lines.clear()
    assert f.settings_sync(blob) == {}  # 2 MiB of settings: the built-in (none)
    assert "bytes; at most 1048576 are taken" in f.errors[-1]["error"], f.errors[-1]
    assert len(lines) == 101 and lines[-1] == "... 900 more lines not shown", lines[-1]  # a print flood: 100 lines logged
    assert all(len(line) <= 300 for line in lines) and lines[0].startswith("line 0 yyy")


def test_calls_never_use_the_loops_shared_thread_pool(runners: list[Runner]) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from scaleout.roles.serverfunctions import client_selection, client_settings, close

    class Refusing(ThreadPoolExecutor):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a server-functions call was given to the loop's shared pool")

    f, _ = start(runners, PREDICT_ONE)

    class Registry:
        async def flush(self) -> None:
            return None

    async def go() -> None:
        asyncio.get_running_loop().set_default_executor(Refusing())
        s = SimpleNamespace(sfn=f)
        assert await client_selection(s, SimpleNamespace(registry=Registry()), {"c0": ["a", "b"]}, "prediction") == {"c0": ["a"]}
        assert await client_settings(s, {"x": 1}, b"") == {"x": 1}  # no client_settings defined: --settings
        await close(s)
        assert s.sfn is None and f.runner.proc is None

    asyncio.run(go())
    assert not f.errors
