"""Exact coverage, end to end: holes found and filled, outages and an earlier start filled,
corrections and splits reflected, no request for a day without a session, the report.

Real HTTP through the sandbox, real PostgreSQL; virtual time (the sandbox's "now" and the
daemon's clock move together, so data "moves on" while the daemon is stopped).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from PIL import Image

from polygon_backfill.audit import coverage_grid, find_gaps, verify_sample
from polygon_backfill.config import Settings
from polygon_backfill.coverage import DayState
from polygon_backfill.models import NEW_YORK, Timeframe, canonical_bar_time, ms_to_datetime
from polygon_backfill.planner import align_start
from polygon_backfill.report import write_report
from polygon_backfill.sandbox import SandboxConfig, SandboxServer
from polygon_backfill.scheduler import AutoBackfillScheduler, client_for
from polygon_backfill.sessions import session_dates
from polygon_backfill.storage import BarStore
from tests.support import REAL_DATA, FakeClock

needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(),
                                     reason="../shared/data/real is absent")


class World:
    """A sandbox and a daemon clock sharing one virtual "now"."""

    def __init__(self, start: datetime, **sandbox: Any) -> None:
        self.clock = FakeClock(start)
        self.server = SandboxServer(SandboxConfig(now=self.clock.now, **sandbox))

    def advance(self, delta: timedelta) -> None:
        self.clock._now_s += delta.total_seconds()

    def settings(self, **options: Any) -> Settings:
        options.setdefault("stagger_seconds", 0)
        options.setdefault("group_pause_seconds", 0)
        options.setdefault("grouped_daily_max_sessions", 0)
        return Settings(polygon_api_key="test-key", polygon_base_url=self.server.base_url,
                        **options)

    async def run(self, store: BarStore, **options: Any) -> dict[str, Any]:
        scheduler = AutoBackfillScheduler(settings=self.settings(**options), store=store,
                                          clock=self.clock)
        try:
            return await scheduler.run_once()
        finally:
            await scheduler.polygon_client.aclose()


@pytest.fixture
async def real_world() -> AsyncIterator[World]:
    """The real CSV data with "now" the Monday after its last AAPL session (2018-01-19)."""
    world = World(datetime(2018, 1, 22, 3, 0, tzinfo=UTC), data_dir=REAL_DATA, synthetic=False)
    async with world.server:
        yield world


@pytest.fixture
async def synthetic_world() -> AsyncIterator[World]:
    """Synthetic bars; "now" is Friday 2025-08-29 21:00 New York, after the close."""
    world = World(datetime(2025, 8, 29, 21, 0, tzinfo=NEW_YORK).astimezone(UTC))
    async with world.server:
        yield world


async def execute(database_url: str, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.execute(sql, *args)
    finally:
        await conn.close()


async def hole_runs(store: BarStore, settings: Settings,
                    now: datetime) -> dict[tuple[str, str], list[tuple[date, date, int]]]:
    return {(pair.ticker, pair.timeframe): pair.runs
            for pair in await find_gaps(store, settings, now)}


async def assert_table_matches_api(store: BarStore, settings: Settings, now: datetime) -> None:
    """Every configured pair's stored bars equal what the API serves for the whole window."""
    async with client_for(settings, FakeClock(now)) as client:
        for ticker in settings.tickers:
            for timeframe in settings.timeframes:
                start = align_start(ticker, timeframe, settings.backfill_start_for(ticker, now))
                fetched = await client.fetch_range(ticker, timeframe, start, now)
                api = [(canonical_bar_time(ticker, timeframe, bar.t), bar.open, bar.high,
                        bar.low, bar.close, bar.volume) for bar in fetched]
                stored = [(bar.bar_time, bar.open, bar.high, bar.low, bar.close, bar.volume)
                          for bar in await store.fetch_bars(ticker, timeframe, start, now)]
                assert stored == api, f"{ticker} {timeframe}"
                assert api, f"{ticker} {timeframe}: the API served nothing to compare"


# -- the real data set ---------------------------------------------------------------------

REAL_OPTIONS: dict[str, Any] = {"tickers": "AAPL,SPY", "timeframes": "1d",
                                "backfill_start": "2004-01-01"}


@needs_real_data
async def test_full_run_leaves_no_hole_and_punched_holes_are_listed_then_filled(
        bar_store: BarStore, database_url: str, real_world: World) -> None:
    summary = await real_world.run(bar_store, **REAL_OPTIONS)
    assert summary["tickers_failed"] == {}
    settings = real_world.settings(**REAL_OPTIONS)
    now = real_world.clock.now()
    gaps = await hole_runs(bar_store, settings, now)
    assert gaps == {("AAPL", "1d"): [], ("SPY", "1d"): []}
    before = await bar_store.fetch_bars("AAPL", Timeframe.parse("1d"))

    # Punch: AAPL Mon 2010-03-01 .. Mon 2010-03-08 (six sessions across a weekend), SPY on
    # the day before and after the 2015 Independence Day holiday (two one-session holes).
    await execute(database_url, "DELETE FROM bars WHERE ticker = 'AAPL' AND "
                  "session_date BETWEEN '2010-03-01' AND '2010-03-08'")
    await execute(database_url, "DELETE FROM bars WHERE ticker = 'SPY' AND "
                  "session_date IN ('2015-07-02', '2015-07-06')")
    gaps = await hole_runs(bar_store, settings, now)
    assert gaps[("AAPL", "1d")] == [(date(2010, 3, 1), date(2010, 3, 8), 6)]
    # July 3 2015 (a Friday) was the observed holiday: the two holes follow one another.
    assert gaps[("SPY", "1d")] == [(date(2015, 7, 2), date(2015, 7, 6), 2)]

    requests_before = len(real_world.server.requests)
    again = await real_world.run(bar_store, **REAL_OPTIONS)
    assert again["bars_inserted"] == 6 + 2
    assert await hole_runs(bar_store, settings, now) == {("AAPL", "1d"): [], ("SPY", "1d"): []}
    assert await bar_store.fetch_bars("AAPL", Timeframe.parse("1d")) == before
    asked = [record.path for record in real_world.server.requests[requests_before:]]
    # Both holes fit in one request with the trailing window: asked as one range.
    assert [path for path in asked if "/range/" in path] == [
        "/v2/aggs/ticker/AAPL/range/1/day/2010-03-01/2018-01-21",
        "/v2/aggs/ticker/SPY/range/1/day/2015-07-02/2018-01-21"]


@needs_real_data
async def test_report_of_the_real_data_set(bar_store: BarStore, real_world: World,
                                           tmp_path: Any) -> None:
    await real_world.run(bar_store, **REAL_OPTIONS)
    settings = real_world.settings(**REAL_OPTIONS)
    grid = await coverage_grid(bar_store, settings, real_world.clock.now())
    assert [row.label for row in grid.rows] == ["AAPL 1d", "SPY 1d"]
    day = {d: i for i, d in enumerate(grid.days)}
    aapl = grid.rows[0].states
    assert aapl[day[date(2010, 3, 1)]] is DayState.COMPLETE     # a Monday session
    assert aapl[day[date(2010, 3, 6)]] is DayState.NO_SESSION   # a Saturday
    assert aapl[day[date(2012, 10, 29)]] is DayState.NO_SESSION  # Hurricane Sandy closure
    assert DayState.MISSING not in aapl
    assert DayState.PARTIAL not in aapl
    png, html = write_report(grid, tmp_path)
    with Image.open(png) as image:
        assert image.width > 200
        assert image.height > 40
    text = html.read_text()
    assert "AAPL 1d" in text
    assert "http://" not in text
    assert "https://" not in text


@needs_real_data
async def test_correction_inside_the_trailing_window_is_applied_and_counted(
        bar_store: BarStore, real_world: World) -> None:
    options = {"tickers": "AAPL", "timeframes": "1d", "backfill_start": "2017-11-01",
               "trailing_window_days": 5}
    await real_world.run(bar_store, **options)
    last = (await bar_store.fetch_bars("AAPL", Timeframe.parse("1d")))[-1]
    assert last.bar_time.astimezone(NEW_YORK).date() == date(2018, 1, 19)
    t = int(last.bar_time.timestamp() * 1000)
    real_world.server.override_bar("AAPL", "day", t, c=last.close + 1.25)
    summary = await real_world.run(bar_store, **options)
    assert summary["bars_updated"] == 1
    assert summary["bars_inserted"] == 0
    corrected = (await bar_store.fetch_bars("AAPL", Timeframe.parse("1d")))[-1]
    assert corrected.close == last.close + 1.25
    assert corrected.open == last.open


@needs_real_data
async def test_verify_reports_every_changed_value(bar_store: BarStore,
                                                  real_world: World) -> None:
    options = {"tickers": "AAPL", "timeframes": "1d", "backfill_start": "2017-12-01"}
    await real_world.run(bar_store, **options)
    settings = real_world.settings(**options)
    now = real_world.clock.now()
    async with client_for(settings, FakeClock(now)) as client:
        clean = await verify_sample(bar_store, client, settings, now, 100, random.Random(1))
        assert clean.mismatches == []
        assert len(clean.sessions) == len(session_dates(
            "AAPL", date(2017, 12, 1), date(2018, 1, 21)))
        bar = (await bar_store.fetch_bars("AAPL", Timeframe.parse("1d")))[3]
        real_world.server.override_bar("AAPL", "day", int(bar.bar_time.timestamp() * 1000),
                                       h=bar.high + 2, v=(bar.volume or 0) + 100)
        found = await verify_sample(bar_store, client, settings, now, 100, random.Random(1))
    assert [(m.bar_time, m.field, m.stored, m.api) for m in found.mismatches] == [
        (bar.bar_time, "high", bar.high, bar.high + 2),
        (bar.bar_time, "volume", bar.volume, (bar.volume or 0) + 100)]


# -- synthetic data, time moving on ----------------------------------------------------------

SYNTHETIC_OPTIONS: dict[str, Any] = {"tickers": "AAPL,X:BTCUSD", "timeframes": "1h,1d",
                                     "backfill_days": 20}


async def test_outage_is_filled_on_restart_and_an_earlier_start_backwards(
        bar_store: BarStore, synthetic_world: World) -> None:
    world = synthetic_world
    await world.run(bar_store, **SYNTHETIC_OPTIONS)
    first_now = world.clock.now()

    # The daemon is stopped for 9 days (5 NYSE sessions including Labor Day's absence).
    world.advance(timedelta(days=9))
    now = world.clock.now()
    settings = world.settings(**SYNTHETIC_OPTIONS)
    gaps = await hole_runs(bar_store, settings, now)
    # Sessions after the stop: Tue 2 Sep .. Mon 8 Sep (Labor Day is no session).
    assert gaps[("AAPL", "1d")] == [(date(2025, 9, 2), date(2025, 9, 5), 4)]
    # Crypto: the UTC day in progress at the stop was stored (and is re-fetched by the
    # trailing window); every whole day after it is missing.
    assert gaps[("X:BTCUSD", "1d")] == [(first_now.date() + timedelta(days=1),
                                        date(2025, 9, 7), 8)]
    summary = await world.run(bar_store, **SYNTHETIC_OPTIONS)
    assert summary["tickers_failed"] == {}
    assert all(runs == [] for runs in (await hole_runs(bar_store, settings, now)).values())
    await assert_table_matches_api(bar_store, settings, now)

    # The backfill start moves 40 days earlier: filled backwards, nothing else asked again.
    earlier = {**SYNTHETIC_OPTIONS, "backfill_days": 60}
    settings = world.settings(**earlier)
    gaps = await hole_runs(bar_store, settings, now)
    # From the new start (Thursday 2025-07-10) to the first run's start (Sunday 08-10).
    assert gaps[("AAPL", "1d")] == [(date(2025, 7, 10), date(2025, 8, 8), 22)]
    # Crypto: whole UTC days from 07-11; 08-10 was only partly kept (from 01:00 UTC).
    assert gaps[("X:BTCUSD", "1h")] == [(date(2025, 7, 11), date(2025, 8, 10), 31)]
    await world.run(bar_store, **earlier)
    assert all(runs == [] for runs in (await hole_runs(bar_store, settings, now)).values())
    await assert_table_matches_api(bar_store, settings, now)


def _request_days(path: str) -> tuple[date, date]:
    """The first and last New York day an aggregates request path asks for."""
    *_, start, end = path.split("/")

    def day(text: str) -> date:
        if "-" in text:
            return date.fromisoformat(text)
        return ms_to_datetime(int(text)).astimezone(NEW_YORK).date()

    return day(start), day(end)


async def test_no_request_for_a_weekend_or_holiday_of_a_stock(
        bar_store: BarStore, synthetic_world: World) -> None:
    world = synthetic_world
    options = {**SYNTHETIC_OPTIONS, "trailing_window_days": 0}
    await world.run(bar_store, **options)
    # Saturday, Sunday, then Labor Day (Monday 2025-09-01), each after the close.
    for _ in range(3):
        world.advance(timedelta(days=1))
        before = len(world.server.requests)
        await world.run(bar_store, **options)
        asked = world.server.requests[before:]
        assert not [r.path for r in asked if r.ticker == "AAPL"]
        assert [r for r in asked if r.ticker == "X:BTCUSD"]  # crypto trades every day
    for record in world.server.requests:
        if record.ticker == "AAPL":
            first, last = _request_days(record.path)
            assert session_dates("AAPL", first, last), record.path


async def test_split_added_upstream_refetches_the_history(
        bar_store: BarStore, synthetic_world: World) -> None:
    world = synthetic_world
    options = {"tickers": "AAPL", "timeframes": "1h,1d", "backfill_days": 30}
    await world.run(bar_store, **options)
    world.advance(timedelta(hours=1))
    await world.run(bar_store, **options)  # records the (empty) split list
    settings = world.settings(**options)
    now = world.clock.now()
    before = await bar_store.fetch_bars("AAPL", Timeframe.parse("1d"))

    world.server.add_split("AAPL", date(2025, 8, 18), 1, 4)
    world.advance(timedelta(hours=1))
    now = world.clock.now()
    summary = await world.run(bar_store, **options)
    after = await bar_store.fetch_bars("AAPL", Timeframe.parse("1d"))
    changed = [bar for bar in after
               if bar.bar_time.astimezone(NEW_YORK).date() < date(2025, 8, 18)]
    assert changed
    assert all(
        new.close == pytest.approx(old.close / 4)
        for old, new in zip(before, after, strict=True) if new in changed)
    assert summary["bars_updated"] >= len(changed)
    await assert_table_matches_api(bar_store, settings, now)


async def test_vouched_sessions_are_counted_exactly(bar_store: BarStore,
                                                    synthetic_world: World) -> None:
    """The gaps table's expected sessions are the calendar's, for stocks and crypto."""
    await synthetic_world.run(bar_store, **SYNTHETIC_OPTIONS)
    now = synthetic_world.clock.now()
    settings = synthetic_world.settings(**SYNTHETIC_OPTIONS)
    expected = {(pair.ticker, pair.timeframe): pair.expected
                for pair in await find_gaps(bar_store, settings, now)}
    start = (now - timedelta(days=20)).astimezone(NEW_YORK).date() + timedelta(days=1)
    aapl = len(session_dates("AAPL", start, now.astimezone(NEW_YORK).date()))
    assert expected[("AAPL", "1d")] == expected[("AAPL", "1h")] == aapl
    assert expected[("X:BTCUSD", "1d")] == 19  # whole UTC days after the start, before now


async def test_a_split_refetches_bars_older_than_a_rolling_window_and_waits_for_its_date(
        bar_store: BarStore, synthetic_world: World) -> None:
    """BACKFILL_DAYS rolls on, older bars stay: after a split they are fetched again too.
    A split announced for a later date changes nothing until that date."""
    world = synthetic_world
    options = {"tickers": "AAPL", "timeframes": "1d", "backfill_days": 10}
    await world.run(bar_store, **options)
    world.advance(timedelta(days=20))
    await world.run(bar_store, **options)  # the window has moved on; the split list is kept
    before = await bar_store.fetch_bars("AAPL", Timeframe.parse("1d"))
    today = world.clock.now().astimezone(NEW_YORK).date()

    world.server.add_split("AAPL", today + timedelta(days=3), 1, 3)  # announced, not yet
    world.advance(timedelta(hours=1))
    summary = await world.run(bar_store, **options)
    assert summary["bars_updated"] == 0
    assert await bar_store.fetch_bars("AAPL", Timeframe.parse("1d")) == before

    world.advance(timedelta(days=4))  # the split takes effect
    await world.run(bar_store, **options)
    after = {bar.bar_time: bar for bar in await bar_store.fetch_bars("AAPL", Timeframe.parse("1d"))}
    oldest = before[0]
    assert oldest.bar_time < world.clock.now() - timedelta(days=10)  # outside the window
    assert after[oldest.bar_time].close == pytest.approx(oldest.close / 3)
    assert all(after[bar.bar_time].close == pytest.approx(bar.close / 3) for bar in before)
