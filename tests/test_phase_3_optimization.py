"""Phase 3: retry optimisation (tenacity backoff, 429 counters) and parallel processing."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from polygon_backfill.clients import AdaptiveRateLimiter, PolygonClient, RateLimit
from polygon_backfill.errors import NotAuthorizedError, RateLimitedError
from polygon_backfill.models import Timeframe
from polygon_backfill.planner import SymbolWork
from polygon_backfill.sandbox import SandboxConfig, SandboxServer
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.storage import BarStore
from polygon_backfill.summary import TickerResult
from tests.support import FakeClock, RecordingSleep

BASE_URL = "https://api.test.polygon"
DAY = Timeframe.parse("1d")
START = datetime(2023, 1, 3, 5, tzinfo=UTC)
END = datetime(2023, 1, 5, 5, tzinfo=UTC)
AAPL_DAY_URL = f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2023-01-03/2023-01-04"


def _bar(t: int, price: float = 100.0) -> dict[str, float | int]:
    return {"o": price, "h": price + 1, "l": price - 1, "c": price, "v": 1000.0, "t": t}


def _ok(*bars: dict[str, float | int], next_url: str | None = None) -> httpx.Response:
    body: dict[str, object] = {"ticker": "AAPL", "status": "OK", "queryCount": len(bars),
                               "resultsCount": len(bars), "adjusted": True,
                               "results": list(bars)}
    if next_url:
        body["next_url"] = next_url
    return httpx.Response(200, json=body)


def _too_many(headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(429, headers=headers, json={
        "status": "ERROR", "error": "You've exceeded the maximum requests per minute"})


T = TypeVar("T")


class EventClock:
    """Event-ordered virtual time for whole-client runs: time moves only when every task is
    idle, straight to the earliest sleeper's target, so a server stand-in sees requests at
    the moments a real run would send them (FakeClock moves time as soon as any sleeper
    wakes, even while others are still on their way to the server)."""

    _IDLE_SPINS = 100

    def __init__(self) -> None:
        self._now = 0.0
        self._order = itertools.count()
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._now

    def now(self) -> datetime:
        return datetime(2026, 1, 5, 12, tzinfo=UTC)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._order), woken))
        await woken

    async def run(self, work: Awaitable[T]) -> T:
        """Await ``work``, stepping time whenever nothing else can run."""
        task = asyncio.ensure_future(work)
        while not task.done():
            for _ in range(self._IDLE_SPINS):
                await asyncio.sleep(0)
            if task.done() or not self._sleepers:
                continue
            self._now = max(self._now, self._sleepers[0][0])
            while self._sleepers and self._sleepers[0][0] <= self._now:
                heapq.heappop(self._sleepers)[2].set_result(None)
        return task.result()


class SlidingWindowServer:
    """A Polygon stand-in that enforces N accepted requests per P s on a fake clock, as the
    real API does, and answers 429 beyond that."""

    def __init__(self, limit: RateLimit, clock: EventClock) -> None:
        self._limit = limit
        self._clock = clock
        self.accepted: list[float] = []
        self.refused = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        now = self._clock.monotonic()
        recent = [t for t in self.accepted if t > now - self._limit.period_s]
        if len(recent) >= self._limit.requests:
            self.refused += 1
            return _too_many()
        self.accepted.append(now)
        return _ok(_bar(1672722000000))


async def _fetch_many(client: PolygonClient, clock: EventClock, count: int) -> list[int]:
    """``count`` concurrent single-page ranges; the number of bars each returned."""
    results = await clock.run(asyncio.gather(*(client.fetch_range("AAPL", DAY, START, END)
                                               for _ in range(count))))
    return [len(bars) for bars in results]


class TestPhase3RetryOptimization:
    """The client's tenacity policy: 5 attempts, waits 1, 2, 4, 8 s, 429s counted."""

    @pytest.fixture
    def sleep(self) -> RecordingSleep:
        return RecordingSleep()

    @pytest.fixture
    async def client(self, sleep: RecordingSleep) -> AsyncIterator[PolygonClient]:
        async with PolygonClient("test-key", BASE_URL, sleep=sleep) as polygon:
            yield polygon

    @respx.mock
    async def test_two_429s_then_success(self, client: PolygonClient,
                                         sleep: RecordingSleep) -> None:
        """Two 429s back off 1 s then 2 s, the third attempt's bars are returned."""
        respx.get(AAPL_DAY_URL).mock(side_effect=[
            _too_many(), _too_many(), _ok(_bar(1672722000000))])
        bars = await client.fetch_range("AAPL", DAY, START, END)
        assert [bar.t for bar in bars] == [1672722000000]
        assert sleep.waits == [1, 2]
        assert client.total_requests == 3
        assert client.rate_limited_count == 2

    @respx.mock
    async def test_five_429s_raise_rate_limited(self, client: PolygonClient,
                                                sleep: RecordingSleep) -> None:
        """Five 429s exhaust the 5 attempts after waits 1, 2, 4, 8 and raise RateLimitedError."""
        respx.get(AAPL_DAY_URL).mock(side_effect=[_too_many() for _ in range(5)])
        with pytest.raises(RateLimitedError) as caught:
            await client.fetch_range("AAPL", DAY, START, END)
        assert sleep.waits == [1, 2, 4, 8]
        assert client.total_requests == 5
        assert client.rate_limited_count == 5
        assert caught.value.ticker == "AAPL"
        assert caught.value.timeframe == "1d"
        assert "maximum requests per minute" in str(caught.value)

    @respx.mock
    async def test_retry_after_header_sets_the_wait(self, client: PolygonClient,
                                                    sleep: RecordingSleep) -> None:
        """A Retry-After: 7 header on a 429 makes that wait 7 s instead of 1 s."""
        respx.get(AAPL_DAY_URL).mock(side_effect=[
            _too_many({"Retry-After": "7"}), _ok(_bar(1672722000000))])
        await client.fetch_range("AAPL", DAY, START, END)
        assert sleep.waits == [7]

    @respx.mock
    async def test_not_authorized_is_not_retried(self, client: PolygonClient,
                                                 sleep: RecordingSleep) -> None:
        """A 403 NOT_AUTHORIZED raises NotAuthorizedError after exactly one request."""
        route = respx.get(AAPL_DAY_URL).mock(return_value=httpx.Response(403, json={
            "status": "NOT_AUTHORIZED", "message": "You are not entitled to this data."}))
        with pytest.raises(NotAuthorizedError, match="not entitled"):
            await client.fetch_range("AAPL", DAY, START, END)
        assert route.call_count == 1
        assert client.total_requests == 1
        assert sleep.waits == []

    @respx.mock
    async def test_server_error_is_retried(self, client: PolygonClient,
                                           sleep: RecordingSleep) -> None:
        """A 500 is retried after 1 s and the next 200 is used."""
        respx.get(AAPL_DAY_URL).mock(side_effect=[
            httpx.Response(500, text="Internal Server Error"), _ok(_bar(1672722000000))])
        bars = await client.fetch_range("AAPL", DAY, START, END)
        assert len(bars) == 1
        assert sleep.waits == [1]
        assert client.total_requests == 2
        assert client.rate_limited_count == 0

    @respx.mock
    async def test_truncated_json_is_retried_not_empty(self, client: PolygonClient,
                                                       sleep: RecordingSleep) -> None:
        """A truncated JSON body is retried, never taken as an empty answer."""
        respx.get(AAPL_DAY_URL).mock(side_effect=[
            httpx.Response(200, content=b'{"status":"OK","results":[{"o":1,'),
            _ok(_bar(1672722000000))])
        bars = await client.fetch_range("AAPL", DAY, START, END)
        assert [bar.t for bar in bars] == [1672722000000]
        assert sleep.waits == [1]

    @respx.mock
    async def test_429_on_page_two_resumes_from_page_two(self, client: PolygonClient,
                                                         sleep: RecordingSleep) -> None:
        """A 429 on page 2 of 3 retries page 2 only; page 1 is requested once."""
        start, end = datetime(2023, 7, 31, 8, tzinfo=UTC), datetime(2023, 7, 31, 9, tzinfo=UTC)
        t0 = 1690790400000
        page1 = respx.get(
            f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/minute/{t0}/{t0 + 3_599_999}").mock(
            return_value=_ok(_bar(t0), next_url=f"https://api.polygon.io/v2/aggs/ticker/AAPL/"
                             f"range/1/minute/{t0 + 60_000}/{t0 + 3_599_999}?cursor=p2"))
        page2 = respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/minute/{t0 + 60_000}/"
                          f"{t0 + 3_599_999}", params={"cursor": "p2"}).mock(side_effect=[
            _too_many(), _too_many(),
            _ok(_bar(t0 + 60_000), next_url=f"https://api.polygon.io/v2/aggs/ticker/AAPL/"
                f"range/1/minute/{t0 + 120_000}/{t0 + 3_599_999}?cursor=p3")])
        page3 = respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/minute/{t0 + 120_000}/"
                          f"{t0 + 3_599_999}", params={"cursor": "p3"}).mock(
            return_value=_ok(_bar(t0 + 120_000)))
        bars = await client.fetch_range("AAPL", Timeframe.parse("1m"), start, end)
        assert [bar.t for bar in bars] == [t0, t0 + 60_000, t0 + 120_000]
        assert (page1.call_count, page2.call_count, page3.call_count) == (1, 3, 1)
        assert sleep.waits == [1, 2]
        assert client.total_requests == 5
        assert client.rate_limited_count == 2


    @respx.mock
    async def test_a_correctly_limited_client_never_sees_a_429(self) -> None:
        """The free plan's 5/60 s on both sides: 12 concurrent ranges, zero 429s, in three
        windows of 60 s (+1% margin)."""
        clock = EventClock()
        server = SlidingWindowServer(RateLimit.parse("free"), clock)
        respx.get(AAPL_DAY_URL).mock(side_effect=server)
        limiter = AdaptiveRateLimiter(RateLimit.parse("free"), clock=clock)
        async with PolygonClient("test-key", BASE_URL, sleep=clock.sleep,
                                 rate_limiter=limiter) as client:
            assert await _fetch_many(client, clock, 12) == [1] * 12
        assert (client.rate_limited_count, server.refused) == (0, 0)
        assert client.total_requests == 12
        assert clock.monotonic() == pytest.approx(2 * 60.6)

    @respx.mock
    async def test_a_misconfigured_limiter_adapts(self) -> None:
        """Configured for 10/60 s against a 5/60 s server: the first 429 comes with 6 starts
        in the window, so the limiter settles at the 5/60 s the server proved it accepts,
        before the rest of the queue goes out. Every range completes after one 429."""
        clock = EventClock()
        server = SlidingWindowServer(RateLimit.parse("free"), clock)
        respx.get(AAPL_DAY_URL).mock(side_effect=server)
        limiter = AdaptiveRateLimiter(RateLimit.parse("10/60"), clock=clock)
        with capture_logs() as logs:
            async with PolygonClient("test-key", BASE_URL, sleep=clock.sleep,
                                     rate_limiter=limiter) as client:
                assert await _fetch_many(client, clock, 20) == [1] * 20
        changes = [(entry["event"], entry["requests"]) for entry in logs
                   if entry["event"].startswith("polygon.rate_")
                   and entry["event"] != "polygon.rate_limited"]
        assert client.rate_limited_count == server.refused == 1
        assert changes == [("polygon.rate_reduced", 5)]


async def _synthetic_sandbox(now: datetime) -> SandboxServer:
    server = SandboxServer(SandboxConfig(synthetic=True, now=lambda: now))
    await server.start()
    return server


class _FailingTickerTransport(httpx.AsyncBaseTransport):
    """Answers 500 for one ticker every time and forwards everything else for real."""

    def __init__(self, ticker: str) -> None:
        self._ticker = ticker
        self._real = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if f"/ticker/{self._ticker}/" in request.url.path:
            return httpx.Response(500, json={"status": "ERROR",
                                             "error": "Internal server error for this one"})
        return await self._real.handle_async_request(request)

    async def aclose(self) -> None:
        await self._real.aclose()


class TestPhase3ParallelProcessing:
    """Groups, stagger, pause, sequential mode, isolation and the run's summary."""

    TICKERS: ClassVar[list[str]] = ["AAPL", "MSFT", "GOOGL", "X:BTCUSD", "SPY", "QQQ", "NVDA"]
    NOW = datetime(2026, 1, 9, 23, 0, tzinfo=UTC)

    async def _run(self, store: BarStore, *, transport: httpx.AsyncBaseTransport | None = None,
                   **options: Any) -> tuple[dict[str, Any], dict[str, float], FakeClock]:
        clock = FakeClock(self.NOW)
        server = await _synthetic_sandbox(self.NOW)
        try:
            settings = {"tickers": self.TICKERS, "timeframes": ["1d"], "backfill_days": 10,
                        "polygon_base_url": server.base_url, "backfill_mode": "groups",
                        # Per-ticker requests only: the sandbox serves grouped daily for its
                        # CSV tickers, not for synthetic ones.
                        "grouped_daily_max_sessions": 0} | options
            client = PolygonClient("test-key", server.base_url, transport=transport,
                                   sleep=clock.sleep)
            scheduler = AutoBackfillScheduler(polygon_api_key="test-key", store=store,
                                              clock=clock, polygon_client=client, **settings)
            starts: dict[str, float] = {}
            original = scheduler._backfill_symbol

            async def recording(work: SymbolWork) -> TickerResult:
                starts[work.ticker] = clock.monotonic()
                return await original(work)

            scheduler._backfill_symbol = recording  # type: ignore[method-assign]
            summary = await scheduler.run_once()
            await client.aclose()
        finally:
            await server.stop()
        return summary, starts, clock

    async def test_groups_of_three_start_staggered_with_a_pause_between_groups(
            self, bar_store: BarStore) -> None:
        """Starts at 0/5/10 s inside a group; the next group 10 s after the previous ends."""
        with capture_logs() as logs:
            summary, starts, _ = await self._run(bar_store)
        assert starts == {"AAPL": 0, "MSFT": 5, "GOOGL": 10, "X:BTCUSD": 20, "SPY": 25,
                          "QQQ": 30, "NVDA": 40}
        groups = [entry["message"] for entry in logs
                  if entry["event"] == "scheduler.group_started"]
        assert groups == ["Processing symbol group 1/3: ['AAPL', 'MSFT', 'GOOGL']",
                          "Processing symbol group 2/3: ['X:BTCUSD', 'SPY', 'QQQ']",
                          "Processing symbol group 3/3: ['NVDA']"]
        assert summary["tickers_ok"] == self.TICKERS

    async def test_stagger_pause_and_group_size_are_configurable(
            self, bar_store: BarStore) -> None:
        """max_concurrent_symbols, stagger_seconds and group_pause_seconds shape the starts."""
        _, starts, _ = await self._run(bar_store, max_concurrent_symbols=4,
                                       stagger_seconds=2, group_pause_seconds=3)
        assert starts == {"AAPL": 0, "MSFT": 2, "GOOGL": 4, "X:BTCUSD": 6, "SPY": 9,
                          "QQQ": 11, "NVDA": 13}

    async def test_sequential_mode_runs_one_ticker_after_another_without_waits(
            self, bar_store: BarStore) -> None:
        """parallel_backfill=False: config order, no stagger, no pause, no group lines."""
        with capture_logs() as logs:
            summary, starts, clock = await self._run(bar_store, parallel_backfill=False)
        assert list(starts) == self.TICKERS
        assert set(starts.values()) == {0}
        assert clock.sleeps == []
        assert not [entry for entry in logs if entry["event"] == "scheduler.group_started"]
        assert summary["tickers_ok"] == self.TICKERS

    async def test_one_failing_ticker_does_not_stop_the_others(
            self, bar_store: BarStore) -> None:
        """MSFT's 500s exhaust its retries and are reported with the server's words; every
        other ticker is written."""
        summary, _, _ = await self._run(bar_store, transport=_FailingTickerTransport("MSFT"))
        assert list(summary["tickers_failed"]) == ["MSFT"]
        assert "Internal server error for this one" in summary["tickers_failed"]["MSFT"]
        assert summary["tickers_ok"] == [t for t in self.TICKERS if t != "MSFT"]
        statuses = {row.ticker: row for row in await bar_store.status()}
        assert statuses["MSFT"].bars == 0
        assert statuses["MSFT"].last_error is not None
        assert all(statuses[t].bars > 0 for t in summary["tickers_ok"])

    async def test_summary_counts_match_the_table_and_a_rerun_writes_nothing(
            self, bar_store: BarStore) -> None:
        """bars written equal the rows stored; a second run adds none and asks once per pair
        (and checks the splits of each stored stock ticker once)."""
        first, _, _ = await self._run(bar_store)
        stored = sum(row.bars for row in await bar_store.status())
        # From 2025-12-30 (10 days before Friday 2026-01-09 23:00 UTC) to now: stocks trade
        # Dec 30, 31, Jan 2 and Jan 5-9 (Jan 1 is a holiday), crypto all 11 days.
        assert stored == 6 * 8 + 11
        assert first["bars_written"] == first["bars_inserted"] == stored
        assert first["requests"] == len(self.TICKERS)
        assert first["rate_limited"] == 0
        assert first["total_seconds"] == 40
        second, _, _ = await self._run(bar_store)
        assert second["bars_written"] == 0
        stocks = [ticker for ticker in self.TICKERS if ":" not in ticker]
        assert second["requests"] == len(self.TICKERS) + len(stocks)
        assert sum(row.bars for row in await bar_store.status()) == stored
