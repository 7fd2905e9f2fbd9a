"""Rate-limit acceptance, measured: the daemon against a sandbox that enforces a limit.

Scenarios (each on a fresh database, the sandbox in this process):
  exact   the daemon configured to the sandbox's N per period: expect zero 429s and a wall
          time close to requests / N periods
  double  the daemon configured to 2N: expect under 5% of requests answered 429
  free    the free-plan preset (5 per 60 s) against a sandbox enforcing 5 per 60 s, both on a
          clock running --free-scale times faster: expect no ticker dropped

Every scenario checks the table against a fault-free sandbox, row by row.

    .venv/bin/python -m bench.rate_limits [--limit 10/1] [--tickers 8] [--days 120]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.harness import (
    backfill_pass,
    fresh_database,
    postgres_server,
    sandbox_process,
    table_mismatches,
)
from polygon_backfill.clients.rate_limiter import RateLimit
from polygon_backfill.clock import ScaledClock
from polygon_backfill.logging import configure_logging
from polygon_backfill.storage import BarStore

TICKERS = ["AAPL", "MSFT", "GOOGL", "AMZN", "X:BTCUSD", "X:ETHUSD", "SPY", "QQQ", "NVDA",
           "META", "TSLA", "NFLX"]


async def scenario(admin: str, name: str, sandbox_limit: RateLimit, daemon_limit: str,
                   tickers: list[str], days: int, scale: float) -> dict[str, Any]:
    clock = ScaledClock(scale)
    sandbox_options = ("--rate-limit", f"{sandbox_limit.requests}/{sandbox_limit.period_s:g}",
                       "--time-scale", str(scale))
    async with fresh_database(admin) as dsn, sandbox_process(*sandbox_options) as base_url:
        store = await BarStore.connect(dsn)
        try:
            result = await backfill_pass(
                store, base_url, clock, tickers=tickers, timeframes=["1d"], backfill_days=days,
                page_limit=10, rate_limit=daemon_limit, stagger_seconds=0,
                group_pause_seconds=0, trailing_window_days=0)
            now = clock.now()
            stored, mismatched = await table_mismatches(
                store, tickers, ["1d"], now - timedelta(days=days), now)
        finally:
            await store.close()
    requests, limited = result.summary["requests"], result.summary["rate_limited"]
    ideal_s = (requests - limited) / sandbox_limit.requests * sandbox_limit.period_s / scale
    return {"scenario": name, "sandbox_limit": str(sandbox_limit), "daemon": daemon_limit,
            "time_scale": scale, "requests": requests, "http_429": limited,
            "share_429": round(limited / max(1, requests), 4),
            "wall_s": round(result.wall_s, 2), "ideal_s": round(ideal_s, 2),
            "wall_over_ideal": round(result.wall_s / ideal_s, 3) if ideal_s else None,
            "tickers_failed": sorted(result.summary["tickers_failed"]),
            "rows": stored, "rows_wrong": mismatched}


async def run(limit: RateLimit, limit_text: str, tickers: list[str], days: int,
              free_scale: float) -> list[dict[str, Any]]:
    double = f"{limit.requests * 2}/{limit.period_s:g}"
    async with postgres_server() as admin:
        return [
            await scenario(admin, "exact", limit, limit_text, tickers, days, 1.0),
            await scenario(admin, "double", limit, double, tickers, days, 1.0),
            await scenario(admin, "free", RateLimit.parse("free"), "free", tickers[:4], 60,
                           free_scale),
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", default="10/1", help="the sandbox's N/SECONDS")
    parser.add_argument("--tickers", type=int, default=8)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--free-scale", type=float, default=100.0,
                        help="how much faster the free scenario's clock runs")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    configure_logging(None, "ERROR")
    rows = asyncio.run(run(RateLimit.parse(args.limit), args.limit, TICKERS[:args.tickers],
                           args.days, args.free_scale))
    header = ["scenario", "sandbox_limit", "daemon", "requests", "http_429", "share_429",
              "wall_s", "ideal_s", "wall_over_ideal", "rows", "rows_wrong", "tickers_failed"]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    ok = (rows[0]["http_429"] == 0 and rows[1]["share_429"] < 0.05
          and not any(row["tickers_failed"] or row["rows_wrong"] for row in rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
