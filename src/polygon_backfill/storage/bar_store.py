"""BarStore: bulk upsert of bars, coverage intervals and per-pair run results.

A page of bars and the coverage row that vouches for it are written on one connection in
one transaction (COPY into a temporary staging table, then ``INSERT ... ON CONFLICT`` from
it), so a range is never marked fetched unless its bars are stored, and vice versa.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Final

import asyncpg

from polygon_backfill.models import (
    Bar,
    Timeframe,
    TimeRange,
    merge_ranges,
    ms_to_datetime,
    session_date,
    session_start,
)
from polygon_backfill.storage._errors import DATABASE_ERRORS, storage_error
from polygon_backfill.storage.schema import migrate

_CLOSE_TIMEOUT_S: Final = 10.0
# Held for a whole backfill pass: one pass at a time per database, across processes.
_BACKFILL_LOCK_ID: Final = 0x706F6C79_6A6F6273  # "polyjobs"

_STAGING_COLUMNS: Final = ("bar_time", "session_date", "open", "high", "low", "close",
                           "volume", "vwap", "trades")

# Column types come from ``bars`` itself, so the two can never drift apart.
_CREATE_STAGING: Final = f"""
CREATE TEMP TABLE bars_staging ON COMMIT DROP AS
SELECT {", ".join(_STAGING_COLUMNS)} FROM bars WITH NO DATA
"""

# Rows go in key order so concurrent writers lock keys in the same order (no deadlocks).
# An identical re-write matches the WHERE of no row: not touched, not returned.
_UPSERT_FROM_STAGING: Final = """
WITH upserted AS (
    INSERT INTO bars AS b (ticker, timeframe, bar_time, session_date,
                           open, high, low, close, volume, vwap, trades)
    SELECT $1, $2, s.bar_time, s.session_date,
           s.open, s.high, s.low, s.close, s.volume, s.vwap, s.trades
    FROM bars_staging AS s
    ORDER BY s.bar_time
    ON CONFLICT (ticker, timeframe, bar_time) DO UPDATE SET
        session_date = EXCLUDED.session_date,
        open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
        close = EXCLUDED.close, volume = EXCLUDED.volume, vwap = EXCLUDED.vwap,
        trades = EXCLUDED.trades, updated_at = now()
    WHERE (b.open, b.high, b.low, b.close, b.volume, b.vwap, b.trades)
          IS DISTINCT FROM
          (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close,
           EXCLUDED.volume, EXCLUDED.vwap, EXCLUDED.trades)
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted) AS inserted,
       count(*) FILTER (WHERE NOT inserted) AS updated
FROM upserted
"""

# A new fetch supersedes older coverage rows lying entirely inside it.
_DROP_SUPERSEDED_COVERAGE: Final = """
DELETE FROM coverage
WHERE ticker = $1 AND timeframe = $2 AND range_start >= $3 AND range_end <= $4
"""

_INSERT_COVERAGE: Final = """
INSERT INTO coverage (ticker, timeframe, range_start, range_end, bar_count)
VALUES ($1, $2, $3, $4, $5)
"""

_SELECT_COVERAGE: Final = """
SELECT range_start, range_end FROM coverage
WHERE ticker = $1 AND timeframe = $2 AND range_end > range_start
ORDER BY range_start, range_end
"""

_UPSERT_RESULT: Final = """
INSERT INTO pair_status (ticker, timeframe, last_run_at, last_result, last_message, last_error)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (ticker, timeframe) DO UPDATE SET
    last_run_at = EXCLUDED.last_run_at, last_result = EXCLUDED.last_result,
    last_message = EXCLUDED.last_message, last_error = EXCLUDED.last_error
"""

_SELECT_STATUS: Final = """
WITH counted AS (
    SELECT ticker, timeframe, count(*) AS bars, min(bar_time) AS first, max(bar_time) AS last
    FROM bars GROUP BY ticker, timeframe
), pairs AS (
    SELECT ticker, timeframe FROM counted
    UNION SELECT ticker, timeframe FROM coverage
    UNION SELECT ticker, timeframe FROM pair_status
)
SELECT p.ticker, p.timeframe, coalesce(c.bars, 0) AS bars, c.first, c.last,
       s.last_result, s.last_error, s.last_run_at
FROM pairs AS p
LEFT JOIN counted AS c USING (ticker, timeframe)
LEFT JOIN pair_status AS s USING (ticker, timeframe)
ORDER BY p.ticker, p.timeframe
"""

_UPSERT_SERVICE_STATE: Final = """
INSERT INTO service_state (name, state, detail, updated_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE
SET state = EXCLUDED.state, detail = EXCLUDED.detail, updated_at = EXCLUDED.updated_at
"""

_SELECT_SERVICE_STATES: Final = """
SELECT name, state, detail, updated_at FROM service_state ORDER BY name
"""

_COUNT_DUPLICATE_SESSIONS: Final = """
SELECT count(*) FROM (
    SELECT 1 FROM bars GROUP BY ticker, timeframe, coalesce(session_date::text, bar_time::text)
    HAVING count(*) > 1
) AS duplicated
"""

_SELECT_BARS: Final = """
SELECT bar_time, open, high, low, close, volume, vwap, trades FROM bars
WHERE ticker = $1 AND timeframe = $2 ORDER BY bar_time
"""

_Row = tuple[datetime, date | None, float, float, float, float,
             float | None, float | None, int | None]


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one page did to ``bars``: new rows, changed rows, identical re-writes, and
    in-batch duplicates dropped before the upsert (the last occurrence won)."""

    inserted: int
    updated: int
    unchanged: int
    rejected_duplicates: int


@dataclass(frozen=True, slots=True)
class PairStatus:
    """One (ticker, timeframe) as ``status`` shows it."""

    ticker: str
    timeframe: str
    bars: int
    first: datetime | None
    last: datetime | None
    last_result: str | None
    last_error: str | None
    last_run_at: datetime | None


@dataclass(frozen=True, slots=True)
class ServiceState:
    """A process-wide state shown by ``status``, such as the API circuit breaker's."""

    name: str
    state: str
    detail: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class StoredBar:
    """A bar as stored, under its canonical time."""

    bar_time: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float | None
    vwap: float | None
    trades: int | None


def _dedupe(ticker: str, timeframe: Timeframe, bars: Sequence[Bar]) -> list[_Row]:
    """Staging rows keyed by canonical bar time; a later bar replaces an earlier one.

    Same keys as ``models.canonical_bar_time``, with the daily/intraday branch taken once
    per page rather than per bar.
    """
    rows: dict[datetime, _Row] = {}
    if timeframe.is_daily:
        for bar in bars:
            day = session_date(ticker, bar.t)
            key = session_start(ticker, day)
            rows[key] = (key, day, bar.open, bar.high, bar.low, bar.close,
                         bar.volume, bar.vwap, bar.trades)
    else:
        for bar in bars:
            key = ms_to_datetime(bar.t)
            rows[key] = (key, None, bar.open, bar.high, bar.low, bar.close,
                         bar.volume, bar.vwap, bar.trades)
    return list(rows.values())


class BarStore:
    """The daemon's only door to PostgreSQL. Every database failure leaves as StorageError."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> BarStore:
        """Open a pool and migrate the schema, so a returned store is ready to write."""
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size,
                # Short OLTP statements only: JIT compilation would cost more than it saves.
                server_settings={"application_name": "polygon-backfill", "jit": "off"})
        except DATABASE_ERRORS as exc:
            raise storage_error("connecting to PostgreSQL", exc, dsn=dsn) from exc
        except ValueError as exc:  # asyncpg refuses a malformed DSN this way
            raise storage_error("parsing DATABASE_URL", exc, dsn=dsn) from exc
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except DATABASE_ERRORS as exc:
            pool.terminate()
            raise storage_error("migrating the schema", exc, dsn=dsn) from exc
        return cls(pool)

    async def close(self) -> None:
        """Wait for borrowed connections to come back, but not forever."""
        try:
            await asyncio.wait_for(self._pool.close(), timeout=_CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._pool.terminate()

    async def write_page(self, ticker: str, timeframe: Timeframe, bars: Sequence[Bar],
                         covered: TimeRange) -> WriteResult:
        """Upsert one fetched page and record ``covered`` as fetched, all or nothing.

        An empty ``bars`` still records ``covered``: a verified-empty range is not a hole.
        A zero-length ``covered`` records nothing. Coverage rows lying inside ``covered``
        are replaced by it.
        """
        rows = _dedupe(ticker, timeframe, bars)
        tf = timeframe.name
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                inserted = updated = 0
                if rows:
                    await conn.execute(_CREATE_STAGING)
                    await conn.copy_records_to_table(
                        "bars_staging", records=rows, columns=_STAGING_COLUMNS)
                    counts = await conn.fetchrow(_UPSERT_FROM_STAGING, ticker, tf)
                    inserted, updated = counts["inserted"], counts["updated"]
                if not covered.empty:
                    await conn.execute(_DROP_SUPERSEDED_COVERAGE,
                                       ticker, tf, covered.start, covered.end)
                    await conn.execute(_INSERT_COVERAGE,
                                       ticker, tf, covered.start, covered.end, len(rows))
        except DATABASE_ERRORS as exc:
            raise storage_error(f"writing {len(rows)} {tf} bars for {ticker}", exc) from exc
        return WriteResult(inserted=inserted, updated=updated,
                           unchanged=len(rows) - inserted - updated,
                           rejected_duplicates=len(bars) - len(rows))

    async def coverage(self, ticker: str, timeframe: Timeframe) -> list[TimeRange]:
        """Every range fetched so far, merged; the gaps between them are holes to fill."""
        try:
            rows = await self._pool.fetch(_SELECT_COVERAGE, ticker, timeframe.name)
        except DATABASE_ERRORS as exc:
            raise storage_error(f"reading coverage of {ticker} {timeframe}", exc) from exc
        return merge_ranges(TimeRange(row["range_start"], row["range_end"]) for row in rows)

    async def last_bar_time(self, ticker: str, timeframe: Timeframe) -> datetime | None:
        """The newest stored bar's canonical time, None when there is none."""
        try:
            value: datetime | None = await self._pool.fetchval(
                "SELECT max(bar_time) FROM bars WHERE ticker = $1 AND timeframe = $2",
                ticker, timeframe.name)
        except DATABASE_ERRORS as exc:
            raise storage_error(f"reading the last bar of {ticker} {timeframe}", exc) from exc
        return value

    async def record_result(self, ticker: str, timeframe: Timeframe, *, ok: bool,
                            message: str, at: datetime) -> None:
        """Remember how the last run of this pair went; ``message`` is its error when not ok."""
        try:
            await self._pool.execute(_UPSERT_RESULT, ticker, timeframe.name, at,
                                     "ok" if ok else "error", message,
                                     None if ok else message)
        except DATABASE_ERRORS as exc:
            raise storage_error(f"recording the result of {ticker} {timeframe}", exc) from exc

    async def status(self) -> list[PairStatus]:
        """Every pair with bars, coverage or a recorded result, sorted by ticker, timeframe."""
        try:
            rows = await self._pool.fetch(_SELECT_STATUS)
        except DATABASE_ERRORS as exc:
            raise storage_error("reading status", exc) from exc
        return [PairStatus(**dict(row)) for row in rows]

    async def fetch_bars(self, ticker: str, timeframe: Timeframe) -> list[StoredBar]:
        """All stored bars of a pair in time order (for checks, exports and tests)."""
        try:
            rows = await self._pool.fetch(_SELECT_BARS, ticker, timeframe.name)
        except DATABASE_ERRORS as exc:
            raise storage_error(f"reading bars of {ticker} {timeframe}", exc) from exc
        return [StoredBar(*row) for row in rows]

    @asynccontextmanager
    async def backfill_lock(self, on_wait: Callable[[], None]) -> AsyncIterator[None]:
        """Hold the database-wide backfill lock (a session advisory lock on a dedicated
        connection) for one pass, so two daemons never backfill one database at once.
        ``on_wait`` is called once when another holder makes us wait."""
        try:
            conn = await self._pool.acquire()
        except DATABASE_ERRORS as exc:
            raise storage_error("taking the backfill lock", exc) from exc
        try:
            try:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _BACKFILL_LOCK_ID):
                    on_wait()
                    await conn.execute("SELECT pg_advisory_lock($1)", _BACKFILL_LOCK_ID)
            except DATABASE_ERRORS as exc:
                raise storage_error("taking the backfill lock", exc) from exc
            try:
                yield
            finally:
                with contextlib.suppress(*DATABASE_ERRORS):
                    await conn.execute("SELECT pg_advisory_unlock($1)", _BACKFILL_LOCK_ID)
        finally:
            await self._pool.release(conn)

    async def record_service_state(self, name: str, state: str, detail: str | None,
                                   at: datetime) -> None:
        """Remember a process-wide state (e.g. ``circuit`` = ``open``) for ``status``."""
        try:
            await self._pool.execute(_UPSERT_SERVICE_STATE, name, state, detail, at)
        except DATABASE_ERRORS as exc:
            raise storage_error(f"recording the {name} state", exc) from exc

    async def service_states(self) -> list[ServiceState]:
        """Every recorded process-wide state, by name."""
        try:
            rows = await self._pool.fetch(_SELECT_SERVICE_STATES)
        except DATABASE_ERRORS as exc:
            raise storage_error("reading service states", exc) from exc
        return [ServiceState(row["name"], row["state"], row["detail"], row["updated_at"])
                for row in rows]

    async def duplicate_keys(self) -> int:
        """Rows sharing a (ticker, timeframe, session) with another row: always 0 unless the
        keying by session date is broken. The soak and ``verify`` check it."""
        try:
            return int(await self._pool.fetchval(_COUNT_DUPLICATE_SESSIONS))
        except DATABASE_ERRORS as exc:
            raise storage_error("counting duplicate bars", exc) from exc
