"""The pipeline's memory bound: requests hold their estimated bars from a shared budget."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from polygon_backfill.clients import Page
from polygon_backfill.models import Timeframe, TimeRange
from polygon_backfill.pipeline import BarBudget, PipelinedBackfill
from polygon_backfill.planner import SymbolWork, estimated_page_bars
from polygon_backfill.storage import WriteResult
from polygon_backfill.summary import PairOutcome, PassHooks
from tests.support import FakeClock


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


class _Prepared:
    """Stands in for a ReadyPage; weakly referenced to see who still holds it."""

    def __init__(self, covered: TimeRange) -> None:
        self.covered, self.rejected = covered, 0


async def test_a_queued_page_is_not_held_by_its_fetcher_past_the_budget() -> None:
    """Once written, a page is gone, though the fetcher that queued it has moved on: kept
    by its fetcher, it used to pile up, one per fetcher, outside every bound (a third of
    the peak memory at 300 days)."""
    timeframe = Timeframe.parse("1d")
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    spans = [TimeRange(origin + timedelta(days=20 * i), origin + timedelta(days=20 * i + 10))
             for i in range(8)]
    alive: weakref.WeakSet[_Prepared] = weakref.WeakSet()
    gate, writing = asyncio.Event(), asyncio.Event()
    written: list[TimeRange] = []

    async def fetch(ticker: str, timeframe: Timeframe, start: datetime,
                    end: datetime) -> AsyncIterator[Page]:
        yield Page([], TimeRange(start, end), 0)

    def prepare(ticker: str, timeframe: Timeframe, page: Page) -> _Prepared:
        prepared = _Prepared(page.covered)
        alive.add(prepared)
        return prepared

    async def write(ticker: str, timeframe: Timeframe, page: _Prepared) -> WriteResult:
        if len(written) == 4:  # the fifth page's write is stuck
            writing.set()
            await gate.wait()
        written.append(page.covered)
        return WriteResult(inserted=1, updated=0, unchanged=0, rejected_duplicates=0)

    async def finish_pair(ticker: str, timeframe: Timeframe, outcome: PairOutcome) -> None:
        return None

    one_piece = estimated_page_bars("X:BTCUSD", timeframe, spans[0], 50_000)
    backfill = PipelinedBackfill(
        fetch=fetch, prepare=prepare,  # type: ignore[arg-type]
        hooks=PassHooks(write=write, note_failure=lambda *_: None,  # type: ignore[arg-type]
                        finish_pair=finish_pair, stop=asyncio.Event(), clock=FakeClock()),
        max_in_flight=4, max_bars_in_flight=one_piece, queued_pages=1, group_size=3,
        page_limit=50_000, writers=1)
    run = asyncio.ensure_future(backfill.run(
        [SymbolWork("X:BTCUSD", [(timeframe, span) for span in spans])]))
    async with asyncio.timeout(5):
        await writing.wait()
    for _ in range(50):  # every fetcher as far as it can go while the writer is stuck
        await asyncio.sleep(0)
    gc.collect()
    still_alive = sorted((prepared.covered for prepared in alive), key=lambda span: span.start)
    gate.set()
    assert still_alive == spans[4:6]  # the writer's, and the one waiting for the queue
    results = await run
    assert written == spans
    assert results["X:BTCUSD"].pairs[0].pages == 8
    gc.collect()
    assert len(alive) == 0
