from __future__ import annotations

import asyncio

import pytest

from scaleout.transport.budget import ByteBudget


def test_budget_admits_in_order_within_the_limit() -> None:
    async def go() -> None:
        budget = ByteBudget(100)
        order: list[str] = []
        gates = {k: asyncio.Event() for k in "abcd"}

        async def pull(name: str, size: int) -> None:
            async with budget.hold(size):
                order.append(name)
                assert budget.used <= 100 or budget.used == size
                await gates[name].wait()

        tasks = [asyncio.create_task(pull("a", 60)), asyncio.create_task(pull("b", 60)), asyncio.create_task(pull("c", 30))]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # b does not fit beside a; c would, but FIFO keeps it behind b.
        assert order == ["a"] and budget.waiting == 2
        gates["a"].set()
        await asyncio.wait_for(asyncio.gather(tasks[0]), 1)
        for _ in range(3):
            await asyncio.sleep(0)
        assert order == ["a", "b", "c"] and budget.used == 90
        big = asyncio.create_task(pull("d", 500))  # larger than the budget: admitted alone
        await asyncio.sleep(0)
        assert order == ["a", "b", "c"]
        gates["b"].set()
        gates["c"].set()
        await asyncio.wait_for(asyncio.gather(*tasks[1:]), 1)
        for _ in range(3):
            await asyncio.sleep(0)
        assert order[-1] == "d" and budget.used == 500
        gates["d"].set()
        await asyncio.wait_for(big, 1)
        assert budget.used == 0 and budget.waiting == 0

    asyncio.run(go())


def test_a_cancelled_waiter_gives_way() -> None:
    async def go() -> None:
        budget = ByteBudget(10)
        release = asyncio.Event()

        async def holder() -> None:
            async with budget.hold(10):
                await release.wait()

        async def waiter(size: int) -> None:
            async with budget.hold(size):
                pass

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        w1 = asyncio.create_task(waiter(10))
        w2 = asyncio.create_task(waiter(5))
        await asyncio.sleep(0)
        assert budget.waiting == 2
        w1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w1
        release.set()
        await asyncio.wait_for(asyncio.gather(h, w2), 1)
        assert budget.used == 0 and budget.waiting == 0

    asyncio.run(go())
