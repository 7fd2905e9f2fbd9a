"""The pipeline's memory bound: requests hold their estimated bars from a shared budget."""

from __future__ import annotations

import asyncio

from polygon_backfill.pipeline import BarBudget


async def test_requests_wait_while_the_budget_is_spent_and_go_when_it_frees() -> None:
    budget = BarBudget(100)
    held: list[str] = []
    release = {name: asyncio.Event() for name in ("a", "b", "c")}

    async def request(name: str, bars: int) -> None:
        async with budget.hold(bars):
            held.append(name)
            await release[name].wait()

    tasks = [asyncio.ensure_future(request("a", 60)), asyncio.ensure_future(request("b", 40)),
             asyncio.ensure_future(request("c", 30))]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert held == ["a", "b"]  # 60 + 40 fill the budget; c (30) waits
    release["b"].set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert held == ["a", "b", "c"]  # b's 40 freed: 60 + 30 fit
    release["a"].set()
    release["c"].set()
    await asyncio.gather(*tasks)


async def test_a_request_bigger_than_the_budget_goes_alone() -> None:
    budget = BarBudget(100)
    order: list[str] = []
    small_done = asyncio.Event()

    async def small() -> None:
        async with budget.hold(10):
            order.append("small in")
            await small_done.wait()
        order.append("small out")

    async def huge() -> None:
        async with budget.hold(1_000_000):
            order.append("huge in")

    first = asyncio.ensure_future(small())
    await asyncio.sleep(0)
    second = asyncio.ensure_future(huge())
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == ["small in"]  # waits for the budget to be empty, not forever
    small_done.set()
    await asyncio.gather(first, second)
    assert order == ["small in", "small out", "huge in"]


async def test_waiters_are_served_in_order_and_a_cancelled_one_leaks_nothing() -> None:
    budget = BarBudget(100)
    order: list[str] = []
    gate = asyncio.Event()

    async def request(name: str, bars: int) -> None:
        async with budget.hold(bars):
            order.append(name)
            await gate.wait()

    first = asyncio.ensure_future(request("first", 90))
    await asyncio.sleep(0)
    big = asyncio.ensure_future(request("big", 80))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(request("small", 5))  # would fit, but big came first
    await asyncio.sleep(0)
    assert order == ["first"]
    big.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == ["first", "small"]  # big left the queue; small no longer waits behind it
    gate.set()
    await asyncio.gather(first, small)
    assert big.cancelled()
    async with budget.hold(100):  # everything was given back
        order.append("all")
    assert order[-1] == "all"
