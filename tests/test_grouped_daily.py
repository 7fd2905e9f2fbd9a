"""Grouped daily: the nightly update of many stocks by date instead of ticker by ticker.

The plan step (``grouped.plan_grouped_daily``), the client's ``fetch_grouped_daily`` (its
retries and pitfall 4), the runner's fallback rules, and the nightly scenarios end to end:
the real CSV data served by the sandbox, real PostgreSQL, the table compared to the CSV.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from polygon_backfill.clients import Page, PolygonClient
from polygon_backfill.config import Settings
from polygon_backfill.errors import (
    AuthenticationError,
    MalformedResponseError,
    StorageError,
    SuspectEmptyError,
)
from polygon_backfill.grouped import (
    DAILY,
    GroupedDailyBackfill,
    merge_results,
    plan_grouped_daily,
)
from polygon_backfill.models import (
    NEW_YORK,
    Bar,
    Timeframe,
    TimeRange,
    datetime_to_ms,
    ms_to_datetime,
    session_start,
)
from polygon_backfill.planner import SymbolWork, session_pieces
from polygon_backfill.sandbox import FaultKind, FaultRule, SandboxConfig, SandboxServer
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.storage import BarStore, WriteResult
from polygon_backfill.summary import PairOutcome, PassHooks, TickerResult
from tests.support import FIXTURES, REAL_DATA, FakeClock, RecordingSleep

GROUPED = "/v2/aggs/grouped/locale/us/market/stocks/"
HOUR = Timeframe.parse("1h")
CSV = {"AAPL": "AAPL.day.csv", "SPY": "SPY.day.csv"}

needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(),
                                     reason="../shared/data/real is absent")


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def ny_midnight(day: date) -> datetime:
    return session_start("AAPL", day)


def work(ticker: str, *ranges: tuple[Timeframe, TimeRange]) -> SymbolWork:
    return SymbolWork(ticker, tuple(ranges))


# --------------------------------------------------------------------------------------
# The plan step
# --------------------------------------------------------------------------------------

# Thursday 2017-12-21 00:00 NY to Friday 18:00 NY: the nightly update's range (two sessions).
NIGHTLY = TimeRange(ny_midnight(date(2017, 12, 21)), utc(2017, 12, 22, 23))
FRIDAY_NIGHT = utc(2017, 12, 22, 23)


def test_session_pieces_cover_the_range_exactly_one_piece_per_session() -> None:
    """Weekend days ride with the session before them (or the first one): the pieces tile
    the range, so recording each piece with its bar leaves no hole and no overlap."""
    span = TimeRange(ny_midnight(date(2017, 12, 23)), utc(2017, 12, 27, 23))  # Sat..Wed
    pieces = session_pieces("AAPL", span)
    assert [day for day, _ in pieces] == [date(2017, 12, 26), date(2017, 12, 27)]  # 25: holiday
    assert pieces[0][1] == TimeRange(span.start, ny_midnight(date(2017, 12, 27)))
    assert pieces[1][1] == TimeRange(ny_midnight(date(2017, 12, 27)), span.end)
    assert session_pieces("AAPL", TimeRange(ny_midnight(date(2017, 12, 23)),
                                            ny_midnight(date(2017, 12, 25)))) == []


def test_grouped_when_dates_are_fewer_than_per_ticker_requests() -> None:
    """Three tickers missing the same two sessions: two grouped requests instead of three;
    the 1h ranges and the crypto ticker stay per-ticker, in their order."""
    plan = [work("AAPL", (HOUR, NIGHTLY), (DAILY, NIGHTLY)), work("SPY", (DAILY, NIGHTLY)),
            work("MSFT", (DAILY, NIGHTLY)), work("X:BTCUSD", (DAILY, NIGHTLY))]
    grouped, left = plan_grouped_daily(plan, now=FRIDAY_NIGHT, max_sessions=5,
                                       page_limit=50_000)
    assert grouped is not None
    assert grouped.dates == (date(2017, 12, 21), date(2017, 12, 22))
    assert [item.ticker for item in grouped.slices] == ["AAPL", "SPY", "MSFT"]
    assert grouped.replaced_requests == 3
    assert left == [work("AAPL", (HOUR, NIGHTLY)), work("SPY"), work("MSFT"),
                    work("X:BTCUSD", (DAILY, NIGHTLY))]


def test_per_ticker_when_dates_are_not_fewer() -> None:
    """Two tickers, two sessions: D == T, so the grouped endpoint would save nothing."""
    plan = [work("AAPL", (DAILY, NIGHTLY)), work("SPY", (DAILY, NIGHTLY))]
    grouped, left = plan_grouped_daily(plan, now=FRIDAY_NIGHT, max_sessions=5,
                                       page_limit=50_000)
    assert grouped is None
    assert left == plan


@pytest.mark.parametrize(("max_sessions", "now", "why"), [
    (0, FRIDAY_NIGHT, "disabled"),
    (1, FRIDAY_NIGHT, "two sessions is more than one"),
    (5, utc(2017, 12, 22, 20), "Friday's session (16:00 New York) has not closed yet"),
])
def test_ranges_that_stay_per_ticker(max_sessions: int, now: datetime, why: str) -> None:
    plan = [work(ticker, (DAILY, NIGHTLY)) for ticker in ("AAPL", "SPY", "MSFT", "QQQ")]
    grouped, left = plan_grouped_daily(plan, now=now, max_sessions=max_sessions,
                                       page_limit=50_000)
    assert grouped is None, why
    assert left == plan


def test_long_ranges_stay_per_ticker_while_short_ones_go_grouped() -> None:
    """A ticker added to the list (a month to backfill) does not stop the others' update."""
    month = TimeRange(ny_midnight(date(2017, 11, 20)), FRIDAY_NIGHT)
    plan = [work("NEW", (DAILY, month))] + [work(t, (DAILY, NIGHTLY)) for t in ("A", "B", "C")]
    grouped, left = plan_grouped_daily(plan, now=FRIDAY_NIGHT, max_sessions=5,
                                       page_limit=50_000)
    assert grouped is not None
    assert [item.ticker for item in grouped.slices] == ["A", "B", "C"]
    assert left[0] == work("NEW", (DAILY, month))


def test_setting_defaults_to_five_sessions_and_zero_disables() -> None:
    assert Settings().grouped_daily_max_sessions == 5
    assert Settings(_env_file=None, grouped_daily_max_sessions=0).grouped_daily_max_sessions == 0


# --------------------------------------------------------------------------------------
# The client: one request per date, the same retries, pitfall 4
# --------------------------------------------------------------------------------------


def grouped_body(day: date, bars: dict[str, float], **top: Any) -> dict[str, Any]:
    close = datetime(day.year, day.month, day.day, 16, tzinfo=NEW_YORK)
    results = [{"T": ticker, "o": price, "h": price + 1, "l": price - 1, "c": price,
                "v": 1000, "vw": price, "n": 10, "t": datetime_to_ms(close)}
               for ticker, price in bars.items()]
    return {"status": "OK", "queryCount": len(results), "resultsCount": len(results),
            "adjusted": True, "results": results, **top}


def mock_client(answers: list[httpx.Response], seen: list[httpx.Request],
                sleep: RecordingSleep | None = None, **options: Any) -> PolygonClient:
    queue = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return PolygonClient("sk-KEY", "https://api.test", transport=httpx.MockTransport(handler),
                         sleep=sleep or RecordingSleep(), **options)


async def test_client_fetches_one_date_keyed_by_ticker() -> None:
    seen: list[httpx.Request] = []
    day = date(2017, 12, 22)
    async with mock_client([httpx.Response(200, json=grouped_body(day, {"AAPL": 175.0,
                                                                        "BRK.B": 200.0}))],
                           seen, adjusted=False) as client:
        bars = await client.fetch_grouped_daily(day)
        assert client.total_requests == 1
    assert set(bars) == {"AAPL", "BRK.B"}
    assert bars["AAPL"].close == 175.0
    assert bars["AAPL"].t == datetime_to_ms(datetime(2017, 12, 22, 16, tzinfo=NEW_YORK))
    assert seen[0].url.path == f"{GROUPED}2017-12-22"
    assert seen[0].url.params["adjusted"] == "false"
    assert seen[0].headers["Authorization"] == "Bearer sk-KEY"


async def test_client_reads_the_recorded_grouped_answer() -> None:
    """The real recorded body: bars keyed by ``T``, ``t`` as sent (here a 16:00 New York
    stamp of another session than the URL's date; the runner refuses such a bar)."""
    body = json.loads((FIXTURES / "grouped_us_stocks_2005-04-04.json").read_text())
    seen: list[httpx.Request] = []
    async with mock_client([httpx.Response(200, json=body)], seen) as client:
        bars = await client.fetch_grouped_daily(date(2005, 4, 4))
    assert bars == {"GIK": Bar(1602705600000, 9.99, 10.02, 9.9, 10.02, 895345.0, 9.9979, 96)}


async def test_null_results_on_a_session_are_retried_then_refused() -> None:
    """Pitfall 4 as for aggregates: ``results: null`` for a closed session is asked again
    and, when every attempt says so, raised, never returned as "no bars"."""
    day = date(2017, 12, 22)
    null = httpx.Response(200, json={"status": "OK", "resultsCount": 0, "results": None})
    seen: list[httpx.Request] = []
    sleep = RecordingSleep()
    async with mock_client([null] * 3, seen, sleep, max_attempts=3) as client:
        with pytest.raises(SuspectEmptyError, match="grouped daily 2017-12-22"):
            await client.fetch_grouped_daily(day)
    assert len(seen) == 3
    assert sleep.waits == [1, 2]
    seen.clear()
    fine = httpx.Response(200, json=grouped_body(day, {"AAPL": 1.0}))
    async with mock_client([null, fine], seen) as client:
        assert set(await client.fetch_grouped_daily(day)) == {"AAPL"}
    assert len(seen) == 2


async def test_null_results_on_a_weekend_are_believed_and_missing_results_too() -> None:
    seen: list[httpx.Request] = []
    null = httpx.Response(200, json={"status": "OK", "results": None})
    missing = httpx.Response(200, json={"status": "OK", "resultsCount": 0})
    async with mock_client([null, missing], seen) as client:
        assert await client.fetch_grouped_daily(date(2017, 12, 23)) == {}  # Saturday
        assert await client.fetch_grouped_daily(date(2017, 12, 22)) == {}
    assert len(seen) == 2


async def test_rate_limits_and_bad_bodies_go_through_the_usual_retries() -> None:
    day = date(2017, 12, 22)
    seen: list[httpx.Request] = []
    limited = httpx.Response(429, json={"status": "ERROR", "error": "You've exceeded the "
                                        "maximum requests per minute"},
                             headers={"Retry-After": "7"})
    sleep = RecordingSleep()
    with capture_logs() as logs:
        async with mock_client([limited, httpx.Response(200, text='{"status": "OK", "res'),
                                httpx.Response(200, json=grouped_body(day, {"AAPL": 1.0}))],
                               seen, sleep) as client:
            assert set(await client.fetch_grouped_daily(day)) == {"AAPL"}
            assert (client.total_requests, client.rate_limited_count) == (3, 1)
    assert sleep.waits == [7, 2]
    assert any("Rate limited on grouped daily 2017-12-22" in entry["message"]
               for entry in logs)
    bad = httpx.Response(200, json={"status": "OK", "results": [{"T": "AAPL", "o": 1}]})
    async with mock_client([bad] * 2, seen, max_attempts=2) as client:
        with pytest.raises(MalformedResponseError, match="malformed grouped daily answer"):
            await client.fetch_grouped_daily(day)


# --------------------------------------------------------------------------------------
# The runner: what a grouped answer may and may not vouch for (no database)
# --------------------------------------------------------------------------------------


class Recorder:
    """Stands in for the scheduler's callbacks."""

    def __init__(self, answers: dict[date, dict[str, Bar] | Exception]) -> None:
        self.answers = answers
        self.asked: list[date] = []
        self.pages: list[tuple[str, Page]] = []
        self.finished: list[str] = []
        self.failures: list[str] = []
        self.fail_writes_for: set[str] = set()

    async def fetch(self, day: date) -> dict[str, Bar]:
        self.asked.append(day)
        answer = self.answers[day]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def write(self, ticker: str, timeframe: Timeframe, page: Page) -> WriteResult:
        if ticker in self.fail_writes_for:
            raise StorageError("disk full")
        self.pages.append((ticker, page))
        return WriteResult(len(page.bars), 0, 0, 0)

    def note_failure(self, ticker: str, timeframe: Timeframe, outcome: PairOutcome,
                     exc: Exception) -> None:
        outcome.ok, outcome.error = False, str(exc)
        self.failures.append(ticker)

    async def finish(self, ticker: str, timeframe: Timeframe, outcome: PairOutcome) -> None:
        self.finished.append(ticker)

    def runner(self) -> GroupedDailyBackfill:
        hooks = PassHooks(write=self.write, note_failure=self.note_failure,
                          finish_pair=self.finish, stop=asyncio.Event(), clock=FakeClock())
        return GroupedDailyBackfill(fetch=self.fetch, hooks=hooks, max_in_flight=4)


def close_bar(day: date, price: float = 10.0) -> Bar:
    close = datetime(day.year, day.month, day.day, 16, tzinfo=NEW_YORK)
    return Bar(datetime_to_ms(close), price, price, price, price, 100.0)


THU, FRI = date(2017, 12, 21), date(2017, 12, 22)
THU_PIECE = TimeRange(ny_midnight(THU), ny_midnight(FRI))
FRI_PIECE = TimeRange(ny_midnight(FRI), FRIDAY_NIGHT)


async def test_runner_falls_back_for_whatever_the_answers_cannot_vouch_for() -> None:
    """A ticker absent on a date, a bar stamped for another session, a date whose request
    failed: each goes back to the per-ticker plan; nothing is recorded for it here."""
    tickers = ["AAPL", "SPY", "HALTED", "ODD"]
    plan = [work(ticker, (DAILY, NIGHTLY)) for ticker in tickers]
    grouped, left = plan_grouped_daily(plan, now=FRIDAY_NIGHT, max_sessions=5,
                                       page_limit=50_000)
    assert grouped is not None
    recorder = Recorder({
        THU: {"AAPL": close_bar(THU), "SPY": close_bar(THU), "ODD": close_bar(FRI)},
        FRI: {"AAPL": close_bar(FRI), "SPY": close_bar(FRI), "ODD": close_bar(FRI)},
    })
    with capture_logs() as logs:
        final, results = await recorder.runner().run(grouped, left)
    assert sorted(recorder.asked) == [THU, FRI]
    written = {ticker: page for ticker, page in recorder.pages}
    assert set(written) == {"AAPL", "SPY", "ODD"}
    assert written["AAPL"].covered == NIGHTLY  # two sessions, one page, one transaction
    assert [bar.t for bar in written["AAPL"].bars] == [close_bar(THU).t, close_bar(FRI).t]
    assert written["ODD"].covered == FRI_PIECE  # Thursday's answer held Friday's bar
    assert final == [work("HALTED", (DAILY, NIGHTLY)), work("ODD", (DAILY, THU_PIECE))]
    assert sorted(recorder.finished) == ["AAPL", "SPY"]  # the rest finish per ticker
    assert results["AAPL"].pairs[0].inserted == 2
    (line,) = [entry for entry in logs if entry["event"] == "backfill.grouped_daily"]
    assert line["dates"] == ["2017-12-21", "2017-12-22"]
    assert line["tickers"] == ["AAPL", "ODD", "SPY"]
    assert line["per_ticker_fallback"] == ["HALTED", "ODD"]


async def test_runner_failed_date_and_failed_write() -> None:
    plan = [work(ticker, (DAILY, NIGHTLY)) for ticker in ("AAPL", "SPY", "QQQ")]
    grouped, left = plan_grouped_daily(plan, now=FRIDAY_NIGHT, max_sessions=5,
                                       page_limit=50_000)
    assert grouped is not None
    recorder = Recorder({THU: SuspectEmptyError("results: null"),
                         FRI: {ticker: close_bar(FRI) for ticker in ("AAPL", "SPY", "QQQ")}})
    recorder.fail_writes_for = {"QQQ"}
    final, results = await recorder.runner().run(grouped, left)
    assert sorted((ticker, page.covered) for ticker, page in recorder.pages) == [
        ("AAPL", FRI_PIECE), ("SPY", FRI_PIECE)]
    assert final == [work(ticker, (DAILY, THU_PIECE)) for ticker in ("AAPL", "SPY", "QQQ")]
    assert recorder.failures == ["QQQ"]
    assert not results["QQQ"].ok


async def test_runner_stops_the_run_on_a_refused_key() -> None:
    plan = [work(ticker, (DAILY, NIGHTLY)) for ticker in ("AAPL", "SPY", "QQQ")]
    grouped, left = plan_grouped_daily(plan, now=FRIDAY_NIGHT, max_sessions=5,
                                       page_limit=50_000)
    assert grouped is not None
    recorder = Recorder({THU: AuthenticationError("request refused"), FRI: {}})
    with pytest.raises(AuthenticationError):
        await recorder.runner().run(grouped, left)
    assert recorder.pages == []


def test_merge_results_counts_a_pair_served_both_ways_once() -> None:
    grouped = {"AAPL": TickerResult("AAPL", [PairOutcome("AAPL", "1d", ranges=1, pages=1,
                                                         inserted=2)], 0.5)}
    later = {"AAPL": TickerResult("AAPL", [PairOutcome("AAPL", "1h", inserted=7),
                                           PairOutcome("AAPL", "1d", ranges=1, pages=1,
                                                       updated=1)], 0.25),
             "SPY": TickerResult("SPY", [PairOutcome("SPY", "1d", inserted=1)])}
    merged = merge_results(grouped, later)
    assert [pair.timeframe for pair in merged["AAPL"].pairs] == ["1d", "1h"]
    daily = merged["AAPL"].pairs[0]
    assert (daily.ranges, daily.pages, daily.inserted, daily.updated) == (2, 2, 2, 1)
    assert merged["AAPL"].db_seconds == 0.75
    assert merged["SPY"] is later["SPY"]


# --------------------------------------------------------------------------------------
# End to end: the real CSV data, the sandbox, real PostgreSQL
# --------------------------------------------------------------------------------------


class Now:
    """The sandbox's "now", moved between runs like the nights passing."""

    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


@pytest.fixture
async def now_and_sandbox() -> AsyncIterator[tuple[Now, SandboxServer]]:
    now = Now(utc(2017, 12, 20, 23))
    async with SandboxServer(SandboxConfig(data_dir=REAL_DATA, synthetic=False,
                                           now=now)) as server:
        yield now, server


async def run(store: BarStore, server: SandboxServer, now: Now, tickers: list[str],
              *, wrap_grouped: Callable[[Any], Any] | None = None,
              **options: Any) -> tuple[dict[str, Any], list[str]]:
    """One pass at ``now``; returns its summary and the paths it asked for."""
    before = len(server.requests)
    # Split checks (a request per stored stock ticker each run) have their own tests.
    settings = {"tickers": tickers, "timeframes": ["1d"], "backfill_start": "2017-11-01",
                "trailing_window_days": 3, "check_splits": False} | options
    scheduler = AutoBackfillScheduler(polygon_api_key="test-key", store=store,
                                      polygon_base_url=server.base_url,
                                      clock=FakeClock(now.moment), **settings)
    if wrap_grouped is not None:
        scheduler.polygon_client.fetch_grouped_daily = wrap_grouped(  # type: ignore[method-assign]
            scheduler.polygon_client.fetch_grouped_daily)
    try:
        summary = await scheduler.run_once()
    finally:
        await scheduler.polygon_client.aclose()
    return summary, [record.path for record in server.requests[before:]]


def read_csv(name: str) -> list[tuple[Any, ...]]:
    """The CSV rows as (time, o, h, l, c, v)."""
    with (REAL_DATA / name).open(newline="") as handle:
        return [(ms_to_datetime(int(row["t"])), float(row["o"]), float(row["h"]),
                 float(row["l"]), float(row["c"]), float(row["v"]))
                for row in csv.DictReader(handle)]


async def table_rows(store: BarStore, ticker: str) -> list[tuple[Any, ...]]:
    bars = await store.fetch_bars(ticker, DAILY)
    return [(bar.bar_time, bar.open, bar.high, bar.low, bar.close, bar.volume) for bar in bars]


async def assert_table_equals_csv(store: BarStore, until: datetime) -> None:
    """Every CSV row up to ``until`` (bar_time is New York midnight, as in the CSV) and
    nothing else; one row per session."""
    start = ny_midnight(date(2017, 11, 1))
    for ticker, name in CSV.items():
        expected = [row for row in read_csv(name) if start <= row[0] < until]
        assert await table_rows(store, ticker) == expected, ticker
    assert await store.duplicate_keys() == 0


def aggs(ticker: str) -> str:
    return f"/v2/aggs/ticker/{ticker}/range/1/day/"


@needs_real_data
async def test_after_a_long_weekend_one_grouped_request_updates_both_tickers(
        bar_store: BarStore, now_and_sandbox: tuple[Now, SandboxServer]) -> None:
    """Saturday's run fetched through Friday; Tuesday night (Monday is Christmas) both need
    only Tuesday's session: D=1 < T=2, so one grouped request and no per-ticker one. Then a
    per-ticker re-fetch of the same days lands on the same rows and changes nothing."""
    now, server = now_and_sandbox
    now.moment = utc(2017, 12, 23, 17)
    first, paths = await run(bar_store, server, now, ["AAPL", "SPY"])
    assert first["tickers_failed"] == {}
    assert sorted(path.rsplit("/", 2)[0] for path in paths) == [
        "/v2/aggs/ticker/AAPL/range/1/day", "/v2/aggs/ticker/SPY/range/1/day"]

    now.moment = utc(2017, 12, 26, 23)
    with capture_logs() as logs:
        second, paths = await run(bar_store, server, now, ["AAPL", "SPY"])
    assert paths == [f"{GROUPED}2017-12-26"]
    assert (second["requests"], second["bars_inserted"], second["bars_updated"]) == (1, 2, 0)
    assert sorted(second["tickers_ok"]) == ["AAPL", "SPY"]
    (line,) = [entry for entry in logs if entry["event"] == "backfill.grouped_daily"]
    assert (line["dates"], line["tickers"]) == (["2017-12-26"], ["AAPL", "SPY"])
    await assert_table_equals_csv(bar_store, utc(2017, 12, 27))
    statuses = {row.ticker: row for row in await bar_store.status()}
    assert statuses["AAPL"].last_result == "ok"

    # The same days per ticker: the 00:00 New York bars meet the 16:00 ones' rows.
    third, paths = await run(bar_store, server, now, ["AAPL", "SPY"],
                             grouped_daily_max_sessions=0)
    assert sorted(path.rsplit("/", 2)[0] for path in paths) == [
        "/v2/aggs/ticker/AAPL/range/1/day", "/v2/aggs/ticker/SPY/range/1/day"]
    assert third["bars_written"] == 0
    await assert_table_equals_csv(bar_store, utc(2017, 12, 27))


@needs_real_data
async def test_two_new_sessions_for_two_tickers_stay_per_ticker(
        bar_store: BarStore, now_and_sandbox: tuple[Now, SandboxServer]) -> None:
    """Wednesday night to Friday night: the trailing window from Tuesday, then Thursday and
    Friday, for two tickers: D=4 >= T=2, so one request per ticker as before."""
    now, server = now_and_sandbox
    await run(bar_store, server, now, ["AAPL", "SPY"])
    now.moment = FRIDAY_NIGHT
    summary, paths = await run(bar_store, server, now, ["AAPL", "SPY"])
    assert not any(path.startswith(GROUPED) for path in paths)
    assert sorted(paths) == [f"{aggs('AAPL')}2017-12-19/2017-12-22",
                             f"{aggs('SPY')}2017-12-19/2017-12-22"]
    assert summary["bars_inserted"] == 4
    await assert_table_equals_csv(bar_store, utc(2017, 12, 23))


@needs_real_data
async def test_a_ticker_missing_from_the_grouped_answer_is_asked_on_its_own(
        bar_store: BarStore, now_and_sandbox: tuple[Now, SandboxServer]) -> None:
    """The nightly update of three stocks (Thursday and Friday: D=2 < T=3). MSFT is not in
    the sandbox's data at all (as a delisted ticker), and SPY is cut out of the answers
    (as a halted one): both get their own request; AAPL comes from the grouped answers."""
    now, server = now_and_sandbox
    now.moment = utc(2017, 12, 21, 23)
    await run(bar_store, server, now, ["AAPL", "SPY", "MSFT"])
    now.moment = FRIDAY_NIGHT

    def without_spy(fetch: Any) -> Any:
        async def fetch_grouped_daily(day: date) -> dict[str, Bar]:
            bars = await fetch(day)
            bars.pop("SPY", None)
            return dict(bars)
        return fetch_grouped_daily

    summary, paths = await run(bar_store, server, now, ["AAPL", "SPY", "MSFT"],
                               trailing_window_days=0, wrap_grouped=without_spy)
    assert sorted(paths) == [f"{GROUPED}2017-12-21", f"{GROUPED}2017-12-22",
                             f"{aggs('MSFT')}2017-12-21/2017-12-22",
                             f"{aggs('SPY')}2017-12-21/2017-12-22"]
    assert summary["requests"] == 4
    assert summary["tickers_failed"] == {}
    assert (summary["bars_inserted"], summary["bars_updated"]) == (2, 0)  # Friday x2
    await assert_table_equals_csv(bar_store, utc(2017, 12, 23))
    assert await table_rows(bar_store, "MSFT") == []
    # MSFT's empty range was recorded by its own request, not on the grouped answer's word.
    assert await bar_store.coverage("MSFT", DAILY) == [
        TimeRange(ny_midnight(date(2017, 11, 1)), FRIDAY_NIGHT)]


@needs_real_data
async def test_null_grouped_answers_are_retried_then_left_to_per_ticker_requests(
        bar_store: BarStore, now_and_sandbox: tuple[Now, SandboxServer]) -> None:
    """Pitfall 4 on the grouped endpoint: two null answers are asked again; when every
    attempt is null the date is fetched ticker by ticker, and the table is still exact."""
    now, server = now_and_sandbox
    now.moment = utc(2017, 12, 23, 17)
    await run(bar_store, server, now, ["AAPL", "SPY"])
    now.moment = utc(2017, 12, 26, 23)
    for times, expected in ((2, [f"{GROUPED}2017-12-26"] * 3),
                            (5, [f"{GROUPED}2017-12-26"] * 5
                             # Saturday to Christmas hold no session: not asked for.
                             + [f"{aggs('AAPL')}2017-12-26/2017-12-26",
                                f"{aggs('SPY')}2017-12-26/2017-12-26"])):
        config = SandboxConfig(data_dir=REAL_DATA, synthetic=False, now=now,
                               faults=[FaultRule(FaultKind.NULL_RESULTS, times=times)])
        async with SandboxServer(config) as faulty:
            summary, paths = await run(bar_store, faulty, now, ["AAPL", "SPY"])
        assert sorted(paths) == sorted(expected)
        assert summary["tickers_failed"] == {}
        await assert_table_equals_csv(bar_store, utc(2017, 12, 27))
