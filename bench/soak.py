"""Fault soak: a multi-ticker, multi-timeframe backfill while the sandbox injects a stated
rate of 429s, 5xx, timeouts and malformed bodies, and PostgreSQL is restarted once midway.
It must end with the table exactly equal to the source and no duplicates.

    .venv/bin/python -m bench.soak [--fault-rate 0.2] [--tickers 6] [--days 20]

The daemon's clock runs --time-scale times faster (backoff and DB-retry waits shrink with
it); HTTP timeouts stay real. The sandbox runs in this process so its data can be pinned to
one moment, which makes the final comparison exact.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from structlog.testing import capture_logs

from bench.harness import before_each_write, table_mismatches
from polygon_backfill.clock import ScaledClock
from polygon_backfill.logging import configure_logging
from polygon_backfill.sandbox import FaultKind, FaultRule, SandboxConfig, SandboxServer
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.storage import BarStore, EmbeddedPostgres

NOW = datetime(2026, 1, 9, 23, 0, tzinfo=UTC)
TICKERS = ["AAPL", "MSFT", "X:BTCUSD", "SPY", "NVDA", "X:ETHUSD", "QQQ", "TSLA"]
TIMEFRAMES = ["5m", "1h", "1d"]
FAULT_MIX = (FaultKind.RATE_LIMIT, FaultKind.SERVER_ERROR, FaultKind.TIMEOUT,
             FaultKind.TRUNCATED_JSON)


@dataclass
class SoakReport:
    """The figures the soak prints and the README records."""

    tickers: int
    timeframes: int
    days: int
    fault_rate: float
    requests: int
    retries: int
    faults_injected: dict[str, int]
    http_429: int
    db_restarts: int
    db_write_retries: int
    wall_s: float
    rows: int
    rows_wrong: int
    duplicate_keys: int
    tickers_failed: dict[str, str]

    @property
    def exact(self) -> bool:
        return not (self.rows_wrong or self.duplicate_keys or self.tickers_failed)


async def _restart_after(server: EmbeddedPostgres, writes: asyncio.Event, down_s: float) -> int:
    """Stop PostgreSQL once the first pages are in, keep it down ``down_s``, start it."""
    await writes.wait()
    await asyncio.to_thread(server.stop)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(server.start)
    return 1


async def soak(folder: Path, *, tickers: list[str], days: int, fault_rate: float,
               time_scale: float = 20.0, page_limit: int = 2_000,
               http_timeout_s: float = 1.0, down_s: float = 1.0) -> SoakReport:
    """Run the soak in ``folder`` (its own embedded PostgreSQL) and return its figures."""
    each = fault_rate / len(FAULT_MIX)
    faults = [FaultRule(kind, probability=each / (1 - i * each))
              for i, kind in enumerate(FAULT_MIX)]
    server = EmbeddedPostgres(folder / "pg")
    store = await BarStore.connect(await asyncio.to_thread(server.start))
    first_writes = asyncio.Event()

    async def tenth_write(count: int) -> None:
        if count == 10:
            first_writes.set()

    clock = ScaledClock(time_scale, start=NOW)
    sandbox = SandboxConfig(now=lambda: NOW, faults=faults, fault_seed=2026)
    try:
        async with SandboxServer(sandbox) as api:
            scheduler = AutoBackfillScheduler(
                polygon_api_key="soak-key", store=store, clock=clock,
                polygon_base_url=api.base_url, tickers=tickers, timeframes=TIMEFRAMES,
                backfill_days=days, page_limit=page_limit, trailing_window_days=0,
                stagger_seconds=0, group_pause_seconds=0, http_timeout_seconds=http_timeout_s,
                circuit_failure_threshold=50, db_retry_attempts=12)
            restart = asyncio.ensure_future(_restart_after(server, first_writes, down_s))
            started = time.perf_counter()
            with capture_logs() as logs, before_each_write(store, tenth_write):
                summary = await scheduler.run_once()
            wall = time.perf_counter() - started
            await scheduler.polygon_client.aclose()
            restarts = await restart if restart.done() else 0
            restart.cancel()
            injected = dict(api.faults_injected)
        rows, wrong = await table_mismatches(store, tickers, TIMEFRAMES,
                                             NOW - timedelta(days=days), NOW)
        duplicates = await store.duplicate_keys()
    finally:
        await store.close()
        await asyncio.to_thread(server.stop)
    events = [entry["event"] for entry in logs]
    return SoakReport(
        tickers=len(tickers), timeframes=len(TIMEFRAMES), days=days, fault_rate=fault_rate,
        requests=summary["requests"],
        retries=events.count("polygon.retrying") + events.count("polygon.rate_limited"),
        faults_injected=injected, http_429=summary["rate_limited"], db_restarts=restarts,
        db_write_retries=events.count("storage.retrying"), wall_s=round(wall, 2), rows=rows,
        rows_wrong=wrong, duplicate_keys=duplicates,
        tickers_failed=dict(summary["tickers_failed"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--tickers", type=int, default=6)
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--time-scale", type=float, default=20.0)
    args = parser.parse_args(argv)
    configure_logging(None, "ERROR")
    with tempfile.TemporaryDirectory(prefix="polygon-soak-") as folder:
        report = asyncio.run(soak(Path(folder), tickers=TICKERS[:args.tickers], days=args.days,
                                  fault_rate=args.fault_rate, time_scale=args.time_scale))
    for key, value in asdict(report).items():
        print(f"{key:>16}: {value}")
    print(f"{'exact':>16}: {report.exact}")
    return 0 if report.exact else 1


if __name__ == "__main__":
    sys.exit(main())
