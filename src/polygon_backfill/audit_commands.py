"""``polygon-backfill gaps | verify | report``: the table's completeness and exactness, shown.

Exit codes: 0 nothing found, 1 holes (``gaps``), mismatches or sessions the API did not
answer (``verify``).
"""

from __future__ import annotations

import random
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from polygon_backfill.audit import coverage_grid, find_gaps, verify_sample
from polygon_backfill.clock import SystemClock
from polygon_backfill.config import Settings
from polygon_backfill.report import write_report
from polygon_backfill.scheduler import client_for
from polygon_backfill.storage import BarStore, open_database

# Mismatches printed one per line beyond which only the count is shown.
_MISMATCHES_SHOWN = 200


def _store(settings: Settings) -> AbstractAsyncContextManager[BarStore]:
    return open_database(settings.database_dsn(), settings.embedded_pg_dir)


async def gaps_command(settings: Settings, console: Console) -> int:
    """List every configured pair's holes: sessions expected against bars stored."""
    now = datetime.now(UTC)
    async with _store(settings) as store:
        found = await find_gaps(store, settings, now)
    table = Table(title="Holes per ticker and timeframe (session dates)")
    for column in ("ticker", "timeframe", "sessions expected", "holes", "ranges"):
        table.add_column(column, justify="right" if column in ("sessions expected", "holes")
                         else "left")
    for pair in found:
        ranges = ", ".join(f"{first}" if first == last else f"{first}..{last} ({count})"
                           for first, last, count in pair.runs) or "-"
        holes = f"[red]{pair.missing}[/]" if pair.missing else "[green]0[/]"
        table.add_row(pair.ticker, pair.timeframe, str(pair.expected), holes, ranges)
    console.print(table)
    total = sum(pair.missing for pair in found)
    console.print(f"{total} hole(s) in {sum(1 for pair in found if pair.missing)} of "
                  f"{len(found)} pair(s)", highlight=False)
    return 1 if total else 0


async def verify_command(settings: Settings, console: Console, *, sample: int,
                         seed: int | None) -> int:
    """Fetch a random sample of stored sessions again and print every difference."""
    now = datetime.now(UTC)
    rng = random.Random(seed)
    async with _store(settings) as store, client_for(settings, SystemClock()) as client:
        result = await verify_sample(store, client, settings, now, sample, rng)
    for mismatch in result.mismatches[:_MISMATCHES_SHOWN]:
        console.print(f"[red]mismatch[/] {mismatch.describe()}", highlight=False)
    if len(result.mismatches) > _MISMATCHES_SHOWN:
        console.print(f"... and {len(result.mismatches) - _MISMATCHES_SHOWN} more",
                      highlight=False)
    for failure in result.failed:
        console.print(f"[yellow]not checked[/] {failure}", highlight=False)
    console.print(f"Verified {len(result.sessions) - len(result.failed)} session(s), "
                  f"{result.bars_compared} bar(s): {len(result.mismatches)} mismatch(es)"
                  + (f", {len(result.failed)} session(s) not answered" if result.failed else ""),
                  highlight=False)
    return 1 if result.mismatches or result.failed else 0


async def report_command(settings: Settings, console: Console, *, out_dir: Path) -> int:
    """Write the coverage heatmap as PNG and HTML."""
    now = datetime.now(UTC)
    async with _store(settings) as store:
        grid = await coverage_grid(store, settings, now)
    try:
        png, html = write_report(grid, out_dir)
    except OSError as exc:
        console.print(f"[red]Could not write the report to {out_dir}: {exc.strerror or exc}[/]",
                      highlight=False)
        return 1
    console.print(f"Wrote {png} and {html}", highlight=False)
    return 0
