"""The bad-input catalogue: each fault injected by the sandbox, through real HTTP and real
PostgreSQL. After every survivable fault the table equals what a fault-free API serves."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from polygon_backfill.models import Timeframe, datetime_to_ms, ms_to_datetime
from polygon_backfill.planner import align_start
from polygon_backfill.sandbox import FaultKind, FaultRule, SandboxConfig, SandboxServer
from polygon_backfill.sandbox.synthetic import SyntheticSource
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.storage import BarStore, EmbeddedPostgres
from tests.support import FakeClock, before_each_write

NOW = datetime(2026, 1, 9, 23, 0, tzinfo=UTC)
DAY = Timeframe.parse("1d")
# 60 days of daily bars in pages of 10 base aggregates: several pages per ticker.
OPTIONS: dict[str, Any] = {"timeframes": ["1d"], "backfill_days": 60, "page_limit": 10,
                           "backfill_mode": "groups",
                           "stagger_seconds": 0, "group_pause_seconds": 0,
                           "trailing_window_days": 0, "http_timeout_seconds": 0.5}


async def expected_rows(ticker: str, timeframe: Timeframe = DAY,
                        days: int = OPTIONS["backfill_days"]) -> list[tuple[Any, ...]]:
    """The sandbox's own synthetic bars for the backfill window, read from its generator,
    not through our client: a client bug cannot hide on both sides of the comparison."""
    start = align_start(ticker, timeframe, NOW - timedelta(days=days))
    source = SyntheticSource(date(2000, 1, 1))
    bars = source.select(ticker, timeframe.multiplier, timeframe.timespan,
                         datetime_to_ms(start), datetime_to_ms(NOW) - 1, False)
    return [(ms_to_datetime(bar["t"]), float(bar["o"]), float(bar["h"]), float(bar["l"]),
             float(bar["c"]), None if bar.get("v") is None else float(bar["v"]))
            for bar, _ in bars]


async def table(store: BarStore, ticker: str, timeframe: Timeframe = DAY) -> list[tuple[Any, ...]]:
    return [(b.bar_time, b.open, b.high, b.low, b.close, b.volume)
            for b in await store.fetch_bars(ticker, timeframe)]


async def backfill(store: BarStore, faults: Sequence[FaultRule],
                   tickers: Sequence[str] = ("AAPL",), **options: Any
                   ) -> tuple[dict[str, Any], SandboxServer, FakeClock]:
    """One pass against a sandbox injecting ``faults``; returns the summary and the server."""
    clock = FakeClock(NOW)
    config = SandboxConfig(now=lambda: NOW, faults=list(faults), fault_seed=7)
    async with SandboxServer(config) as server:
        scheduler = AutoBackfillScheduler(
            polygon_api_key="test-key", store=store, clock=clock,
            polygon_base_url=server.base_url, tickers=list(tickers), **(OPTIONS | options))
        try:
            summary = await scheduler.run_once()
        finally:
            await scheduler.polygon_client.aclose()
    return summary, server, clock


@pytest.mark.parametrize("kind", [
    FaultKind.TRUNCATED_JSON, FaultKind.BAD_GATEWAY_HTML, FaultKind.STATUS_ERROR,
    FaultKind.MALFORMED, FaultKind.SERVER_ERROR, FaultKind.UNAVAILABLE,
    FaultKind.CONNECTION_RESET, FaultKind.TIMEOUT, FaultKind.NULL_RESULTS,
])
async def test_transient_faults_are_retried_and_the_table_is_exact(
        bar_store: BarStore, kind: FaultKind) -> None:
    """Two bad answers in a row on the second page: retried, never taken as 'no data'."""
    summary, server, _ = await backfill(bar_store, [FaultRule(kind, after=1, times=2)])
    assert server.faults_injected[kind.value] == 2
    assert summary["tickers_ok"] == ["AAPL"]
    assert await table(bar_store, "AAPL") == await expected_rows("AAPL")


@pytest.mark.parametrize("kind", [
    FaultKind.DUPLICATES, FaultKind.OUT_OF_RANGE, FaultKind.INVALID_BARS,
    FaultKind.EXTRA_FIELDS, FaultKind.FOREIGN_NEXT_URL, FaultKind.FULL_PAGE_NO_NEXT,
])
async def test_odd_but_well_formed_pages_leave_the_exact_table(
        bar_store: BarStore, kind: FaultKind) -> None:
    """Duplicates (last wins), stray and invalid bars (dropped), unknown fields (ignored),
    a foreign next_url (re-pointed), a full page without next_url (continued)."""
    summary, server, _ = await backfill(bar_store, [FaultRule(kind)])
    assert server.faults_injected[kind.value] >= 1
    assert summary["tickers_ok"] == ["AAPL"]
    assert await table(bar_store, "AAPL") == await expected_rows("AAPL")
    assert all(record.path.startswith("/v2/aggs/ticker/AAPL/") for record in server.requests)
    if kind is FaultKind.INVALID_BARS:
        assert summary["bars_rejected"] == 3 * server.faults_injected[kind.value]


async def test_a_looping_next_url_fails_that_pair_only_and_records_no_false_coverage(
        bar_store: BarStore) -> None:
    """A next_url naming the page just fetched is refused; MSFT is unaffected."""
    summary, server, _ = await backfill(
        bar_store, [FaultRule(FaultKind.NEXT_URL_LOOP, ticker="AAPL")], tickers=["AAPL", "MSFT"])
    assert "does not advance" in summary["tickers_failed"]["AAPL"]
    assert summary["tickers_ok"] == ["MSFT"]
    assert len([r for r in server.requests if "/AAPL/" in r.path]) == 1
    assert await table(bar_store, "MSFT") == await expected_rows("MSFT")
    assert await table(bar_store, "AAPL") == []
    assert await bar_store.coverage("AAPL", DAY) == []


async def test_retry_after_is_honoured_and_counted(bar_store: BarStore) -> None:
    """429 with Retry-After: 7 waits 7 s (on the injected clock), counts, and recovers."""
    with capture_logs() as logs:
        summary, _, clock = await backfill(
            bar_store, [FaultRule(FaultKind.RATE_LIMIT, times=1, retry_after_s=7)])
    assert summary["rate_limited"] == 1
    assert 7 in clock.sleeps
    assert any("Rate limited" in entry.get("message", "") for entry in logs)
    assert await table(bar_store, "AAPL") == await expected_rows("AAPL")


async def test_rejected_key_stops_at_once_without_a_retry_storm(bar_store: BarStore) -> None:
    """401: one request per ticker already started at most, no retries, the run stops."""
    from polygon_backfill.errors import AuthenticationError

    with pytest.raises(AuthenticationError):
        await backfill(bar_store, [FaultRule(FaultKind.UNAUTHORIZED)],
                       tickers=["AAPL", "MSFT", "SPY", "NVDA"], max_concurrent_symbols=1)


@pytest.mark.parametrize("kind", [FaultKind.NOT_AUTHORIZED, FaultKind.UNKNOWN_TICKER])
async def test_a_pair_outside_the_plan_or_unknown_is_skipped_with_one_warning(
        bar_store: BarStore, kind: FaultKind) -> None:
    """403 / 404 for one ticker: one warning, that pair skipped, the others written."""
    with capture_logs() as logs:
        summary, server, _ = await backfill(
            bar_store, [FaultRule(kind, ticker="MSFT")], tickers=["AAPL", "MSFT"])
    assert summary["tickers_ok"] == ["AAPL", "MSFT"]
    assert list(summary["pairs_skipped"]) == ["MSFT 1d"]
    assert len([r for r in server.requests if "/MSFT/" in r.path]) == 1
    skipped = [entry for entry in logs if entry["event"] == "backfill.pair_skipped"]
    assert len(skipped) == 1
    assert await table(bar_store, "AAPL") == await expected_rows("AAPL")


class _RestartingClock(FakeClock):
    """Virtual time that brings PostgreSQL back during the first backoff wait (>= 1 s)."""

    def __init__(self, server: EmbeddedPostgres) -> None:
        super().__init__(NOW)
        self.server = server
        self.down = False

    async def sleep(self, seconds: float) -> None:
        if self.down and seconds >= 1:
            await asyncio.to_thread(self.server.start)
            self.down = False
        await super().sleep(seconds)


async def test_postgres_restarted_midway_loses_nothing(tmp_path: Path) -> None:
    """PostgreSQL stops after the second page: the page in hand is written after the
    restart, coverage never runs ahead of committed bars, and the table ends exact."""
    server = EmbeddedPostgres(tmp_path / "pg")
    store = await BarStore.connect(await asyncio.to_thread(server.start))
    clock = _RestartingClock(server)

    async def stop_server_before_third(count: int) -> None:
        if count == 3:
            await asyncio.to_thread(server.stop)
            clock.down = True

    try:
        with before_each_write(store, stop_server_before_third):
            async with SandboxServer(SandboxConfig(now=lambda: NOW)) as api:
                scheduler = AutoBackfillScheduler(
                    polygon_api_key="test-key", store=store, clock=clock,
                    polygon_base_url=api.base_url, tickers=["AAPL"], **OPTIONS)
                with capture_logs() as logs:
                    summary = await scheduler.run_once()
                await scheduler.polygon_client.aclose()
        assert summary["tickers_ok"] == ["AAPL"]
        assert [entry["event"] for entry in logs].count("storage.retrying") >= 1
        assert await table(store, "AAPL") == await expected_rows("AAPL")
    finally:
        await store.close()
        await asyncio.to_thread(server.stop)


async def test_a_second_daemon_waits_for_the_backfill_lock(bar_store: BarStore) -> None:
    """While another process holds the lock, a pass logs that it waits and does not start."""
    with capture_logs() as logs:
        async with bar_store.backfill_lock(on_wait=lambda: None):
            waiting = asyncio.ensure_future(backfill(bar_store, []))
            for _ in range(50):
                await asyncio.sleep(0.01)
                if any(entry["event"] == "backfill.lock_wait" for entry in logs):
                    break
            assert not waiting.done()
            assert await bar_store.fetch_bars("AAPL", DAY) == []
        summary, _, _ = await waiting
    assert summary["tickers_ok"] == ["AAPL"]
    assert any(entry["event"] == "backfill.lock_wait" for entry in logs)


async def test_a_range_that_exhausted_its_retries_resumes_from_the_last_page_next_run(
        bar_store: BarStore) -> None:
    """Page 3 fails five times: pages 1-2 stay written, the ticker is reported failed, and
    the next run asks only for pages 3 onwards and ends with the exact table."""
    first, _, _ = await backfill(bar_store, [FaultRule(FaultKind.SERVER_ERROR, after=2, times=5)])
    assert list(first["tickers_failed"]) == ["AAPL"]
    assert first["bars_written"] == 20
    second, server, _ = await backfill(bar_store, [])
    assert second["tickers_ok"] == ["AAPL"]
    aggregates = [r for r in server.requests if r.path.startswith("/v2/aggs/")]
    assert second["requests"] == len(server.requests) == len(aggregates) + 1  # + split check
    assert len(aggregates) == 3
    assert await table(bar_store, "AAPL") == await expected_rows("AAPL")


async def test_the_circuit_opens_on_an_outage_then_recovers_and_status_shows_it(
        bar_store: BarStore) -> None:
    """Five 500s in a row open the circuit: MSFT's first calls are refused without reaching
    the API, then after the cool-down one probe closes it again. The state and the last
    error are recorded for `status`."""
    with capture_logs() as logs:
        summary, server, _ = await backfill(
            bar_store, [FaultRule(FaultKind.SERVER_ERROR, ticker="AAPL")],
            tickers=["AAPL", "MSFT"], parallel_backfill=False, circuit_cooldown_seconds=10)
    changes = [entry["event"] for entry in logs if entry["event"].startswith("polygon.circuit")]
    assert changes == ["polygon.circuit_open", "polygon.circuit_half_open",
                       "polygon.circuit_closed"]
    assert list(summary["tickers_failed"]) == ["AAPL"]
    assert summary["tickers_ok"] == ["MSFT"]
    assert len([r for r in server.requests if "/AAPL/" in r.path]) == 5
    assert await table(bar_store, "MSFT") == await expected_rows("MSFT")
    [state] = await bar_store.service_states()
    assert (state.name, state.state) == ("circuit", "closed")
    assert state.detail is not None
    assert "Internal server error" in state.detail


async def test_a_very_large_page_is_stored_whole(bar_store: BarStore) -> None:
    """40 days of crypto minutes: a first page of 50,000 bars, then the rest, exactly."""
    summary, server, _ = await backfill(
        bar_store, [], tickers=["X:BTCUSD"], timeframes=["1m"], backfill_days=40,
        page_limit=50_000, http_timeout_seconds=60)
    assert summary["tickers_ok"] == ["X:BTCUSD"]
    assert server.requests[0].results == 50_000
    minute = Timeframe.parse("1m")
    stored = await table(bar_store, "X:BTCUSD", minute)
    assert len(stored) == 40 * 1440
    assert stored == await expected_rows("X:BTCUSD", minute, days=40)
