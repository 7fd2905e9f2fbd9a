"""Write throughput of the bulk upsert (``BarStore.write_page``) into the real ``bars`` table.

On a fresh database, one ticker's 1-minute bars in ``--pages`` consecutive pages of
``--bars`` bars each, then:
  fresh      each page new (the fast path: one probe, COPY straight into ``bars``)
  fresh xN   the same, N pages at once on N connections: the daemon's N writers
             (``pipeline.WRITERS``), its write capacity in a backfill
  identical  every page written again unchanged (merge path; nothing touched)
  changed    every page written again with every close and vwap moved (merge path; all updated)
  daily      one page of daily bars for another ticker (per-bar session-date keying)

Timed end to end as the daemon calls it: the page handed over as the fast reader hands an
ordinary answer over (numpy columns, ``BarColumns``), row building, the transaction, the
COPY, the merge and the coverage row. Figures are bars per second.

    .venv/bin/python -m bench.upsert [--bars 50000] [--pages 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.harness import fresh_database, postgres_server
from polygon_backfill.bar_columns import BarColumns
from polygon_backfill.models import Bar, Timeframe, TimeRange, ms_to_datetime
from polygon_backfill.pipeline import WRITERS
from polygon_backfill.storage import BarStore

M1 = Timeframe.parse("1m")
D1 = Timeframe.parse("1d")
_START_MS = 1_577_836_800_000  # 2020-01-01 00:00 UTC
_DAILY_BARS = 5_000  # about twenty years of sessions: a long daily backfill page


def minute_bars(first_ms: int, count: int, rng: random.Random) -> list[Bar]:
    """A random walk of plausible minute bars (prices with cents, fractional vwap)."""
    bars: list[Bar] = []
    price = 150.0
    for i in range(count):
        price = max(1.0, price + rng.gauss(0, 0.05))
        open_ = round(price, 2)
        close = round(price + rng.gauss(0, 0.04), 2)
        high = round(max(open_, close) + abs(rng.gauss(0, 0.03)), 2)
        low = round(min(open_, close) - abs(rng.gauss(0, 0.03)), 2)
        volume = float(rng.randint(100, 200_000))
        vwap = round((open_ + high + low + close) / 4 + rng.gauss(0, 0.001), 4)
        bars.append(Bar(first_ms + i * 60_000, open_, high, low, close, volume, vwap,
                        rng.randint(1, 2_000)))
    return bars


def changed(bars: Sequence[Bar]) -> list[Bar]:
    """Every bar corrected: close and vwap moved by a cent (a split-adjustment-like rewrite)."""
    return [Bar(b.t, b.open, b.high + 0.01, b.low, b.close + 0.01, b.volume,
                (b.vwap or 0.0) + 0.01, b.trades) for b in bars]


def daily_bars(count: int, rng: random.Random) -> list[Bar]:
    """Weekday sessions stamped at New York midnight, as Polygon sends per-ticker dailies."""
    bars: list[Bar] = []
    day = datetime(2000, 1, 3, 5, tzinfo=UTC)
    while len(bars) < count:
        if day.weekday() < 5:
            template = minute_bars(int(day.timestamp() * 1000), 1, rng)[0]
            bars.append(template)
        day += timedelta(days=1)
    return bars


def as_read(bars: Sequence[Bar]) -> BarColumns:
    """``bars`` as the daemon's fast reader hands a page over; built before the clock starts."""
    columns = BarColumns.from_bars(bars)
    if columns is None:
        raise ValueError("every generated bar carries volume, vwap and trades")
    return columns


def covering(bars: Sequence[Bar], timeframe: Timeframe) -> TimeRange:
    return TimeRange(ms_to_datetime(bars[0].t),
                     ms_to_datetime(bars[-1].t) + timeframe.duration)


async def timed_write(store: BarStore, ticker: str, timeframe: Timeframe,
                      bars: Sequence[Bar]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await store.write_page(ticker, timeframe, bars, covering(bars, timeframe))
    return time.perf_counter() - started, result


def row(scenario: str, bars: int, times: list[float], results: list[Any],
        writers: int = 1) -> dict[str, Any]:
    """One scenario's figures; ``times`` are per page, or per round of ``writers`` pages
    written at once."""
    total = sum(times)
    return {
        "scenario": scenario, "writers": writers, "pages": len(times) * writers,
        "bars_per_page": bars,
        "median_bars_per_s": round(bars * writers / statistics.median(times)),
        "total_bars_per_s": round(bars * writers * len(times) / total),
        "total_s": round(total, 3),
        "inserted": sum(r.inserted for r in results),
        "updated": sum(r.updated for r in results),
        "unchanged": sum(r.unchanged for r in results),
    }


async def timed_round(store: BarStore, tickers: Sequence[str], timeframe: Timeframe,
                      bars: Sequence[Bar]) -> tuple[float, list[Any]]:
    """The same page written for every ticker at once, each on its own connection, as the
    pipeline's writers do."""
    started = time.perf_counter()
    results = await asyncio.gather(*(store.write_page(ticker, timeframe, bars,
                                                      covering(bars, timeframe))
                                     for ticker in tickers))
    return time.perf_counter() - started, list(results)


async def fresh_by_writers(store: BarStore, pages: Sequence[Sequence[Bar]]) -> dict[str, Any]:
    """Fresh inserts as the daemon's ``WRITERS`` make them: each page for as many new
    tickers at once."""
    times, results = [], []
    for page in pages:
        elapsed, written = await timed_round(store, [f"W{i}" for i in range(WRITERS)], M1,
                                             page)
        times.append(elapsed)
        results += written
    return row(f"fresh x{WRITERS}", len(pages[0]), times, results, WRITERS)


async def measure(admin_url: str, bars: int, pages: int) -> list[dict[str, Any]]:
    """The scenarios on a fresh database of ``admin_url``'s server, one row each; the
    first two are fresh inserts by one writer and by the daemon's ``WRITERS``."""
    rng = random.Random(20240102)
    page_list = [as_read(minute_bars(_START_MS + p * bars * 60_000, bars, rng))
                 for p in range(pages)]
    daily = as_read(daily_bars(min(bars, _DAILY_BARS), rng))
    rows: list[dict[str, Any]] = []
    async with fresh_database(admin_url) as dsn:
        store = await BarStore.connect(dsn, min_size=WRITERS, max_size=WRITERS)
        try:
            for scenario, variant in (("fresh", None), ("identical", None),
                                      ("changed", changed)):
                times, results = [], []
                for page in page_list:
                    elapsed, result = await timed_write(
                        store, "AAPL", M1, as_read(variant(page)) if variant else page)
                    times.append(elapsed)
                    results.append(result)
                rows.append(row(scenario, bars, times, results))
                if scenario == "fresh":  # into the same, no longer empty, table
                    rows.append(await fresh_by_writers(store, page_list))
            elapsed, result = await timed_write(store, "MSFT", D1, daily)
            rows.append(row("daily", len(daily), [elapsed], [result]))
        finally:
            await store.close()
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'scenario':<10} {'writers':>7} {'pages':>5} {'bars/page':>9} {'median bars/s':>14} "
          f"{'total bars/s':>13} {'total s':>8} {'inserted':>9} {'updated':>8} "
          f"{'unchanged':>9}")
    for r in rows:
        print(f"{r['scenario']:<10} {r['writers']:>7} {r['pages']:>5} {r['bars_per_page']:>9,} "
              f"{r['median_bars_per_s']:>14,} {r['total_bars_per_s']:>13,} "
              f"{r['total_s']:>8.3f} {r['inserted']:>9,} {r['updated']:>8,} "
              f"{r['unchanged']:>9,}")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bars", type=int, default=50_000, help="bars per page")
    parser.add_argument("--pages", type=int, default=10, help="pages per scenario")
    parser.add_argument("--json", action="store_true", help="print rows as JSON too")
    args = parser.parse_args(argv)
    async with postgres_server() as admin:
        rows = await measure(admin, args.bars, args.pages)
    print_table(rows)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
