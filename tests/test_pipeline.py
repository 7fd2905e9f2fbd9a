"""The pipeline's guarantees with a fake fetch and write: what it keeps alive, a
cancelled pass that ends at once, and a writer that outlives a failing report."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

from polygon_backfill.clients import Page
from polygon_backfill.models import Timeframe, TimeRange
from polygon_backfill.pipeline import PipelinedBackfill
from polygon_backfill.planner import SymbolWork, estimated_page_bars
from polygon_backfill.storage import WriteResult
from polygon_backfill.summary import FinishPair, PairOutcome, PassHooks, TickerResult
from tests.support import FakeClock


class _Prepared:
    """Stands in for a ReadyPage; weakly referenced to see who still holds it."""

    def __init__(self, covered: TimeRange) -> None:
        self.covered, self.rejected = covered, 0


WriteFake = Callable[[str, Timeframe, _Prepared], Awaitable[WriteResult]]
FetchFake = Callable[[str, Timeframe, datetime, datetime], AsyncIterator[Page]]
BTC, DAILY, ORIGIN = "X:BTCUSD", Timeframe.parse("1d"), datetime(2026, 1, 1, tzinfo=UTC)
ONE_WRITTEN = WriteResult(inserted=1, updated=0, unchanged=0, rejected_duplicates=0)


async def _one_page_each(ticker: str, timeframe: Timeframe, start: datetime,
                         end: datetime) -> AsyncIterator[Page]:
    yield Page([], TimeRange(start, end), 0)


async def _nothing_to_record(ticker: str, timeframe: Timeframe, outcome: PairOutcome) -> None:
    return None


def _run_tracked(spans: list[TimeRange], *, write: WriteFake, fetch: FetchFake = _one_page_each,
                 finish_pair: FinishPair = _nothing_to_record, tickers: Sequence[str] = (BTC,),
                 max_in_flight: int = 4, max_bars_in_flight: int = 100_000,
                 page_limit: int = 50_000) -> tuple[asyncio.Future[dict[str, TickerResult]],
                                                    weakref.WeakSet[_Prepared], list[str]]:
    """Start a one-writer pass over the daily ``spans`` of each ticker; return it, the pages
    alive and the failures it reports."""
    alive: weakref.WeakSet[_Prepared] = weakref.WeakSet()
    failures: list[str] = []

    def prepare(ticker: str, timeframe: Timeframe, page: Page) -> _Prepared:
        prepared = _Prepared(page.covered)
        alive.add(prepared)
        return prepared

    def note_failure(ticker: str, timeframe: Timeframe, outcome: PairOutcome,
                     error: Exception) -> None:
        outcome.ok, outcome.error = False, str(error)
        failures.append(str(error))

    backfill = PipelinedBackfill(
        fetch=fetch, prepare=prepare,  # type: ignore[arg-type]
        hooks=PassHooks(write=write, note_failure=note_failure,  # type: ignore[arg-type]
                        finish_pair=finish_pair, stop=asyncio.Event(), clock=FakeClock()),
        max_in_flight=max_in_flight, max_bars_in_flight=max_bars_in_flight, queued_pages=1,
        group_size=3, page_limit=page_limit, writers=1)
    plan = [SymbolWork(ticker, [(DAILY, span) for span in spans]) for ticker in tickers]
    run = asyncio.ensure_future(backfill.run(plan))
    return run, alive, failures


def _ten_day_spans(count: int) -> list[TimeRange]:
    return [TimeRange(ORIGIN + timedelta(days=20 * i), ORIGIN + timedelta(days=20 * i + 10))
            for i in range(count)]


async def test_a_queued_page_is_not_held_by_its_fetcher_past_the_budget() -> None:
    """Once written, a page is gone, though the fetcher that queued it has moved on: kept
    by its fetcher, it used to pile up, one per fetcher, outside every bound (+20% peak
    memory at 300 days)."""
    spans = _ten_day_spans(8)
    gate, stuck = asyncio.Event(), asyncio.Event()
    written: list[TimeRange] = []

    async def write(ticker: str, timeframe: Timeframe, page: _Prepared) -> WriteResult:
        if len(written) == 4:  # the fifth page's write is stuck
            stuck.set()
            await gate.wait()
        written.append(page.covered)
        return ONE_WRITTEN

    async with asyncio.timeout(5):
        # A budget of one piece: a fetcher waits for it, after queueing its last page.
        run, alive, _ = _run_tracked(spans, write=write, max_bars_in_flight=estimated_page_bars(
            BTC, DAILY, spans[0], 50_000))
        await stuck.wait()
        gc.collect()
        still_alive = sorted((prepared.covered for prepared in alive), key=lambda s: s.start)
        gate.set()
        assert still_alive == spans[4:6]  # the writer's, and the one waiting for the queue
        results = await run
    assert written == spans
    assert results[BTC].pairs[0].pages == 8
    gc.collect()
    assert len(alive) == 0


async def test_the_writer_lets_go_of_its_last_page_while_it_waits_for_the_next() -> None:
    """A range in two requests: the writer, done with the second page, waits for the third
    holding nothing."""
    span = TimeRange(ORIGIN, ORIGIN + timedelta(days=30))
    more, second_written = asyncio.Event(), asyncio.Event()
    written: list[TimeRange] = []

    async def fetch(ticker: str, timeframe: Timeframe, start: datetime,
                    end: datetime) -> AsyncIterator[Page]:
        yield Page([], TimeRange(start, start + timedelta(days=10)), 0)
        if start != ORIGIN:  # the rest of the range, split off after the first page
            await more.wait()
            yield Page([], TimeRange(start + timedelta(days=10), end), 0)

    async def write(ticker: str, timeframe: Timeframe, page: _Prepared) -> WriteResult:
        written.append(page.covered)
        if len(written) == 2:
            second_written.set()  # the writer goes on, in this step, to wait for the next
        return ONE_WRITTEN

    async with asyncio.timeout(5):
        run, alive, _ = _run_tracked([span], write=write, fetch=fetch, max_in_flight=1,
                                     page_limit=10)
        await second_written.wait()
        gc.collect()
        still_alive = len(alive)
        more.set()
        assert still_alive == 0
        results = await run
    assert [page.start.day for page in written] == [1, 11, 21]
    assert results[BTC].pairs[0].pages == 3


async def test_failed_writes_keep_their_first_cause_but_none_of_their_pages() -> None:
    """A pair whose writes fail reports the first error once; while the pass goes on, the
    traceback it keeps no longer holds the page it failed on (one per failing pair, held
    through a database outage until the pass ends)."""
    spans = _ten_day_spans(8)
    alive_at_last_write: list[int] = []

    async def write(ticker: str, timeframe: Timeframe, page: _Prepared) -> WriteResult:
        if page.covered == spans[-1]:
            gc.collect()
            alive_at_last_write.append(len(alive))
            return ONE_WRITTEN
        raise RuntimeError(f"disk full writing {page.covered.start:%m-%d}")

    async with asyncio.timeout(5):
        run, alive, failures = _run_tracked(spans, write=write)
        results = await run
    assert alive_at_last_write == [1]  # the page being written, no failed one
    assert failures == ["disk full writing 01-01"]
    outcome = results[BTC].pairs[0]
    assert (outcome.ok, outcome.pages, outcome.error) == (False, 1, "disk full writing 01-01")


@pytest.mark.parametrize("ranges", [8, 1], ids=["fetchers-waiting", "fetchers-done"])
async def test_a_cancelled_pass_ends_at_once_though_its_writer_is_stuck(ranges: int) -> None:
    """The daemon cancels a pass still running at its shutdown timeout, typically with a
    write hung on the database: the pass must end, taking its tasks with it, whether its
    fetchers still wait for the queue or are all done."""
    stuck, never = asyncio.Event(), asyncio.Event()

    async def write(ticker: str, timeframe: Timeframe, page: _Prepared) -> WriteResult:
        stuck.set()
        await never.wait()
        return ONE_WRITTEN

    tasks_before = asyncio.all_tasks()
    run, _, _ = _run_tracked(_ten_day_spans(ranges), write=write)
    async with asyncio.timeout(5):
        await stuck.wait()
    for _ in range(20):  # let the pass settle where it waits: on the queue, or for the writer
        await asyncio.sleep(0)
    run.cancel()
    await asyncio.wait([run], timeout=5)  # without the fix: still waiting on the writer
    assert run.cancelled()
    assert asyncio.all_tasks() == tasks_before  # no fetcher or writer left behind


async def test_a_pair_whose_report_fails_is_logged_and_the_others_go_on() -> None:
    """Recording one pair's result raising must not kill its writer: the fetchers of every
    other pair would wait on its full queue for ever."""
    written: list[str] = []

    async def write(ticker: str, timeframe: Timeframe, page: _Prepared) -> WriteResult:
        written.append(ticker)
        return ONE_WRITTEN

    async def finish_pair(ticker: str, timeframe: Timeframe, outcome: PairOutcome) -> None:
        if ticker == BTC:
            raise RuntimeError("progress display broke")

    with capture_logs() as logs:
        async with asyncio.timeout(5):
            run, _, _ = _run_tracked(_ten_day_spans(4), write=write, finish_pair=finish_pair,
                                     tickers=(BTC, "X:ETHUSD"), max_in_flight=1)
            results = await run
    assert written == [BTC] * 4 + ["X:ETHUSD"] * 4
    assert results["X:ETHUSD"].pairs[0].pages == 4
    errors = [entry["message"] for entry in logs if entry["event"] == "pipeline.writer_error"]
    assert errors == ["Reporting a page or a pair failed: RuntimeError: progress display broke"]
