"""The combiner's fold queue (roles/folding.py): checked updates that wait for the fold are
folded together, up to FOLD_BATCH in one pass, with the sums of folding them one by one."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from scaleout.core.aggregators.fedavg import FedAvg
from scaleout.core.errors import UpdateRejected
from scaleout.core.payload import TensorSpec
from scaleout.roles.folding import FOLD_BATCH, FoldQueue

TEMPLATE = {"w": TensorSpec("float32", (70_001,)), "b": TensorSpec("float16", (3,)), "n": TensorSpec("int64", (2,))}


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(70_001).astype(np.float32), "b": rng.standard_normal(3).astype(np.float16), "n": rng.integers(0, 9, 2)}


class Recorder:
    """A real FedAvg whose add_many is recorded (batch sizes), and can be held until released."""

    def __init__(self) -> None:
        self.agg = FedAvg(TEMPLATE)
        self.batches: list[list[str]] = []
        self.counted: list[str] = []
        self.hold = threading.Event()
        self.hold.set()

    def add_many(self, items: Any) -> list[UpdateRejected | None]:
        self.hold.wait(10)
        self.batches.append([client for _, _, client in items])
        return self.agg.add_many(items)

    def on_update(self, client: str) -> bool:
        self.counted.append(client)
        return len(self.counted) == 20


def _reference(clients: list[int]) -> FedAvg:
    ref = FedAvg(TEMPLATE)
    for i in clients:
        ref.add(ref.check(_update(i)), 1.0 + i / 7, f"c{i}")
    return ref


def _same(a: FedAvg, b: FedAvg) -> None:
    pa, pb = a.partial(), b.partial()
    for name in TEMPLATE:
        np.testing.assert_array_equal(pa.sums[name], pb.sums[name])
    assert (pa.weight, pa.contributors) == (pb.weight, pb.contributors)


def test_updates_waiting_together_are_folded_in_batches_of_at_most_fold_batch() -> None:
    """20 updates checked at once: the first is folded alone (nothing else waits yet), the
    19 that wait meanwhile go in batches of 8, 8 and 3; the sums are those of 20 adds."""
    rec = Recorder()

    async def go() -> list[bool]:
        q = FoldQueue(asyncio.Lock(), rec.add_many, rec.on_update, lambda: True)
        checked = [rec.agg.check(_update(i)) for i in range(20)]
        return await asyncio.gather(*(q.fold(checked[i], 1.0 + i / 7, f"c{i}") for i in range(20)))

    ready = asyncio.run(go())
    assert FOLD_BATCH == 8
    assert [len(b) for b in rec.batches] == [1, 8, 8, 3]
    assert [c for b in rec.batches for c in b] == [f"c{i}" for i in range(20)] == rec.counted
    assert ready == [False] * 19 + [True]  # on_update's answer reaches the one it was for
    _same(rec.agg, _reference(list(range(20))))
    mean = rec.agg.result()["w"].astype(np.float64)
    weights = [1.0 + i / 7 for i in range(20)]
    want = sum(w * _update(i)["w"].astype(np.float64) for i, w in enumerate(weights)) / sum(weights)
    np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-6)


def test_a_refused_update_fails_alone_and_a_cancelled_one_never_reaches_the_sums() -> None:
    rec = Recorder()
    rec.hold.clear()  # the first fold waits, so the others queue behind it

    async def go() -> list[Any]:
        q = FoldQueue(asyncio.Lock(), rec.add_many, rec.on_update, lambda: True)
        checked = {i: rec.agg.check(_update(i)) for i in range(6)}
        names = {0: "c0", 1: "c1", 2: "c2", 3: "c1", 4: "c4", 5: "c5"}  # 3 comes back as c1: a duplicate
        tasks = [asyncio.ensure_future(q.fold(checked[i], 1.0 + i / 7, names[i])) for i in range(6)]
        for _ in range(100):  # each task's first step puts its update in line (no clock involved)
            if len(q.waiting) == 5:
                break
            await asyncio.sleep(0)
        assert len(q.waiting) == 5
        tasks[4].cancel()
        await asyncio.sleep(0)
        assert len(q.waiting) == 4  # c4 left the line before any fold took it
        rec.hold.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(go())
    assert out[0] is False and out[1] is False and out[2] is False and out[5] is False
    assert isinstance(out[3], UpdateRejected) and "duplicate" in str(out[3])
    assert isinstance(out[4], asyncio.CancelledError)
    assert rec.batches == [["c0"], ["c1", "c2", "c1", "c5"]]
    assert rec.counted == ["c0", "c1", "c2", "c5"]
    _same(rec.agg, _reference([0, 1, 2, 5]))


def test_updates_waiting_when_the_round_closed_are_refused_and_not_folded() -> None:
    rec = Recorder()
    rec.hold.clear()
    state = {"current": True}

    async def go() -> list[Any]:
        q = FoldQueue(asyncio.Lock(), rec.add_many, rec.on_update, lambda: state["current"])
        tasks = [asyncio.ensure_future(q.fold(rec.agg.check(_update(i)), 1.0, f"c{i}")) for i in range(3)]
        for _ in range(100):
            if len(q.waiting) == 2:
                break
            await asyncio.sleep(0)
        state["current"] = False  # the round closes while c0 is being folded
        rec.hold.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    out = asyncio.run(go())
    assert out[0] is False
    assert all(isinstance(o, UpdateRejected) and "round closed" in str(o) for o in out[1:])
    assert rec.batches == [["c0"]] and rec.counted == ["c0"]


@pytest.mark.parametrize("cap", [1, 3])
def test_the_cap_bounds_each_batch(cap: int) -> None:
    rec = Recorder()

    async def go() -> None:
        q = FoldQueue(asyncio.Lock(), rec.add_many, rec.on_update, lambda: True, cap=cap)
        await asyncio.gather(*(q.fold(rec.agg.check(_update(i)), 1.0 + i / 7, f"c{i}") for i in range(7)))

    asyncio.run(go())
    assert [len(b) for b in rec.batches] == ([1] * 7 if cap == 1 else [1, 3, 3])
    _same(rec.agg, _reference(list(range(7))))


def test_checked_updates_give_their_upload_budget_back_so_large_ones_wait_and_fold_together() -> None:
    """Each pull holds an upload budget that fits one update (the combiner's, for updates
    over half of it). Checked updates in their own files give it back while they wait for
    the fold (fold_out_of_budget, within a budget for waiting ones): with the first fold held,
    the next 8 are pulled and checked meanwhile and fold as one batch; sums as 9 adds."""
    rec = Recorder()
    rec.hold.clear()
    size = 1000

    async def go() -> list[bool]:
        from scaleout.transport.budget import ByteBudget

        uploads, waiting = ByteBudget(size), ByteBudget((FOLD_BATCH + 1) * size)  # as the combiner's fold_wait
        q = FoldQueue(asyncio.Lock(), rec.add_many, rec.on_update, lambda: True)
        pulled: list[int] = []

        async def pull(i: int) -> bool:
            async with uploads.hold(size) as give_back:  # one update's worth: pulled one at a time
                pulled.append(i)
                checked = rec.agg.check(_update(i))
                return await q.fold_out_of_budget(checked, 1.0 + i / 7, f"c{i}", size, give_back, waiting)

        pulls = [asyncio.ensure_future(pull(i)) for i in range(9)]
        for _ in range(1000):  # the loop runs the pulls that can go on: no clock involved
            if len(q.waiting) == 8:
                break
            await asyncio.sleep(0)
        assert pulled == list(range(9)) and len(q.waiting) == 8 and uploads.used == 0 and waiting.used == 9 * size
        rec.hold.set()
        return await asyncio.gather(*pulls)

    asyncio.run(go())
    assert [len(b) for b in rec.batches] == [1, 8]
    _same(rec.agg, _reference(list(range(9))))


def test_pulls_dropped_while_they_wait_for_the_fold_leave_the_sums_and_both_budgets_as_before() -> None:
    """Attack (issue 17 #2): the round is dropped (its pulls cancelled) while checked updates
    wait out of their upload budget for a fold that is held. The one being folded goes in
    whole, those still waiting never touch the sums (bit for bit those of the one add), and
    both budgets are all given back: the next round's pulls are not starved."""
    rec = Recorder()
    rec.hold.clear()
    size = 1000

    async def go() -> None:
        from scaleout.transport.budget import ByteBudget

        uploads, waiting = ByteBudget(size), ByteBudget((FOLD_BATCH + 1) * size)
        q = FoldQueue(asyncio.Lock(), rec.add_many, rec.on_update, lambda: True)

        async def pull(i: int) -> bool:
            async with uploads.hold(size) as give_back:
                return await q.fold_out_of_budget(rec.agg.check(_update(i)), 1.0 + i / 7, f"c{i}", size, give_back, waiting)

        pulls = [asyncio.ensure_future(pull(i)) for i in range(9)]
        for _ in range(1000):
            if len(q.waiting) == 8:
                break
            await asyncio.sleep(0)
        assert len(q.waiting) == 8 and waiting.used == 9 * size
        for p in pulls:
            p.cancel()
        rec.hold.set()  # the fold under way completes (a fold never stops half-way)
        await asyncio.gather(*pulls, return_exceptions=True)
        assert uploads.used == 0 and waiting.used == 0 and not q.waiting
        async with uploads.hold(size), waiting.hold(size):  # the next round's first pull goes at once
            pass

    asyncio.run(go())
    assert rec.batches == [["c0"]]
    _same(rec.agg, _reference([0]))
