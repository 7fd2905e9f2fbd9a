"""BarStore: bulk upsert of bars, coverage intervals and per-pair run results.

A page of bars and the coverage row that vouches for it are written on one connection in
one transaction, so a range is never marked fetched unless its bars are stored, and vice
versa. The bars go in as binary COPY: straight into ``bars`` when the page's key range
holds no stored bar yet (a backfill), else into a temporary staging table and from there
by ``INSERT ... ON CONFLICT`` (a re-fetch).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Final

import asyncpg
import numpy as np

from polygon_backfill.bar_columns import (
    SAFE_INTEGER,
    BarColumns,
    in_time_order,
    is_in_time_order,
)
from polygon_backfill.errors import StorageError
from polygon_backfill.models import (
    Bar,
    Split,
    Timeframe,
    TimeRange,
    merge_ranges,
    session_date,
    session_start,
)
from polygon_backfill.storage._errors import DATABASE_ERRORS, storage_error, storage_errors
from polygon_backfill.storage.schema import migrate

if TYPE_CHECKING:
    from polygon_backfill.coverage import Period

_CLOSE_TIMEOUT_S: Final = 10.0
_COMMAND_TIMEOUT_S: Final = 300.0
_LOCK_WAIT_S: Final = 7 * 86_400.0
# Held for a whole backfill pass: one pass at a time per database, across processes.
_BACKFILL_LOCK_ID: Final = 0x706F6C79_6A6F6273  # "polyjobs"

# Every column a page writes, in the order of the binary COPY rows; ``updated_at`` is
# left to its default (the transaction's time on the server).
_COPY_COLUMNS: Final = ("ticker", "timeframe", "bar_time", "session_date", "open", "high",
                        "low", "close", "volume", "vwap", "trades")

# Fast path for a range with no stored bar yet (an ordinary backfill): COPY straight into
# ``bars``. One index probe over the page's key range decides.
_ANY_STORED_IN: Final = """
SELECT EXISTS (
    SELECT 1 FROM bars
    WHERE ticker = $1 AND timeframe = $2 AND bar_time BETWEEN $3 AND $4)
"""

# One staging table per connection, created on its first merge and kept (temporary tables
# live as long as the session; the pool does not discard them): creating and dropping one
# per page costs catalog churn. Its rows vanish at the end of every transaction. Column
# types come from ``bars`` itself, so the two can never drift apart.
_CREATE_STAGING: Final = f"""
CREATE TEMP TABLE IF NOT EXISTS bars_staging ON COMMIT DELETE ROWS AS
SELECT {", ".join(_COPY_COLUMNS)} FROM bars WITH NO DATA
"""

# Rows go in key order so concurrent writers lock keys in the same order (no deadlocks).
# Rows identical to the stored ones are filtered out by a read-only join first: ON CONFLICT
# would lock (and WAL-log) each of them before its WHERE found nothing to change. The
# ON CONFLICT clause stays for keys another writer stores meanwhile, and its WHERE for rows
# another writer changed to our values meanwhile. ``$3``/``$4`` bound the page's key range
# so that only that slice of the pair is read.
_UPSERT_FROM_STAGING: Final = """
WITH upserted AS (
    INSERT INTO bars AS b (ticker, timeframe, bar_time, session_date,
                           open, high, low, close, volume, vwap, trades)
    SELECT $1, $2, s.bar_time, s.session_date,
           s.open, s.high, s.low, s.close, s.volume, s.vwap, s.trades
    FROM bars_staging AS s
    WHERE NOT EXISTS (
        SELECT 1 FROM bars AS x
        WHERE x.ticker = $1 AND x.timeframe = $2 AND x.bar_time BETWEEN $3 AND $4
          AND x.bar_time = s.bar_time
          AND (x.open, x.high, x.low, x.close, x.volume, x.vwap, x.trades)
              IS NOT DISTINCT FROM
              (s.open, s.high, s.low, s.close, s.volume, s.vwap, s.trades))
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

# A new fetch supersedes older coverage rows lying entirely inside it (one round trip).
_RECORD_COVERAGE: Final = """
WITH joined AS (
    DELETE FROM coverage
    WHERE ticker = $1 AND timeframe = $2 AND range_start <= $4 AND range_end >= $3
    RETURNING range_start, range_end
)
INSERT INTO coverage (ticker, timeframe, range_start, range_end, bar_count)
SELECT $1, $2, least($3, min(range_start)), greatest($4, max(range_end)), $5 FROM joined
"""

_SELECT_COVERAGE: Final = """
SELECT range_start, range_end FROM coverage
WHERE ticker = $1 AND timeframe = $2 AND range_end > range_start
ORDER BY range_start, range_end
"""

# What the plan needs of every pair, in two round trips whatever the number of pairs: the
# earliest stored bar (one index probe each) and the fetched ranges.
_FIRST_BARS: Final = """
SELECT p.ticker, p.timeframe,
       (SELECT min(bar_time) FROM bars b
        WHERE b.ticker = p.ticker AND b.timeframe = p.timeframe) AS first_bar
FROM unnest($1::text[], $2::text[]) AS p(ticker, timeframe)
"""
_SELECT_COVERAGE_OF: Final = """
SELECT ticker, timeframe, range_start, range_end FROM coverage
WHERE (ticker, timeframe) IN (SELECT * FROM unnest($1::text[], $2::text[]))
  AND range_end > range_start
"""

# A session with bars is no longer verified empty; one without, inside a fetched range, is.
_CLEAR_EMPTY_SESSIONS: Final = """
DELETE FROM empty_sessions WHERE ticker = $1 AND timeframe = $2 AND session_date = ANY($3)
"""
_MARK_EMPTY_SESSIONS: Final = """
INSERT INTO empty_sessions (ticker, timeframe, session_date)
SELECT $1, $2, day FROM unnest($3::date[]) AS day
ON CONFLICT (ticker, timeframe, session_date) DO UPDATE SET verified_at = now()
"""

# One index probe per session (not a scan of every bar): which of them hold a bar.
_SESSIONS_WITH_BARS: Final = """
SELECT s.day FROM unnest($3::date[], $4::timestamptz[], $5::timestamptz[]) AS s(day, lo, hi)
WHERE EXISTS (SELECT 1 FROM bars AS b WHERE b.ticker = $1 AND b.timeframe = $2
              AND b.bar_time >= s.lo AND b.bar_time < s.hi)
"""
_SELECT_EMPTY_SESSIONS: Final = """
SELECT session_date FROM empty_sessions
WHERE ticker = $1 AND timeframe = $2 AND session_date BETWEEN $3 AND $4
"""

_UPSERT_SPLITS: Final = """
INSERT INTO split_lists (ticker, splits, checked_at) VALUES ($1, $2::jsonb, $3)
ON CONFLICT (ticker) DO UPDATE SET splits = EXCLUDED.splits, checked_at = EXCLUDED.checked_at
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
WHERE ticker = $1 AND timeframe = $2 AND bar_time >= $3 AND bar_time < $4 ORDER BY bar_time
"""


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


# PostgreSQL's binary COPY format: a header, then per row a 16-bit field count and each
# field as a 32-bit length (-1 for NULL) and its bytes, then a -1 trailer. Timestamps are
# microseconds and dates days since 2000-01-01; float8 is IEEE big-endian, so exact.
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER: Final = b"\xff\xff"
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_MS: Final = 946_684_800_000
_PG_EPOCH_DAY: Final = date(2000, 1, 1).toordinal()
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_EVER: Final = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


@dataclass(frozen=True, slots=True)
class EncodedPage:
    """A deduplicated page as binary COPY data, with its row count, key range and the
    duplicates dropped. About a third of the memory of its bars, which can then be freed
    while the page waits for a writer."""

    payload: memoryview  # not bytes: asyncpg would take bytes for a file name
    count: int
    first: datetime
    last: datetime
    duplicates: int


@dataclass(frozen=True, slots=True)
class StoredPair:
    """What is stored of one pair, as the plan reads it: the earliest bar (None when it has
    none) and every range fetched so far, merged."""

    first_bar: datetime | None
    coverage: list[TimeRange]


@dataclass(frozen=True, slots=True)
class ReadyPage:
    """A fetched page made ready to write: its bars encoded, the span it vouches for, the
    sessions it vouches for with and without bars, and the bars the client dropped."""

    encoded: EncodedPage
    covered: TimeRange
    filled: Sequence[date]
    empty: Sequence[date]
    rejected: int


@functools.lru_cache(maxsize=256)
def _row_format(ticker_len: int, timeframe_len: int,
                present: tuple[bool, bool, bool, bool]) -> struct.Struct:
    """One row's binary COPY layout; ``present`` says which of session_date, volume, vwap
    and trades carry a value (a NULL is a bare -1 length)."""
    day, volume, vwap, trades = present
    return struct.Struct(
        f">h i{ticker_len}s i{timeframe_len}s iq" + ("ii" if day else "i") + "id" * 4
        + ("id" if volume else "i") + ("id" if vwap else "i") + ("iq" if trades else "i"))


def _pack_row(head: tuple[int, int, bytes, int, bytes], bar_time_us: int, day: int | None,
              bar: Bar) -> bytes:
    """Any row, NULLs included (indices, daily bars); the intraday loop inlines its
    common case."""
    optional = (bar.volume, bar.vwap, bar.trades)
    layout = _row_format(head[1], head[3], (day is not None,
                                            *(value is not None for value in optional)))
    args: list[object] = [*head, 8, bar_time_us]
    args += (4, day) if day is not None else (-1,)
    args += (8, bar.open, 8, bar.high, 8, bar.low, 8, bar.close)
    for value in optional:
        args += (8, value) if value is not None else (-1,)
    return layout.pack(*args)


def encode_page(ticker: str, timeframe: Timeframe, bars: Sequence[Bar]) -> EncodedPage:
    """:func:`_encode_page`, with a value no column can hold raised as a StorageError (as
    asyncpg would refuse it)."""
    try:
        return _encode_page(ticker, timeframe, bars)
    except (struct.error, OverflowError, TypeError) as exc:
        raise StorageError(f"writing {len(bars)} {timeframe.name} bars for {ticker} failed: "
                           f"a value PostgreSQL cannot store: {exc}") from exc


_Rows = tuple[bytes, int, datetime, datetime]
"""A page's COPY rows, their count, and the first and last key (the PostgreSQL epoch for
none)."""


def _encode_page(ticker: str, timeframe: Timeframe, bars: Sequence[Bar]) -> EncodedPage:
    """Deduplicate (a later bar replaces an earlier one with the same canonical time) and
    encode in key order, so that concurrent writers lock keys in the same order.

    Encoding ourselves skips a ``datetime`` per bar and asyncpg's per-value codec calls:
    the bulk of the Python time of a page. Keys are those of ``models.canonical_bar_time``:
    the bar's start for intraday bars, the session's local midnight for daily ones.
    """
    ticker_b, timeframe_b = ticker.encode(), timeframe.name.encode()
    if timeframe.is_daily:
        rows, count, first, last = _daily_rows(ticker, ticker_b, timeframe_b, bars)
    elif isinstance(bars, BarColumns) and is_in_time_order(bars):
        rows, count, first, last = _column_rows(ticker_b, timeframe_b, bars)
    else:
        rows, count, first, last = _intraday_rows(ticker_b, timeframe_b, bars)
    return EncodedPage(memoryview(b"".join((_COPY_HEADER, rows, _COPY_TRAILER))), count,
                       first, last, len(bars) - count)


def _daily_rows(ticker: str, ticker_b: bytes, timeframe_b: bytes,
                bars: Sequence[Bar]) -> _Rows:
    """Rows keyed by session date; the last bar of a session wins."""
    head = (len(_COPY_COLUMNS), len(ticker_b), ticker_b, len(timeframe_b), timeframe_b)
    by_day = {session_date(ticker, bar.t): bar for bar in bars}
    days = sorted(by_day)
    starts = [session_start(ticker, day) for day in days]
    rows = [_pack_row(head, (start - _PG_EPOCH) // _MICROSECOND,
                      day.toordinal() - _PG_EPOCH_DAY, by_day[day])
            for day, start in zip(days, starts, strict=True)]
    if not starts:
        return b"", 0, _PG_EPOCH, _PG_EPOCH
    return b"".join(rows), len(rows), starts[0], starts[-1]


def _intraday_rows(ticker_b: bytes, timeframe_b: bytes, bars: Sequence[Bar]) -> _Rows:
    """Rows of Bar objects, one per ``t`` (the last one wins), in time order."""
    head = (len(_COPY_COLUMNS), len(ticker_b), ticker_b, len(timeframe_b), timeframe_b)
    ordered = in_time_order(bars)
    pack = _row_format(head[1], head[3], (False, True, True, True)).pack
    rows: list[bytes] = []
    append = rows.append
    for bar in ordered:
        us = (bar.t - _PG_EPOCH_MS) * 1000
        if bar.volume is None or bar.vwap is None or bar.trades is None:
            append(_pack_row(head, us, None, bar))
            continue
        append(pack(*head, 8, us, -1, 8, bar.open, 8, bar.high, 8, bar.low,
                    8, bar.close, 8, bar.volume, 8, bar.vwap, 8, bar.trades))
    if not rows:
        return b"", 0, _PG_EPOCH, _PG_EPOCH
    return (b"".join(rows), len(rows), _UNIX_EPOCH + timedelta(milliseconds=ordered[0].t),
            _UNIX_EPOCH + timedelta(milliseconds=ordered[-1].t))


def _column_rows(ticker_b: bytes, timeframe_b: bytes, bars: BarColumns) -> _Rows:
    """Rows of an in-order page of columns, built as one numpy record array whose layout
    is the binary COPY row (big-endian lengths and values, -1 for a NULL): no Python
    loop per bar."""
    if not len(bars):
        return b"", 0, _PG_EPOCH, _PG_EPOCH
    if np.abs(bars.t).max() >= SAFE_INTEGER:  # the reader accepts no more either
        raise OverflowError(f"bar time {bars.t.max()} ms is out of range")
    optional = (("volume", ">f8"), ("vwap", ">f8"), ("trades", ">i8"))
    fields: list[tuple[str, str]] = [
        ("columns", ">i2"), ("ticker_len", ">i4"), ("ticker", f"S{len(ticker_b)}"),
        ("timeframe_len", ">i4"), ("timeframe", f"S{len(timeframe_b)}"),
        ("bar_time_len", ">i4"), ("bar_time", ">i8"), ("session_date_len", ">i4")]
    for name in ("open", "high", "low", "close"):
        fields += [(f"{name}_len", ">i4"), (name, ">f8")]
    for name, kind in optional:
        fields.append((f"{name}_len", ">i4"))
        if getattr(bars, name) is not None:
            fields.append((name, kind))
    rows = np.empty(len(bars), dtype=np.dtype(fields))
    rows["columns"] = len(_COPY_COLUMNS)
    rows["ticker_len"], rows["ticker"] = len(ticker_b), ticker_b
    rows["timeframe_len"], rows["timeframe"] = len(timeframe_b), timeframe_b
    rows["bar_time_len"], rows["session_date_len"] = 8, -1
    rows["bar_time"] = (bars.t - _PG_EPOCH_MS) * 1000
    for name in ("open", "high", "low", "close"):
        rows[f"{name}_len"], rows[name] = 8, getattr(bars, name)
    for name, _ in optional:
        column = getattr(bars, name)
        rows[f"{name}_len"] = -1 if column is None else 8
        if column is not None:
            rows[name] = column
    return (rows.tobytes(), len(bars), _UNIX_EPOCH + timedelta(milliseconds=int(bars.t[0])),
            _UNIX_EPOCH + timedelta(milliseconds=int(bars.t[-1])))


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
                # Commits do not wait for the WAL flush: a server crash can forget the last
                # few hundred milliseconds of pages, but each page and its coverage row share
                # one transaction, so what is forgotten is forgotten whole (never corrupt)
                # and the next run fetches it again. Writers stop idling on the disk.
                server_settings={"application_name": "polygon-backfill", "jit": "off",
                                 "synchronous_commit": "off"},
                # A statement hung on a dead server must fail (and be retried), not hold the
                # pass forever.
                command_timeout=_COMMAND_TIMEOUT_S)
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
                         covered: TimeRange, *, filled: Sequence[date] = (),
                         empty: Sequence[date] = ()) -> WriteResult:
        """Upsert one fetched page and record ``covered`` as fetched, all or nothing.

        An empty ``bars`` still records ``covered``: a verified-empty range is not a hole.
        A zero-length ``covered`` records nothing. Coverage rows lying inside ``covered``
        are replaced by it. ``filled`` and ``empty`` are the sessions the page vouches for
        with and without bars (``coverage.vouched_sessions``): the empty ones are marked
        verified, the filled ones lose any such mark.
        """
        return await self.write_ready(ticker, timeframe, ReadyPage(
            encode_page(ticker, timeframe, bars), covered, filled, empty, rejected=0))

    async def write_ready(self, ticker: str, timeframe: Timeframe,
                          ready: ReadyPage) -> WriteResult:
        """:meth:`write_page` for a page encoded beforehand (the pipeline encodes pages as
        they arrive, so the ones waiting for a writer hold bytes, not bar objects)."""
        tf, page, covered = timeframe.name, ready.encoded, ready.covered
        sessions = (ready.filled, ready.empty)
        try:
            async with self._pool.acquire() as conn:
                try:
                    inserted, updated = await self._write(conn, ticker, tf, page, covered,
                                                          sessions, fast=True)
                except asyncpg.UniqueViolationError:
                    # Another writer stored a key of this range after our probe (only the
                    # fast path's plain COPY can collide): redo the page as a merge.
                    inserted, updated = await self._write(conn, ticker, tf, page, covered,
                                                          sessions, fast=False)
        except DATABASE_ERRORS as exc:
            raise storage_error(f"writing {page.count} {tf} bars for {ticker}", exc) from exc
        return WriteResult(inserted=inserted, updated=updated,
                           unchanged=page.count - inserted - updated,
                           rejected_duplicates=page.duplicates)

    @staticmethod
    async def _write(conn: asyncpg.Connection, ticker: str, tf: str, page: EncodedPage,
                     covered: TimeRange, sessions: tuple[Sequence[date], Sequence[date]], *,
                     fast: bool) -> tuple[int, int]:
        """One transaction: the bars (COPY when ``fast`` and the range holds none yet, else
        staging and merge), the coverage row and the session marks. Returns (inserted,
        updated)."""
        inserted = updated = 0
        async with conn.transaction():
            if page.count:
                if fast and not await conn.fetchval(_ANY_STORED_IN, ticker, tf,
                                                    page.first, page.last):
                    await conn.copy_to_table("bars", source=page.payload,
                                             columns=_COPY_COLUMNS, format="binary")
                    inserted = page.count
                else:
                    await conn.execute(_CREATE_STAGING)
                    await conn.copy_to_table("bars_staging", source=page.payload,
                                             columns=_COPY_COLUMNS, format="binary")
                    counts = await conn.fetchrow(_UPSERT_FROM_STAGING, ticker, tf,
                                                 page.first, page.last)
                    inserted, updated = counts["inserted"], counts["updated"]
            if not covered.empty:
                await conn.execute(_RECORD_COVERAGE, ticker, tf, covered.start, covered.end,
                                   page.count)
                filled, empty = sessions
                if filled:
                    await conn.execute(_CLEAR_EMPTY_SESSIONS, ticker, tf, list(filled))
                if empty:
                    await conn.execute(_MARK_EMPTY_SESSIONS, ticker, tf, list(empty))
        return inserted, updated

    async def coverage(self, ticker: str, timeframe: Timeframe) -> list[TimeRange]:
        """Every range fetched so far, merged; the gaps between them are holes to fill."""
        with storage_errors(f"reading coverage of {ticker} {timeframe}"):
            rows = await self._pool.fetch(_SELECT_COVERAGE, ticker, timeframe.name)
        return merge_ranges(TimeRange(row["range_start"], row["range_end"]) for row in rows)

    async def stored_pairs(self, pairs: Sequence[tuple[str, Timeframe]]
                           ) -> dict[tuple[str, str], StoredPair]:
        """The earliest stored bar and :meth:`coverage` of many pairs at once, keyed by
        ``(ticker, timeframe name)``: a plan of hundreds of pairs costs two round trips."""
        tickers = [ticker for ticker, _ in pairs]
        names = [timeframe.name for _, timeframe in pairs]
        with storage_errors(f"reading the coverage of {len(pairs)} pair(s)"):
            async with self._pool.acquire() as conn:
                firsts = await conn.fetch(_FIRST_BARS, tickers, names)
                covered = await conn.fetch(_SELECT_COVERAGE_OF, tickers, names)
        ranges: dict[tuple[str, str], list[TimeRange]] = {}
        for row in covered:
            ranges.setdefault((row["ticker"], row["timeframe"]), []).append(
                TimeRange(row["range_start"], row["range_end"]))
        return {(row["ticker"], row["timeframe"]): StoredPair(
                    row["first_bar"], merge_ranges(ranges.get((row["ticker"], row["timeframe"]),
                                                              [])))
                for row in firsts}

    async def session_marks(self, ticker: str, timeframe: Timeframe,
                            periods: Sequence[Period]) -> tuple[set[date], set[date]]:
        """Of ``periods``, the session dates holding a bar and those verified empty."""
        if not periods:
            return set(), set()
        tf = timeframe.name
        with storage_errors(f"reading the sessions of {ticker} {timeframe}"):
            async with self._pool.acquire() as conn:
                held = await conn.fetch(
                    _SESSIONS_WITH_BARS, ticker, tf, [period.day for period in periods],
                    [period.keys.start for period in periods],
                    [period.keys.end for period in periods])
                empty = await conn.fetch(_SELECT_EMPTY_SESSIONS, ticker, tf,
                                         periods[0].day, periods[-1].day)
        return {row["day"] for row in held}, {row["session_date"] for row in empty}

    async def recorded_splits(self, ticker: str) -> list[Split] | None:
        """The ticker's splits as last checked, or None when never checked."""
        with storage_errors(f"reading the splits of {ticker}"):
            raw = await self._pool.fetchval(
                "SELECT splits::text FROM split_lists WHERE ticker = $1", ticker)
        if raw is None:
            return None
        return [Split(date.fromisoformat(day), float(from_), float(to))
                for day, from_, to in json.loads(raw)]

    async def save_splits(self, ticker: str, splits: Sequence[Split], at: datetime, *,
                          refetch_history: bool) -> None:
        """Remember ``splits``; with ``refetch_history``, forget every fetched range of the
        ticker in the same transaction, so the next plan asks for its whole history again
        (the stored bars stay until their re-fetched values replace them)."""
        payload = json.dumps([[split.execution_date.isoformat(), split.split_from,
                               split.split_to] for split in splits])
        with storage_errors(f"recording the splits of {ticker}"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(_UPSERT_SPLITS, ticker, payload, at)
                if refetch_history:
                    await conn.execute("DELETE FROM coverage WHERE ticker = $1", ticker)
                    await conn.execute("DELETE FROM empty_sessions WHERE ticker = $1", ticker)

    async def has_coverage(self, ticker: str) -> bool:
        """Whether anything of ``ticker`` was fetched yet (any timeframe)."""
        with storage_errors(f"reading coverage of {ticker}"):
            return bool(await self._pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM coverage WHERE ticker = $1)", ticker))

    async def oldest_write(self, ticker: str) -> datetime | None:
        """When the least recently written stored bar of ``ticker`` was written: a split
        after it may have left that bar's adjusted values stale."""
        with storage_errors(f"reading bars of {ticker}"):
            return await self._pool.fetchval(
                "SELECT min(updated_at) FROM bars WHERE ticker = $1", ticker)

    async def record_result(self, ticker: str, timeframe: Timeframe, *, ok: bool,
                            message: str, at: datetime) -> None:
        """Remember how the last run of this pair went; ``message`` is its error when not ok."""
        with storage_errors(f"recording the result of {ticker} {timeframe}"):
            await self._pool.execute(_UPSERT_RESULT, ticker, timeframe.name, at,
                                     "ok" if ok else "error", message,
                                     None if ok else message)

    async def status(self) -> list[PairStatus]:
        """Every pair with bars, coverage or a recorded result, sorted by ticker, timeframe."""
        with storage_errors("reading status"):
            rows = await self._pool.fetch(_SELECT_STATUS)
        return [PairStatus(**dict(row)) for row in rows]

    async def fetch_bars(self, ticker: str, timeframe: Timeframe, start: datetime = _EVER[0],
                         end: datetime = _EVER[1]) -> list[StoredBar]:
        """Stored bars of a pair with keys in ``[start, end)`` (all by default), in time
        order (for ``verify``, exports and tests)."""
        with storage_errors(f"reading bars of {ticker} {timeframe}"):
            rows = await self._pool.fetch(_SELECT_BARS, ticker, timeframe.name, start, end)
        return [StoredBar(*row) for row in rows]

    @asynccontextmanager
    async def backfill_lock(self, on_wait: Callable[[], None]) -> AsyncIterator[None]:
        """Hold the database-wide backfill lock (a session advisory lock on a dedicated
        connection) for one pass, so two daemons never backfill one database at once.
        ``on_wait`` is called once when another holder makes us wait."""
        with storage_errors("taking the backfill lock"):
            conn = await self._pool.acquire()
        try:
            try:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _BACKFILL_LOCK_ID):
                    on_wait()
                    # Waiting for another daemon's pass is not a hung statement.
                    await conn.execute("SELECT pg_advisory_lock($1)", _BACKFILL_LOCK_ID,
                                       timeout=_LOCK_WAIT_S)
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
        with storage_errors(f"recording the {name} state"):
            await self._pool.execute(_UPSERT_SERVICE_STATE, name, state, detail, at)

    async def service_states(self) -> list[ServiceState]:
        """Every recorded process-wide state, by name."""
        with storage_errors("reading service states"):
            rows = await self._pool.fetch(_SELECT_SERVICE_STATES)
        return [ServiceState(row["name"], row["state"], row["detail"], row["updated_at"])
                for row in rows]

    async def duplicate_keys(self) -> int:
        """Rows sharing a (ticker, timeframe, session) with another row: always 0 unless the
        keying by session date is broken. The soak and ``verify`` check it."""
        with storage_errors("counting duplicate bars"):
            return int(await self._pool.fetchval(_COUNT_DUPLICATE_SESSIONS))
