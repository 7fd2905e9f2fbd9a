"""Speed: the seed's own workload, measured, mode against mode, on one sandbox.

Workload (the seed's): 25 tickers x 5 timeframes (5m, 15m, 1h, 4h, 1d) x --days back, from
the sandbox's synthetic data. The sandbox runs in its own process with a rate limit
(default 50 requests/s) and latency (default 100 ms per request). Each mode runs in its own
process on a fresh database, so its peak RSS is its own:

  phase2  the seed's Phase 2: one ticker after another
  phase3  the seed's Phase 3: groups of 3, starts 5 s apart, 10 s pause between groups
  best    this project's pipeline mode
  peer    the official `massive` client (list_aggs in 8 threads) feeding the same table

--time-scale F divides every duration by F: the seed's stagger and pause, the sandbox's
latency and its rate-limit period (so the limit is F times higher), keeping the modes'
proportions while the run fits in a few minutes.

T_min = max(fewest requests the workload needs under the sandbox's paging rules / rate
limit, bars / the bulk-upsert rate measured in this run with the daemon's two writers);
each row prints total / T_min.
Before the modes run, the whole workload is asked for once, untimed, so the sandbox's bar
cache is equally warm for every mode. Every mode's window ends at the same moment, the
run's start, so all of them fetch the same bars.

    .venv/bin/python -m bench.speed [--days 30] [--time-scale 1] [--modes phase2,phase3,best,peer]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.harness import fresh_database, postgres_server, sandbox_process
from polygon_backfill.clients import PolygonClient
from polygon_backfill.clients.rate_limiter import AdaptiveRateLimiter, RateLimit
from polygon_backfill.clock import ScaledClock
from polygon_backfill.logging import configure_logging
from polygon_backfill.models import Timeframe, datetime_to_ms
from polygon_backfill.pipeline import WRITERS
from polygon_backfill.planner import align_start
from polygon_backfill.sandbox.synthetic import SyntheticSource
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.sessions import load_calendar
from polygon_backfill.storage import BarStore

SEED_TICKERS = ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "META", "NFLX", "AVGO", "ASML",
                "BRK.B", "JPM", "V", "WMT", "JNJ", "X:BTCUSD", "X:ETHUSD", "X:XRPUSD",
                "X:SOLUSD", "X:ADAUSD", "SPY", "QQQ", "DIA", "IWM", "EEM"]
SEED_TIMEFRAMES = ["5m", "15m", "1h", "4h", "1d"]
PAGE_LIMIT = 50_000
MODES = ("phase2", "phase3", "best", "peer")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Workload:
    """What every mode is asked to do, identically."""

    tickers: list[str]
    timeframes: list[str]
    days: int
    rate_requests: int
    rate_period_s: float
    time_scale: float
    end: str  # ISO time the windows end at: one for every mode, however long the run

    @property
    def daemon_rate(self) -> str:
        return f"{self.rate_requests}/{self.rate_period_s / self.time_scale:g}"

    @property
    def end_at(self) -> datetime:
        return datetime.fromisoformat(self.end)


def fewest_requests(work: Workload, end: datetime) -> tuple[int, int]:
    """(requests, bars) for the workload when every range is one next_url chain: the
    sandbox's own paging rule (a page ends before its base aggregates exceed the limit)
    applied to the bars it serves, so T_min does not depend on our planner's estimate."""
    source = SyntheticSource(date(2000, 1, 1))
    requests = bars = 0
    for ticker in work.tickers:
        for name in work.timeframes:
            timeframe = Timeframe.parse(name)
            start = align_start(ticker, timeframe, end - timedelta(days=work.days))
            used, pages = 0, 1
            for _, consumed in source.select(ticker, timeframe.multiplier, timeframe.timespan,
                                             datetime_to_ms(start), datetime_to_ms(end) - 1,
                                             False):
                bars += 1
                if used and used + consumed > PAGE_LIMIT:
                    pages, used = pages + 1, 0
                used += consumed
            requests += pages
    return requests, bars


def _mode_settings(mode: str, work: Workload) -> dict[str, Any]:
    common: dict[str, Any] = {
        "tickers": work.tickers, "timeframes": work.timeframes, "backfill_days": work.days,
        "page_limit": PAGE_LIMIT, "rate_limit": work.daemon_rate, "trailing_window_days": 0,
        "http_timeout_seconds": 120, "max_concurrent_symbols": 3,
        "stagger_seconds": 5 / work.time_scale, "group_pause_seconds": 10 / work.time_scale}
    if mode == "phase2":
        return common | {"parallel_backfill": False}
    if mode == "phase3":
        return common | {"backfill_mode": "groups"}
    return common | {"backfill_mode": "pipeline"}


async def run_mode(mode: str, base_url: str, admin_url: str, work: Workload) -> dict[str, Any]:
    """One mode on a fresh database; runs in its own process (see ``main --child``)."""
    async with fresh_database(admin_url) as dsn:
        store = await BarStore.connect(dsn)
        try:
            if mode == "peer":
                from bench.peer_massive import pair_work, run_peer

                figures = await run_peer(base_url, store,
                                         pair_work(work.tickers, work.timeframes, work.days,
                                                   work.end_at),
                                         page_limit=PAGE_LIMIT)
                row = {"requests": figures["requests"], "http_429": figures.get("http_429", 0),
                       "api_s": figures["api_seconds"], "db_s": figures["db_seconds"],
                       "total_s": figures["total_seconds"], "bars": figures["bars_written"]}
            else:
                scheduler = AutoBackfillScheduler(
                    polygon_api_key="bench-key", store=store,
                    clock=ScaledClock(1.0, start=work.end_at),  # real time, from the run's end
                    polygon_base_url=base_url, **_mode_settings(mode, work))
                # Once per process, like an import: a daemon's later passes never pay it.
                load_calendar()
                started = time.perf_counter()
                try:
                    summary = await scheduler.run_once()
                finally:
                    await scheduler.polygon_client.aclose()
                row = {"requests": summary["requests"], "http_429": summary["rate_limited"],
                       "api_s": summary["api_seconds"], "db_s": summary["db_seconds"],
                       "total_s": time.perf_counter() - started,
                       "bars": summary["bars_written"]}
                if summary["tickers_failed"]:
                    row["failed"] = summary["tickers_failed"]
            row["stored"] = sum(status.bars for status in await store.status())
        finally:
            await store.close()
    row["peak_rss_mb"] = _peak_rss_mb()
    return {"mode": mode, **row}


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not ``ru_maxrss``: Linux carries it across ``execve``,
    so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _child(mode: str, base_url: str, admin_url: str, work: Workload) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.speed", "--child", mode, "--base-url", base_url,
        "--admin-url", admin_url, "--workload", json.dumps(work.__dict__),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    if process.returncode != 0:
        return {"mode": mode, "error": f"exit {process.returncode}"}
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def _warm(base_url: str, work: Workload, period_s: float) -> None:
    """Ask for the whole workload once, untimed, so the sandbox's bar cache is warm for
    every mode alike (the first mode would otherwise pay for generating the data)."""
    limiter = AdaptiveRateLimiter(RateLimit(work.rate_requests, period_s))
    async with PolygonClient("bench-key", base_url, page_limit=PAGE_LIMIT,
                             rate_limiter=limiter) as client:
        end = work.end_at
        for ticker in work.tickers:
            for name in work.timeframes:
                timeframe = Timeframe.parse(name)
                start = align_start(ticker, timeframe, end - timedelta(days=work.days + 1))
                await client.fetch_range(ticker, timeframe, start, end)
    await asyncio.sleep(period_s * 1.1)  # let the sandbox's rate window empty


async def run(work: Workload, modes: list[str], latency_ms: float) -> dict[str, Any]:
    """Every mode against one sandbox process and one PostgreSQL; T_min and the ratios."""
    from bench.upsert import measure

    requests_min, bars = fewest_requests(work, work.end_at)
    period = work.rate_period_s / work.time_scale
    async with postgres_server() as admin:
        upsert = await measure(admin, 50_000, 4)
        # The daemon's writers together: what bounds its database time in a backfill.
        upsert_rate = next(row for row in upsert if row["scenario"] == f"fresh x{WRITERS}")
        rate = float(upsert_rate["median_bars_per_s"])
        sandbox = ("--rate-limit", f"{work.rate_requests}/{period:g}",
                   "--latency-ms", f"{latency_ms / work.time_scale:g}")
        rows = []
        async with sandbox_process(*sandbox) as base_url:
            await _warm(base_url, work, period)
            for mode in modes:
                rows.append(await _child(mode, base_url, admin, work))
    t_api = requests_min / (work.rate_requests / period)
    t_db = bars / rate
    t_min = max(t_api, t_db)
    for row in rows:
        if "total_s" in row:
            row["bars_per_s"] = round(row["bars"] / row["total_s"])
            row["total_over_t_min"] = round(row["total_s"] / t_min, 3)
            for key in ("api_s", "db_s", "total_s", "peak_rss_mb"):
                row[key] = round(row[key], 2)
    return {"workload": work.__dict__, "latency_ms": latency_ms, "when": work.end,
            "fewest_requests": requests_min, "bars": bars, "upsert_bars_per_s": round(rate),
            "t_min_api_s": round(t_api, 2), "t_min_db_s": round(t_db, 2),
            "t_min_s": round(t_min, 2), "rows": rows}


def _print(report: dict[str, Any]) -> None:
    print(f"workload: {report['workload']}  latency {report['latency_ms']} ms")
    print(f"T_min = max({report['fewest_requests']} requests / rate = {report['t_min_api_s']} s,"
          f" {report['bars']} bars / {report['upsert_bars_per_s']} bars/s = "
          f"{report['t_min_db_s']} s) = {report['t_min_s']} s")
    columns = ["mode", "requests", "http_429", "api_s", "db_s", "total_s", "bars", "bars_per_s",
               "peak_rss_mb", "total_over_t_min"]
    print(" | ".join(columns))
    for row in report["rows"]:
        print(" | ".join(str(row.get(column, row.get("error", "-"))) for column in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--tickers", type=int, default=len(SEED_TICKERS))
    parser.add_argument("--rate", default="50/1", help="the sandbox's N/SECONDS")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--admin-url", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure_logging(None, "ERROR")
    if args.child:
        work = Workload(**json.loads(args.workload))
        print(json.dumps(asyncio.run(run_mode(args.child, args.base_url, args.admin_url,
                                              work))))
        return 0
    count, _, period = args.rate.partition("/")
    work = Workload(SEED_TICKERS[:args.tickers], SEED_TIMEFRAMES, args.days, int(count),
                    float(period or 1), args.time_scale, datetime.now(UTC).isoformat())
    report = asyncio.run(run(work, args.modes.split(","), args.latency_ms))
    _print(report)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"speed-{stamp}.json").write_text(json.dumps(report, indent=2))
    best = next((row for row in report["rows"] if row["mode"] == "best"), {})
    return 0 if best.get("http_429", 1) == 0 and not math.isnan(best.get("total_s", math.nan)) \
        else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
