"""A peer, side by side: the official Massive (formerly Polygon.io) Python client.

``massive.RESTClient.list_aggs`` (synchronous, urllib3, follows ``next_url`` itself) runs
in a thread pool, one range per task; each finished range goes back to the event loop and
is written with ``BarStore.write_page`` (asyncpg COPY + merge into the same ``bars``
table the daemon writes). ``run_peer`` is what a benchmark calls; the CLI runs it alone:

    .venv/bin/python -m bench.peer_massive --tickers AAPL,X:BTCUSD --timeframes 1h,1d --days 30

Requests are counted on the wire: the client's urllib3 pool manager is given a connection
pool class whose ``_make_request`` counts every HTTP exchange, so urllib3's own retries
(429 and 5xx, inside ``urlopen``) are counted one by one, as the sandbox sees them.

A dev-only dependency (the ``dev`` extra); nothing in ``src/`` imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from massive import RESTClient
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import BaseHTTPResponse

from polygon_backfill.clients import PolygonClient
from polygon_backfill.clients._urls import range_bounds
from polygon_backfill.clients.rate_limiter import AdaptiveRateLimiter, RateLimit
from polygon_backfill.models import Bar, Timeframe, TimeRange, canonical_bar_time
from polygon_backfill.planner import align_start
from polygon_backfill.storage import BarStore

log = logging.getLogger(__name__)

WorkItem = tuple[str, str, datetime, datetime]
_Row = tuple[datetime, float, float, float, float, float | None, float | None, int | None]


class WireCounter:
    """HTTP exchanges made by one client, from any thread: all of them, and the 429s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.http_429 = 0
        self.pages = 0

    def add(self, status: int | None) -> None:
        """Count one exchange; ``status`` is None when no answer came (timeout, reset)."""
        with self._lock:
            self.requests += 1
            self.http_429 += status == 429
            self.pages += status == 200


def counting_client(base_url: str, api_key: str, threads: int, retries: int,
                    counter: WireCounter) -> RESTClient:
    """The official client on ``base_url`` (its ``base`` argument; ``next_url`` is cut to
    path and query and sent there too), with every HTTP exchange counted in ``counter``."""
    client = RESTClient(api_key=api_key, base=base_url.rstrip("/"), retries=retries,
                        maxsize=max(10, threads))

    def counting(pool_class: type[HTTPConnectionPool]) -> type[HTTPConnectionPool]:
        class Counting(pool_class):  # type: ignore[valid-type,misc]
            def _make_request(self, *args: Any, **kwargs: Any) -> BaseHTTPResponse:
                try:
                    response: BaseHTTPResponse = super()._make_request(*args, **kwargs)
                except Exception:
                    counter.add(None)
                    raise
                counter.add(response.status)
                return response
        Counting.__name__ = Counting.__qualname__ = f"Counting{pool_class.__name__}"
        return Counting

    # PoolManager reads this per new pool; no pool exists before the first request.
    client.client.pool_classes_by_scheme = {"http": counting(HTTPConnectionPool),
                                            "https": counting(HTTPSConnectionPool)}
    return client


def _bounds(ticker: str, timeframe: Timeframe, start: datetime,
            end: datetime) -> tuple[str | int, str | int]:
    """Inclusive ``from``/``to`` as our own client sends them: Unix ms ``start`` and
    ``end - 1`` intraday, home-zone dates for daily and weekly bars."""
    first, last = range_bounds(ticker, timeframe, start, end)
    if timeframe.is_daily:
        return first, last
    return int(first), int(last)


def fetch_with_massive(client: RESTClient, ticker: str, timeframe: Timeframe, start: datetime,
                       end: datetime, page_limit: int) -> tuple[list[Bar], float]:
    """One range through ``list_aggs`` (its own pagination), in the calling thread: the bars
    and the seconds it took."""
    started = time.perf_counter()
    from_, to = _bounds(ticker, timeframe, start, end)
    bars = []
    for agg in client.list_aggs(ticker, timeframe.multiplier, timeframe.timespan.value,
                                from_, to, limit=page_limit, adjusted=True, sort="asc"):
        if None in (agg.timestamp, agg.open, agg.high, agg.low, agg.close):
            raise ValueError(f"incomplete aggregate for {ticker} {timeframe}: {agg}")
        bars.append(Bar(int(agg.timestamp), agg.open, agg.high, agg.low, agg.close,
                        agg.volume, agg.vwap, agg.transactions))
    return bars, time.perf_counter() - started


async def run_peer(base_url: str, store: BarStore, work: Sequence[WorkItem], *,
                   threads: int = 8, api_key: str = "bench-key", page_limit: int = 50_000,
                   retries: int = 3) -> dict[str, float | int]:
    """Fetch every ``(ticker, timeframe, start, end)`` with the official client in
    ``threads`` threads and write each range with ``store.write_page`` on this loop.

    ``retries`` is the official client's own default (urllib3 ``Retry(total=3)``). A range
    that fails (retries exhausted, a non-200 answer) is logged, counted in
    ``ranges_failed`` and not written. ``api_seconds`` and ``db_seconds`` are sums over
    ranges (they overlap in time); ``total_seconds`` is the wall time.
    """
    counter = WireCounter()
    client = counting_client(base_url, api_key, threads, retries, counter)
    loop = asyncio.get_running_loop()
    totals = {"api_seconds": 0.0, "db_seconds": 0.0}
    counts = {"bars_fetched": 0, "bars_written": 0, "ranges_failed": 0}

    async def one(executor: ThreadPoolExecutor, item: WorkItem) -> None:
        ticker, name, start, end = item
        timeframe = Timeframe.parse(name)
        try:
            bars, fetch_s = await loop.run_in_executor(
                executor, fetch_with_massive, client, ticker, timeframe, start, end, page_limit)
        except Exception as exc:
            counts["ranges_failed"] += 1
            log.error("peer_massive: %s %s [%s, %s) failed: %r",
                        ticker, name, start, end, exc)
            return
        totals["api_seconds"] += fetch_s
        counts["bars_fetched"] += len(bars)
        written = time.perf_counter()
        result = await store.write_page(ticker, timeframe, bars, TimeRange(start, end))
        totals["db_seconds"] += time.perf_counter() - written
        counts["bars_written"] += result.inserted + result.updated + result.unchanged

    started = time.perf_counter()
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="massive")
    try:
        await asyncio.gather(*(one(executor, item) for item in work))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        client.client.clear()
    total_s = time.perf_counter() - started
    return {"requests": counter.requests, "http_429": counter.http_429, "pages": counter.pages,
            "ranges": len(work), **counts,
            "api_seconds": round(totals["api_seconds"], 3),
            "db_seconds": round(totals["db_seconds"], 3), "total_seconds": round(total_s, 3)}


def _row(ticker: str, timeframe: Timeframe, bar: Bar) -> _Row:
    return (canonical_bar_time(ticker, timeframe, bar.t), bar.open, bar.high, bar.low,
            bar.close, bar.volume, bar.vwap, bar.trades)


async def table_vs_client(store: BarStore, client: PolygonClient,
                          work: Sequence[WorkItem]) -> tuple[int, int, int]:
    """(rows stored, rows our own client fetches for ``work``, rows differing) over every
    pair in ``work``; a pair's stored rows are all compared, values included."""
    expected: dict[tuple[str, str], set[_Row]] = {}
    for ticker, name, start, end in work:
        timeframe = Timeframe.parse(name)
        bars = await client.fetch_range(ticker, timeframe, start, end)
        expected.setdefault((ticker, name), set()).update(
            _row(ticker, timeframe, bar) for bar in bars)
    stored = wanted = differing = 0
    for (ticker, name), rows in expected.items():
        got = [(r.bar_time, r.open, r.high, r.low, r.close, r.volume, r.vwap, r.trades)
               for r in await store.fetch_bars(ticker, Timeframe.parse(name))]
        stored += len(got)
        wanted += len(rows)
        differing += len(rows ^ set(got)) + len(got) - len(set(got))
    return stored, wanted, differing


def pair_work(tickers: Sequence[str], timeframes: Sequence[str], days: int,
              end: datetime) -> list[WorkItem]:
    """One range per pair: ``days`` back from ``end``, started on a bar boundary."""
    work = []
    for ticker in tickers:
        for name in timeframes:
            start = align_start(ticker, Timeframe.parse(name), end - timedelta(days=days))
            work.append((ticker, name, start, end))
    return work


async def run_cli(tickers: list[str], timeframes: list[str], days: int, threads: int,
                  rate_limit: str, latency_ms: float, page_limit: int) -> dict[str, Any]:
    from bench.harness import fresh_database, postgres_server, sandbox_process

    # Midnight UTC: every range lies in the past, so a second fetch sees the same bars.
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    work = pair_work(tickers, timeframes, days, end)
    options = ("--rate-limit", rate_limit, "--latency-ms", f"{latency_ms:g}")
    async with postgres_server() as admin, fresh_database(admin) as dsn, \
            sandbox_process(*options) as base_url:
        store = await BarStore.connect(dsn)
        try:
            figures: dict[str, Any] = await run_peer(base_url, store, work, threads=threads,
                                                     page_limit=page_limit)
            limiter = AdaptiveRateLimiter(RateLimit.parse(rate_limit))
            async with PolygonClient("bench-key", base_url, page_limit=page_limit,
                                     rate_limiter=limiter) as ours:
                stored, wanted, differing = await table_vs_client(store, ours, work)
        finally:
            await store.close()
    return {**figures, "rows_stored": stored, "rows_our_client": wanted,
            "rows_differing": differing, "threads": threads, "sandbox_rate_limit": rate_limit,
            "latency_ms": latency_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tickers", default="AAPL,X:BTCUSD")
    parser.add_argument("--timeframes", default="1h,1d")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rate-limit", default="50/1", help="the sandbox's N/SECONDS")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--page-limit", type=int, default=50_000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    from polygon_backfill.logging import configure_logging

    configure_logging(None, "ERROR")
    figures = asyncio.run(run_cli(
        [t.strip() for t in args.tickers.split(",") if t.strip()],
        [t.strip() for t in args.timeframes.split(",") if t.strip()],
        args.days, args.threads, args.rate_limit, args.latency_ms, args.page_limit))
    for key, value in figures.items():
        print(f"{key:>20}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = (not figures["ranges_failed"] and not figures["rows_differing"]
          and figures["rows_stored"] == figures["rows_our_client"] == figures["bars_written"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
