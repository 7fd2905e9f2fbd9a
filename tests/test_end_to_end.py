"""End to end: the sandbox serving the real CSV data, real PostgreSQL, the scheduler.

The table must equal the CSV files exactly; a second run writes nothing and only asks for
the trailing window; a run interrupted midway and run again ends with the same table.
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from polygon_backfill.models import AssetClass, Timeframe, asset_class, ms_to_datetime
from polygon_backfill.sandbox import SandboxConfig, SandboxServer
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.storage import BarStore
from tests.support import REAL_DATA, before_each_write

pytestmark = pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/real is absent")

# (ticker, timeframe, CSV file): the three real series and how they are kept.
SERIES = [("AAPL", "1d", "AAPL.day.csv"), ("SPY", "1d", "SPY.day.csv"),
          ("I:SPX", "1m", "I-SPX.minute.csv")]


def read_csv(name: str, ticker: str) -> list[tuple[Any, ...]]:
    """The CSV rows as (time, o, h, l, c, v); an index's volume 0 is Polygon's 'no volume'."""
    rows = []
    with (REAL_DATA / name).open(newline="") as handle:
        for row in csv.DictReader(handle):
            volume: float | None = float(row["v"])
            if asset_class(ticker) is AssetClass.INDEX and volume == 0:
                volume = None
            rows.append((ms_to_datetime(int(row["t"])), float(row["o"]), float(row["h"]),
                         float(row["l"]), float(row["c"]), volume))
    return rows


async def table_rows(store: BarStore, ticker: str, timeframe: str) -> list[tuple[Any, ...]]:
    bars = await store.fetch_bars(ticker, Timeframe.parse(timeframe))
    return [(bar.bar_time, bar.open, bar.high, bar.low, bar.close, bar.volume) for bar in bars]


@pytest.fixture
async def real_sandbox() -> AsyncIterator[SandboxServer]:
    async with SandboxServer(SandboxConfig(data_dir=REAL_DATA, synthetic=False)) as server:
        yield server


async def backfill(store: BarStore, server: SandboxServer, **options: Any) -> dict[str, Any]:
    """One pass per timeframe group, as a user runs `once` for AAPL,SPY 1d and I:SPX 1m."""
    totals: dict[str, Any] = {"bars_written": 0, "requests": 0, "tickers_failed": {}}
    for tickers, timeframe in ((["AAPL", "SPY"], "1d"), (["I:SPX"], "1m")):
        scheduler = AutoBackfillScheduler(
            polygon_api_key="test-key", store=store, polygon_base_url=server.base_url,
            tickers=tickers, timeframes=[timeframe], backfill_start="2004-01-01",
            stagger_seconds=0, group_pause_seconds=0,
            # One request per pair, whatever the calendar around today: the grouped-daily
            # path has its own tests (test_grouped_daily.py).
            grouped_daily_max_sessions=0, **options)
        try:
            summary = await scheduler.run_once()
        finally:
            await scheduler.polygon_client.aclose()
        totals["bars_written"] += summary["bars_written"]
        totals["requests"] += summary["requests"]
        totals["tickers_failed"] |= summary["tickers_failed"]
    return totals


async def assert_table_equals_csv(store: BarStore) -> None:
    for ticker, timeframe, name in SERIES:
        expected = read_csv(name, ticker)
        stored = await table_rows(store, ticker, timeframe)
        assert len(stored) == len(expected), ticker
        assert stored == expected, ticker


async def test_backfill_leaves_exactly_the_csv_rows(
        bar_store: BarStore, real_sandbox: SandboxServer) -> None:
    """Every row, every value and every time of the three real series, nothing else."""
    summary = await backfill(bar_store, real_sandbox)
    assert summary["tickers_failed"] == {}
    await assert_table_equals_csv(bar_store)
    expected_rows = sum(len(read_csv(name, ticker)) for ticker, _, name in SERIES)
    assert summary["bars_written"] == expected_rows == 3379 + 2519 + 1563
    assert sum(row.bars for row in await bar_store.status()) == expected_rows


async def test_second_run_writes_nothing_and_asks_only_for_the_trailing_window(
        bar_store: BarStore, real_sandbox: SandboxServer) -> None:
    """After a full run, each pair costs one request (its trailing window) and no write,
    and each stored stock ticker one split check."""
    await backfill(bar_store, real_sandbox)
    before = len(real_sandbox.requests)
    again = await backfill(bar_store, real_sandbox)
    assert again["bars_written"] == 0
    split_checks = [r.params["ticker"] for r in real_sandbox.requests[before:]
                    if r.path == "/v3/reference/splits"]
    assert split_checks == ["AAPL", "SPY"]
    asked = [r for r in real_sandbox.requests[before:] if r.path.startswith("/v2/aggs/")]
    assert again["requests"] == len(asked) + len(split_checks)
    assert len(asked) == len(SERIES)
    today = datetime.now(UTC)
    for record in asked:
        assert record.status == 200
        assert record.results == 0
        start = record.path.split("/")[-2]
        start_time = (datetime.fromisoformat(start).replace(tzinfo=UTC) if "-" in start
                      else ms_to_datetime(int(start)))
        assert (today - start_time).days <= 5, record.path
    await assert_table_equals_csv(bar_store)


async def test_run_interrupted_midway_then_rerun_ends_with_the_same_table(
        bar_store: BarStore, real_sandbox: SandboxServer) -> None:
    """Cancel the pass after a few small pages; the next pass completes the exact table."""
    job: asyncio.Task[Any] | None = None

    async def cancel_at_sixth(count: int) -> None:
        if count == 6 and job is not None:
            job.cancel()

    with before_each_write(bar_store, cancel_at_sixth):
        job = asyncio.ensure_future(backfill(bar_store, real_sandbox, page_limit=200))
        with pytest.raises(asyncio.CancelledError):
            await job
    partial = sum(row.bars for row in await bar_store.status())
    assert 0 < partial < 3379 + 2519 + 1563
    summary = await backfill(bar_store, real_sandbox, page_limit=200)
    assert summary["tickers_failed"] == {}
    await assert_table_equals_csv(bar_store)


def test_cli_once_exits_cleanly_on_bad_configuration(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A bad setting gets one line naming it and exit code 2, before anything starts."""
    from polygon_backfill.cli import main

    assert main(["once", "--tickers", "AAPL,../x", "--base-url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "TICKERS" in err
    assert "'../x'" in err
    assert len(err.strip().splitlines()) == 1


async def test_stop_request_finishes_the_page_in_flight_and_leaves_consistent_coverage(
        bar_store: BarStore, real_sandbox: SandboxServer) -> None:
    """SIGTERM's path: the page being written commits, nothing after it starts, every stored
    bar lies inside recorded coverage, and the next run completes the exact table."""
    scheduler = AutoBackfillScheduler(
        polygon_api_key="test-key", store=bar_store, polygon_base_url=real_sandbox.base_url,
        tickers=["AAPL", "SPY"], timeframes=["1d"], backfill_start="2004-01-01",
        page_limit=250, parallel_backfill=False)

    async def stop_at_third(count: int) -> None:
        if count == 3:
            scheduler.request_stop()

    with before_each_write(bar_store, stop_at_third) as writes:
        try:
            summary = await scheduler.run_once()
        finally:
            await scheduler.polygon_client.aclose()
    assert summary["stopped_early"] is True
    assert writes == [3]
    assert summary["bars_written"] == 750
    stored = await table_rows(bar_store, "AAPL", "1d")
    assert stored == read_csv("AAPL.day.csv", "AAPL")[:750]
    coverage = await bar_store.coverage("AAPL", Timeframe.parse("1d"))
    assert all(any(r.start <= row[0] < r.end for r in coverage) for row in stored)
    assert await bar_store.fetch_bars("SPY", Timeframe.parse("1d")) == []
    await backfill(bar_store, real_sandbox)
    await assert_table_equals_csv(bar_store)


def weekly_from_daily_csv(name: str) -> list[tuple[Any, ...]]:
    """Weeks built straight from the CSV (Sunday 00:00 New York), not through our code."""
    from zoneinfo import ZoneInfo

    new_york = ZoneInfo("America/New_York")
    weeks: dict[Any, list[tuple[Any, ...]]] = {}
    for row in read_csv(name, "AAPL"):
        day = row[0].astimezone(new_york).date()
        sunday = day - timedelta(days=(day.weekday() + 1) % 7)
        weeks.setdefault(sunday, []).append(row)
    return [(datetime(s.year, s.month, s.day, tzinfo=new_york).astimezone(UTC),
             rows[0][1], max(r[2] for r in rows), min(r[3] for r in rows), rows[-1][4],
             sum(r[5] for r in rows)) for s, rows in sorted(weeks.items())]


async def test_weekly_bars_are_keyed_on_sunday_and_complete(
        bar_store: BarStore, real_sandbox: SandboxServer) -> None:
    """1w bars of AAPL equal weeks computed from the daily CSV, and a rerun changes none."""
    for _ in range(2):
        scheduler = AutoBackfillScheduler(
            polygon_api_key="test-key", store=bar_store, polygon_base_url=real_sandbox.base_url,
            tickers=["AAPL"], timeframes=["1w"], backfill_start="2004-01-01")
        try:
            summary = await scheduler.run_once()
        finally:
            await scheduler.polygon_client.aclose()
        assert summary["tickers_ok"] == ["AAPL"]
    stored = await table_rows(bar_store, "AAPL", "1w")
    expected = weekly_from_daily_csv("AAPL.day.csv")
    assert [row[0] for row in stored] == [row[0] for row in expected]
    for got, want in zip(stored, expected, strict=True):
        assert got[1:5] == want[1:5]
        assert got[5] == pytest.approx(want[5], rel=1e-12)
    assert summary["bars_written"] == 0
