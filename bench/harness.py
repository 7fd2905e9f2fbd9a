"""What the benchmarks and their short test versions share: a database per scenario, the
sandbox, one backfill pass, and the check that the table equals the source exactly."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from polygon_backfill.clients import PolygonClient
from polygon_backfill.clock import Clock
from polygon_backfill.models import Timeframe
from polygon_backfill.planner import align_start
from polygon_backfill.sandbox import SandboxConfig, SandboxServer
from polygon_backfill.scheduler import AutoBackfillScheduler
from polygon_backfill.storage import BarStore, EmbeddedPostgres


@asynccontextmanager
async def postgres_server(admin_url: str | None = None) -> AsyncIterator[str]:
    """An admin DSN: ``admin_url`` or ``TEST_DATABASE_URL`` if set, else an embedded server
    in a temporary directory for the duration."""
    given = admin_url or os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="polygon-bench-") as folder:
        server = EmbeddedPostgres(Path(folder) / "pg")
        try:
            yield await asyncio.to_thread(server.start)
        finally:
            await asyncio.to_thread(server.stop)


@asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new empty database on the admin URL's server, dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlsplit(admin_url)._replace(path=f"/{name}").geturl()
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def sandbox_process(*options: str) -> AsyncIterator[str]:
    """``polygon-backfill sandbox`` in its own process (so its clock and its CPU are not the
    daemon's); yields its base URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "polygon_backfill.cli", "sandbox", "--port", "0", *options,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        if not line.startswith(b"Polygon sandbox listening on "):
            raise RuntimeError(f"the sandbox did not start: {line!r}")
        yield line.decode().rsplit(" ", 1)[-1].strip()
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


@dataclass
class PassResult:
    """One backfill pass: the daemon's summary and the wall time it took."""

    summary: dict[str, Any]
    wall_s: float


async def backfill_pass(store: BarStore, base_url: str, clock: Clock,
                        **settings: Any) -> PassResult:
    """One pass of the scheduler against the API at ``base_url``."""
    scheduler = AutoBackfillScheduler(polygon_api_key="bench-key", store=store, clock=clock,
                                      polygon_base_url=base_url, **settings)
    started = time.perf_counter()
    try:
        summary = await scheduler.run_once()
    finally:
        await scheduler.polygon_client.aclose()
    return PassResult(summary, time.perf_counter() - started)


async def table_mismatches(store: BarStore, tickers: Sequence[str], timeframes: Sequence[str],
                           start: datetime, now: datetime) -> tuple[int, int]:
    """(rows stored, rows differing from a fault-free sandbox) over every pair."""
    stored = mismatched = 0
    async with SandboxServer(SandboxConfig(now=lambda: now)) as clean, \
            PolygonClient("bench-key", clean.base_url) as client:
        for ticker in tickers:
            for name in timeframes:
                timeframe = Timeframe.parse(name)
                source = await client.fetch_range(
                    ticker, timeframe, align_start(ticker, timeframe, start), now)
                expected = {(b.t, b.open, b.high, b.low, b.close, b.volume) for b in source}
                rows = await store.fetch_bars(ticker, timeframe)
                got = {(int(r.bar_time.timestamp() * 1000), r.open, r.high, r.low, r.close,
                        r.volume) for r in rows}
                stored += len(rows)
                mismatched += len(expected ^ got) + (len(rows) - len(got))
    return stored, mismatched


@contextmanager
def before_each_write(store: BarStore,
                      hook: Callable[[int], Awaitable[None]]) -> Iterator[list[int]]:
    """Await ``hook(n)`` before the store's n-th page write (n from 1): how a test or the
    soak stops, cancels or breaks a run at a chosen page. Yields the live count; restores
    the store on exit. Every write, encoded before or not, goes through ``write_ready``."""
    original = store.write_ready
    count = [0]

    async def write_ready(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        await hook(count[0])
        return await original(*args, **kwargs)

    store.write_ready = write_ready  # type: ignore[method-assign]
    try:
        yield count
    finally:
        store.write_ready = original  # type: ignore[method-assign]
