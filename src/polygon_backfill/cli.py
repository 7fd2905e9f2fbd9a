"""``polygon-backfill run | once | status | gaps | verify | report | sandbox``.

Exit codes: 0 success, 1 some tickers failed (``gaps``: holes found; ``verify``: mismatches
found), 2 invalid configuration, 3 API key rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.table import Table

from polygon_backfill.audit_commands import gaps_command, report_command, verify_command
from polygon_backfill.clock import ScaledClock
from polygon_backfill.config import DEFAULT_BASE_URL, Settings, load_settings
from polygon_backfill.errors import AuthenticationError, ConfigError, StorageError
from polygon_backfill.logging import configure_logging
from polygon_backfill.sandbox import SandboxConfig, SandboxServer, parse_faults, run_sandbox
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.storage import open_database
from polygon_backfill.summary import PairOutcome

log = structlog.get_logger(__name__)
# Wide enough for the status table when stdout is a pipe or a journal, not a terminal.
console = Console(width=None if sys.stdout.isatty() else 140)

SANDBOX_API_KEY = "sandbox-key"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polygon-backfill", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def universe_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--tickers", help="comma-separated, overrides TICKERS")
        command.add_argument("--timeframes", help="e.g. 1m,5m,1h,1d; overrides TIMEFRAMES")
        command.add_argument("--start", help="YYYY-MM-DD; overrides BACKFILL_START")
        command.add_argument("--days", type=int, help="days back; overrides BACKFILL_DAYS")
        command.add_argument("--base-url", help="overrides POLYGON_BASE_URL")

    def backfill_options(command: argparse.ArgumentParser) -> None:
        universe_options(command)
        mode = command.add_mutually_exclusive_group()
        mode.add_argument("--parallel", dest="parallel_backfill", action="store_const",
                          const=True, help="BACKFILL_MODE: pipeline (default) or the seed's "
                          "staggered groups (PARALLEL_BACKFILL=true)")
        mode.add_argument("--sequential", dest="parallel_backfill", action="store_const",
                          const=False, help="one ticker at a time (PARALLEL_BACKFILL=false)")
        command.add_argument("--with-sandbox", action="store_true",
                             help="start the local Polygon-compatible sandbox and use it")
        command.add_argument("--sandbox-data", type=Path,
                             help="CSV directory the --with-sandbox server serves")

    backfill_options(commands.add_parser("once", help="one backfill pass now, then exit"))
    backfill_options(commands.add_parser("run", help="the daemon: passes on the cron schedule"))
    commands.add_parser("status", help="bars, first, last and last result per pair")
    universe_options(commands.add_parser(
        "gaps", help="holes per ticker and timeframe: sessions expected against bars stored"))
    verify = commands.add_parser(
        "verify", help="fetch a random sample of stored sessions again and compare")
    universe_options(verify)
    verify.add_argument("--sample", type=_positive, default=20, help="sessions to check (20)")
    verify.add_argument("--seed", type=int, help="random seed, to repeat a sample")
    report = commands.add_parser(
        "report", help="coverage heatmap of tickers by day, as PNG and HTML")
    universe_options(report)
    report.add_argument("--out", type=Path, default=Path("reports"),
                        help="directory for coverage.png and coverage.html (reports/)")

    sandbox = commands.add_parser("sandbox", help="serve a local Polygon-compatible API")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8010)
    sandbox.add_argument("--data-dir", type=Path, help="CSV files {TICKER}.{timespan}.csv")
    sandbox.add_argument("--no-synthetic", action="store_true",
                         help="answer empty for tickers not in --data-dir")
    sandbox.add_argument("--rate-limit", help="N/SECONDS, e.g. 5/60 (Polygon's free plan)")
    sandbox.add_argument("--latency-ms", type=float, default=0.0)
    sandbox.add_argument("--api-key", help="require this key")
    sandbox.add_argument("--faults", help="inject faults, e.g. 429:0.05,500:0.05,timeout:0.02 "
                         "(kinds: 429 500 502 503 timeout truncated malformed status_error "
                         "null_results duplicates out_of_range invalid_bars extra_fields "
                         "next_url_loop foreign_host full_no_next reset 404 403 401)")
    sandbox.add_argument("--fault-seed", type=int, default=0)
    sandbox.add_argument("--time-scale", type=float, default=1.0,
                         help="run the rate-limit clock this many times faster")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    given = {"tickers": args.tickers, "timeframes": args.timeframes,
             "backfill_start": args.start, "backfill_days": args.days,
             "polygon_base_url": args.base_url,
             "parallel_backfill": getattr(args, "parallel_backfill", None)}
    return {key: value for key, value in given.items() if value is not None}


def _load(args: argparse.Namespace) -> Settings:
    settings = load_settings(**_overrides(args))
    if getattr(args, "with_sandbox", False) and not settings.polygon_api_key.get_secret_value():
        settings = settings.with_overrides(polygon_api_key=SANDBOX_API_KEY)
    if (not settings.polygon_api_key.get_secret_value()
            and settings.polygon_base_url == DEFAULT_BASE_URL):
        raise ConfigError("POLYGON_API_KEY: not set (put it in the environment or .env)")
    return settings


class _PrintedProgress:
    """One line per finished (ticker, timeframe): readable in a terminal and in journald."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def planned(self, pairs: int) -> None:
        self.total = pairs

    def pair_done(self, outcome: PairOutcome) -> None:
        self.done += 1
        state = (f"[green]ok[/] {outcome.inserted} new, {outcome.updated} changed"
                 if outcome.ok else f"[red]failed[/] {outcome.error}")
        console.print(f"[{self.done}/{self.total}] {outcome.ticker} {outcome.timeframe}: {state}",
                      highlight=False)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="Backfill summary")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key in ("bars_written", "bars_inserted", "bars_updated", "bars_rejected", "requests",
                "rate_limited", "api_seconds", "db_seconds", "total_seconds"):
        table.add_row(key, str(summary[key]))
    table.add_row("tickers ok", ", ".join(summary["tickers_ok"]) or "-")
    for ticker, error in summary["tickers_failed"].items():
        table.add_row(f"[red]{ticker} failed[/]", error)
    for pair, reason in summary["pairs_skipped"].items():
        table.add_row(f"[yellow]{pair} skipped[/]", reason)
    console.print(table)


async def _backfill(args: argparse.Namespace, settings: Settings, *, daemon: bool) -> int:
    async with AsyncExitStack() as stack:
        if args.with_sandbox:
            server = SandboxServer(SandboxConfig(data_dir=args.sandbox_data))
            await stack.enter_async_context(server)
            settings = settings.with_overrides(polygon_base_url=server.base_url)
            console.print(f"Sandbox serving on {server.base_url}", highlight=False)
        scheduler = AutoBackfillScheduler(
            settings=settings, progress=None if daemon else _PrintedProgress())
        try:
            if daemon:
                await scheduler.run_forever()
                return 0
            async with scheduler:
                summary = await scheduler.run_once()
        except AuthenticationError as exc:
            log.error("polygon.key_rejected", message=f"API key rejected, stopping: {exc}")
            return 3
        _print_summary(summary)
        return 1 if summary["tickers_failed"] else 0
    return 0


def _utc(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment else "-"


async def _status(settings: Settings) -> int:
    async with open_database(settings.database_dsn(), settings.embedded_pg_dir) as store:
        rows = await store.status()
        states = await store.service_states()
    table = Table(title="Backfill status (times in UTC)")
    for column in ("ticker", "timeframe", "bars", "first", "last", "last run", "last result"):
        table.add_column(column, justify="right" if column == "bars" else "left")
    for row in rows:
        result = row.last_result or "-"
        if row.last_error:
            result = f"[red]{row.last_error}[/]"
        table.add_row(row.ticker, row.timeframe, str(row.bars), _utc(row.first), _utc(row.last),
                      _utc(row.last_run_at), result)
    console.print(table)
    for state in states:
        colour = "green" if state.state == "closed" else "red"
        detail = f" (last error: {state.detail})" if state.detail else ""
        console.print(f"API {state.name}: [{colour}]{state.state}[/] since "
                      f"{_utc(state.updated_at)}{detail}", highlight=False)
    return 0


def _sandbox_config(args: argparse.Namespace) -> SandboxConfig:
    config = SandboxConfig(data_dir=args.data_dir, synthetic=not args.no_synthetic,
                           latency_s=args.latency_ms / 1000, api_key=args.api_key,
                           fault_seed=args.fault_seed)
    if args.time_scale != 1.0:
        try:
            config.monotonic = ScaledClock(args.time_scale).monotonic
        except ValueError as exc:
            raise ConfigError(f"--time-scale: {exc}") from None
    if args.faults:
        try:
            config.faults = parse_faults(args.faults)
        except ValueError as exc:
            raise ConfigError(f"--faults: {exc}") from None
    if args.rate_limit:
        count, _, period = args.rate_limit.partition("/")
        try:
            config.rate_limit, config.rate_period_s = int(count), float(period or 60)
        except ValueError:
            raise ConfigError(f"--rate-limit: {args.rate_limit!r} is not N/SECONDS") from None
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polygon-backfill`` console script and of ``main.py``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "sandbox":
            configure_logging(None, "INFO")
            run_sandbox(_sandbox_config(args), args.host, args.port)
            return 0
        if args.command in ("once", "run", "verify"):  # these call the API
            settings = _load(args)
        else:
            settings = load_settings(**_overrides(args)) if args.command != "status" \
                else load_settings()
        configure_logging(settings.log_file, settings.log_level, settings.secrets())
        if args.command == "status":
            return asyncio.run(_status(settings))
        if args.command == "gaps":
            return asyncio.run(gaps_command(settings, console))
        if args.command == "verify":
            return asyncio.run(verify_command(settings, console, sample=args.sample,
                                              seed=args.seed))
        if args.command == "report":
            return asyncio.run(report_command(settings, console, out_dir=args.out))
        return asyncio.run(_backfill(args, settings, daemon=args.command == "run"))
    except ConfigError as exc:
        print(f"polygon-backfill: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except AuthenticationError as exc:  # verify; once and run report it themselves
        print(f"polygon-backfill: API key rejected: {exc}", file=sys.stderr)
        return 3
    except StorageError as exc:  # PostgreSQL unreachable or refusing: one line, no trace
        print(f"polygon-backfill: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
