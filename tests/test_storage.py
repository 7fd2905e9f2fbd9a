"""The storage layer against a real PostgreSQL (embedded, or TEST_DATABASE_URL): never mocked."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import pytest

from polygon_backfill.errors import StorageError
from polygon_backfill.models import Bar, Timeframe, TimeRange, datetime_to_ms, merge_ranges
from polygon_backfill.storage import (
    BarStore,
    PairStatus,
    StoredBar,
    StoredPair,
    WriteResult,
    migrate,
    open_database,
    schema_version,
)
from polygon_backfill.storage._errors import redact
from polygon_backfill.storage.schema import MIGRATIONS

M1 = Timeframe.parse("1m")
D1 = Timeframe.parse("1d")


def utc(text: str) -> datetime:
    """An aware UTC datetime from ``YYYY-MM-DD[ HH:MM]``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def ms(text: str) -> int:
    return datetime_to_ms(utc(text))


def span(start: str, end: str) -> TimeRange:
    return TimeRange(utc(start), utc(end))


def bar(t: int, price: float = 100.0, **fields: float | int | None) -> Bar:
    values: dict[str, float | int | None] = {
        "open": price, "high": price + 1, "low": price - 1, "close": price + 0.5,
        "volume": 1000.0, "vwap": price + 0.25, "trades": 10}
    values.update(fields)
    return Bar(t, **values)  # type: ignore[arg-type]


def minute_bars(start: str, count: int, price: float = 100.0) -> list[Bar]:
    first = ms(start)
    return [bar(first + i * 60_000, price + i / 100) for i in range(count)]


# --- schema ---------------------------------------------------------------------------


async def test_migrate_twice_is_a_noop(database_url: str) -> None:
    """A second migrate applies nothing and leaves the recorded history alone."""
    conn = await asyncpg.connect(database_url)
    try:
        assert await schema_version(conn) == 0
        await migrate(conn)
        first = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
        await migrate(conn)
        second = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
        assert first == second
        assert [row["version"] for row in first] == [m[0] for m in MIGRATIONS]
        assert await schema_version(conn) == MIGRATIONS[-1][0]
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_version_once(database_url: str) -> None:
    """Two daemons starting together serialise on the advisory lock instead of failing."""
    conns = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(migrate(conn) for conn in conns))
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(MIGRATIONS)
    finally:
        for conn in conns:
            await conn.close()


# --- values and keys ------------------------------------------------------------------


async def test_write_then_fetch_returns_exact_values(bar_store: BarStore) -> None:
    """float8 round-trips bit for bit; index bars keep volume, vwap and trades as None."""
    stock = [
        Bar(ms("2019-11-05 14:30"), 0.1 + 0.2, 257.49, 1e-9, 2.168571, 1.029145e06, 256.7, 1),
        Bar(ms("2019-11-05 14:31"), 100, 101, 99, 100, 3, None, None),  # ints are fine too
    ]
    index = [Bar(ms("2019-11-05 14:30"), 3080.8, 3081.47, 3080.3, 3080.49)]
    result = await bar_store.write_page("AAPL", M1, stock, span("2019-11-05 14:30",
                                                               "2019-11-05 14:32"))
    await bar_store.write_page("I:SPX", M1, index, span("2019-11-05 14:30", "2019-11-05 14:31"))

    assert result == WriteResult(inserted=2, updated=0, unchanged=0, rejected_duplicates=0)
    assert await bar_store.fetch_bars("AAPL", M1) == [
        StoredBar(utc("2019-11-05 14:30"), 0.1 + 0.2, 257.49, 1e-9, 2.168571, 1029145.0,
                  256.7, 1),
        StoredBar(utc("2019-11-05 14:31"), 100.0, 101.0, 99.0, 100.0, 3.0, None, None),
    ]
    assert await bar_store.fetch_bars("I:SPX", M1) == [
        StoredBar(utc("2019-11-05 14:30"), 3080.8, 3081.47, 3080.3, 3080.49, None, None, None)]


async def test_grouped_and_per_ticker_daily_bars_share_one_row(
        bar_store: BarStore, database_url: str) -> None:
    """Grouped daily (16:00 NY) and per-ticker daily (00:00 NY) of one session: one row,
    the later write's values win (pitfall 7)."""
    session = span("2023-01-03 05:00", "2023-01-04 05:00")
    grouped = bar(ms("2023-01-03 21:00"), 130.0)  # 16:00 EST
    per_ticker = bar(ms("2023-01-03 05:00"), 125.07)  # 00:00 EST
    await bar_store.write_page("AAPL", D1, [grouped], session)
    result = await bar_store.write_page("AAPL", D1, [per_ticker], session)

    assert result == WriteResult(inserted=0, updated=1, unchanged=0, rejected_duplicates=0)
    stored = await bar_store.fetch_bars("AAPL", D1)
    assert [(b.bar_time, b.open) for b in stored] == [(utc("2023-01-03 05:00"), 125.07)]
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT session_date FROM bars") == date(2023, 1, 3)
    finally:
        await conn.close()


async def test_daily_bars_across_the_2005_dst_change_keep_their_dates(
        bar_store: BarStore, database_url: str) -> None:
    """05:00 UTC (EST) and 04:00 UTC (EDT) are both New York midnight; crypto stays on UTC."""
    friday, monday = ms("2005-04-01 05:00"), ms("2005-04-04 04:00")  # DST began 2005-04-03
    await bar_store.write_page("AAPL", D1, [bar(friday), bar(monday)],
                               span("2005-04-01 05:00", "2005-04-05 04:00"))
    # Grouped-daily stamps of the same sessions (16:00 NY) land on the same rows.
    await bar_store.write_page("AAPL", D1, [bar(ms("2005-04-01 21:00"), 1.0),
                                            bar(ms("2005-04-04 20:00"), 2.0)],
                               span("2005-04-01 05:00", "2005-04-05 04:00"))
    await bar_store.write_page("X:BTCUSD", D1, [bar(ms("2005-04-03 00:00"))],
                               span("2005-04-03", "2005-04-04"))

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT ticker, bar_time, session_date, open FROM bars ORDER BY ticker, bar_time")
    finally:
        await conn.close()
    assert [tuple(row) for row in rows] == [
        ("AAPL", utc("2005-04-01 05:00"), date(2005, 4, 1), 1.0),
        ("AAPL", utc("2005-04-04 04:00"), date(2005, 4, 4), 2.0),
        ("X:BTCUSD", utc("2005-04-03 00:00"), date(2005, 4, 3), 100.0),
    ]


async def test_intraday_rows_have_no_session_date(bar_store: BarStore, database_url: str) -> None:
    """session_date is for daily and weekly bars only."""
    await bar_store.write_page("AAPL", M1, minute_bars("2024-01-02 14:30", 2),
                               span("2024-01-02 14:30", "2024-01-02 14:32"))
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(session_date) FROM bars") == 0
    finally:
        await conn.close()


# --- upsert semantics -----------------------------------------------------------------


async def test_in_batch_duplicates_last_wins_and_are_counted(bar_store: BarStore) -> None:
    """Upstream repeats a timestamp with other values: one row, the last value (pitfall 5)."""
    t = ms("2024-01-02 14:30")
    page = [bar(t, 1.0), bar(t + 60_000, 5.0), bar(t, 2.0), bar(t, 3.0)]
    result = await bar_store.write_page("AAPL", M1, page,
                                        span("2024-01-02 14:30", "2024-01-02 14:32"))
    assert result == WriteResult(inserted=2, updated=0, unchanged=0, rejected_duplicates=2)
    assert [b.open for b in await bar_store.fetch_bars("AAPL", M1)] == [3.0, 5.0]


async def test_rewrite_updates_changed_rows_and_leaves_identical_ones(
        bar_store: BarStore, database_url: str) -> None:
    """A re-fetch replaces corrected values (pitfall 6); identical bars are not touched."""
    covered = span("2024-01-02 14:30", "2024-01-02 14:33")
    page = minute_bars("2024-01-02 14:30", 3)
    assert await bar_store.write_page("AAPL", M1, page, covered) == WriteResult(3, 0, 0, 0)
    before = await _updated_at(database_url)

    corrected = [page[0], bar(page[1].t, 50.0), Bar(page[2].t, *_ohlc(page[2]), None, None,
                                                     None)]
    assert await bar_store.write_page("AAPL", M1, corrected, covered) == WriteResult(0, 2, 1, 0)
    after = await _updated_at(database_url)
    assert after[0] == before[0]
    assert after[1] > before[1]
    assert after[2] > before[2]

    assert await bar_store.write_page("AAPL", M1, corrected, covered) == WriteResult(0, 0, 3, 0)
    assert await _updated_at(database_url) == after
    stored = await bar_store.fetch_bars("AAPL", M1)
    assert stored[1].open == 50.0
    assert (stored[2].volume, stored[2].vwap, stored[2].trades) == (None, None, None)


def _ohlc(b: Bar) -> tuple[float, float, float, float]:
    return b.open, b.high, b.low, b.close


async def _updated_at(database_url: str) -> list[datetime]:
    conn = await asyncpg.connect(database_url)
    try:
        return [row[0] for row in await conn.fetch("SELECT updated_at FROM bars ORDER BY bar_time")]
    finally:
        await conn.close()


async def test_concurrent_pages_of_one_pair_all_land(bar_store: BarStore) -> None:
    """Each write has its own connection and staging table."""
    pages = [minute_bars(f"2024-01-0{day} 14:30", 500) for day in range(2, 6)]
    results = await asyncio.gather(*(
        bar_store.write_page("AAPL", M1, page, TimeRange(
            datetime.fromtimestamp(page[0].t / 1000, UTC),
            datetime.fromtimestamp(page[-1].t / 1000 + 60, UTC)))
        for page in pages))
    assert sum(r.inserted for r in results) == 2000
    stored = await bar_store.fetch_bars("AAPL", M1)
    assert len(stored) == 2000
    assert stored == sorted(stored, key=lambda b: b.bar_time)


# --- fast path (COPY into bars) and merge path (staging + ON CONFLICT) -------------------


@pytest.fixture
def copy_targets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The table each COPY went into: ``bars`` on the fast path, ``bars_staging`` on the
    merge path. (Pool connections forward to asyncpg.Connection, so patching it sees all.)"""
    targets: list[str] = []
    original = asyncpg.Connection.copy_to_table

    async def spy(self: asyncpg.Connection, table_name: str, **kwargs: object) -> str:
        targets.append(table_name)
        return await original(self, table_name, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncpg.Connection, "copy_to_table", spy)
    return targets


def _mixed_minute_page() -> list[Bar]:
    """Duplicates (last wins), index-style NULLs, out-of-order times."""
    page = minute_bars("2024-01-02 14:30", 50)
    page[7] = Bar(page[7].t, 3080.8, 3081.47, 3080.3, 3080.49)
    page[8] = bar(page[8].t, volume=None, trades=None)
    return [*page[:20], bar(page[3].t, 7.0), *reversed(page[20:]), bar(page[3].t, 8.0)]


async def test_fast_and_merge_paths_store_the_same_rows(
        bar_store: BarStore, database_url: str, copy_targets: list[str]) -> None:
    """A page into an empty range is COPYed straight into bars; the same page over a range
    holding one identical bar goes through the merge; both leave the same rows."""
    minute = _mixed_minute_page()
    daily = [bar(ms("2005-04-01 05:00"), 1.0), bar(ms("2005-04-04 04:00"), 2.0),
             bar(ms("2005-04-01 21:00"), 3.0)]  # the last: grouped-daily stamp of 04-01
    for timeframe, page, covered in (
            (M1, minute, span("2024-01-02 14:30", "2024-01-02 15:20")),
            (D1, daily, span("2005-04-01 05:00", "2005-04-05 04:00"))):
        fresh = await bar_store.write_page("AAPL", timeframe, page, covered)
        assert copy_targets[-1] == "bars"
        assert fresh == WriteResult(len(page) - fresh.rejected_duplicates, 0, 0,
                                    fresh.rejected_duplicates)

        await bar_store.write_page("MSFT", timeframe, [page[1]], covered)
        merged = await bar_store.write_page("MSFT", timeframe, page, covered)
        assert copy_targets[-1] == "bars_staging"
        assert merged == WriteResult(fresh.inserted - 1, 0, 1, fresh.rejected_duplicates)
        assert (await bar_store.fetch_bars("AAPL", timeframe)
                == await bar_store.fetch_bars("MSFT", timeframe))
    assert [b.open for b in await bar_store.fetch_bars("AAPL", D1)] == [3.0, 2.0]

    conn = await asyncpg.connect(database_url)
    try:
        different = await conn.fetchval("""
            SELECT count(*) FROM (
                (SELECT timeframe, bar_time, session_date FROM bars WHERE ticker = 'AAPL'
                 EXCEPT SELECT timeframe, bar_time, session_date FROM bars
                 WHERE ticker = 'MSFT')
                UNION ALL
                (SELECT timeframe, bar_time, session_date FROM bars WHERE ticker = 'MSFT'
                 EXCEPT SELECT timeframe, bar_time, session_date FROM bars
                 WHERE ticker = 'AAPL')) AS d""")
    finally:
        await conn.close()
    assert different == 0


async def test_only_a_page_whose_range_holds_a_stored_bar_is_merged(
        bar_store: BarStore, copy_targets: list[str]) -> None:
    """Adjacent pages take the fast path; a page reaching one stored bar (at its edge)
    takes the merge path and updates it."""
    first = minute_bars("2024-01-02 14:30", 10)
    after = minute_bars("2024-01-02 14:40", 10)
    overlapping = minute_bars("2024-01-02 14:49", 5, price=50.0)
    covered = span("2024-01-02 14:30", "2024-01-02 15:00")
    await bar_store.write_page("AAPL", M1, first, covered)
    await bar_store.write_page("AAPL", M1, after, covered)
    assert copy_targets == ["bars", "bars"]
    result = await bar_store.write_page("AAPL", M1, overlapping, covered)
    assert copy_targets[-1] == "bars_staging"
    assert result == WriteResult(inserted=4, updated=1, unchanged=0, rejected_duplicates=0)
    assert len(await bar_store.fetch_bars("AAPL", M1)) == 24


async def test_a_key_stored_by_another_writer_after_the_probe_is_merged(
        bar_store: BarStore, database_url: str, copy_targets: list[str]) -> None:
    """The probe cannot see another transaction's uncommitted bar; when it commits, the
    fast COPY hits a unique violation and the page is redone as a merge, whose values win."""
    page = minute_bars("2024-01-02 14:30", 100)
    covered = span("2024-01-02 14:30", "2024-01-02 16:10")
    other = await asyncpg.connect(database_url)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "INSERT INTO bars (ticker, timeframe, bar_time, open, high, low, close) "
            "VALUES ('AAPL', '1m', $1, 1, 1, 1, 1)", utc("2024-01-02 15:00"))
        write = asyncio.create_task(bar_store.write_page("AAPL", M1, page, covered))
        for _ in range(500):  # the COPY now waits for our transaction
            if await other.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the fast-path COPY never waited for the conflicting insert")
        await transaction.commit()
        result = await asyncio.wait_for(write, timeout=30)
    finally:
        await other.close()

    assert copy_targets == ["bars", "bars_staging"]
    assert result == WriteResult(inserted=99, updated=1, unchanged=0, rejected_duplicates=0)
    stored = await bar_store.fetch_bars("AAPL", M1)
    assert [(b.bar_time, b.open) for b in stored] == [
        (datetime.fromtimestamp(b.t / 1000, UTC), b.open) for b in page]
    assert await bar_store.coverage("AAPL", M1) == [covered]


# --- coverage -------------------------------------------------------------------------


def test_merge_ranges_joins_touching_and_overlapping() -> None:
    """Half-open ranges that touch or overlap become one; empty ones disappear."""
    ranges = [span("2024-01-05", "2024-01-07"), span("2024-01-01", "2024-01-02"),
              span("2024-01-02", "2024-01-03"), span("2024-01-06", "2024-01-06 12:00"),
              span("2024-01-04", "2024-01-04"), span("2024-01-06", "2024-01-09")]
    assert merge_ranges(ranges) == [span("2024-01-01", "2024-01-03"),
                                    span("2024-01-05", "2024-01-09")]
    assert merge_ranges([]) == []


async def test_coverage_merges_and_keeps_verified_empty_ranges(
        bar_store: BarStore, database_url: str) -> None:
    """Adjacent and overlapping fetches merge, a disjoint one leaves a hole, and an empty
    page (a weekend) still counts as covered."""
    await bar_store.write_page("AAPL", D1, [], span("2024-01-06", "2024-01-08"))  # weekend
    await bar_store.write_page("AAPL", D1, [bar(ms("2024-01-08 05:00"))],
                               span("2024-01-08", "2024-01-09"))  # adjacent
    await bar_store.write_page("AAPL", D1, [], span("2024-01-08 12:00", "2024-01-10"))  # overlap
    await bar_store.write_page("AAPL", D1, [], span("2024-01-15", "2024-01-16"))  # disjoint
    await bar_store.write_page("AAPL", D1, [], span("2024-01-20", "2024-01-20"))  # zero length
    await bar_store.write_page("MSFT", D1, [], span("2024-01-01", "2024-02-01"))  # other pair

    assert await bar_store.coverage("AAPL", D1) == [span("2024-01-06", "2024-01-10"),
                                                   span("2024-01-15", "2024-01-16")]
    assert await bar_store.coverage("AAPL", M1) == []

    # A fetch spanning, touching or overlapping older ones merges with them: one row per
    # continuous stretch, however many runs re-fetched its trailing window.
    await bar_store.write_page("AAPL", D1, [], span("2024-01-01", "2024-01-12"))
    assert await bar_store.coverage("AAPL", D1) == [span("2024-01-01", "2024-01-12"),
                                                   span("2024-01-15", "2024-01-16")]
    conn = await asyncpg.connect(database_url)
    try:
        counts = await conn.fetch("SELECT range_start, bar_count FROM coverage "
                                  "WHERE ticker = 'AAPL' ORDER BY range_start")
    finally:
        await conn.close()
    assert [tuple(row) for row in counts] == [(utc("2024-01-01"), 0), (utc("2024-01-15"), 0)]


# --- atomicity and errors -------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"high": 90.0, "low": 99.0}, id="high-below-low"),
        pytest.param({"close": math.nan}, id="nan"),
        pytest.param({"open": math.inf}, id="infinite"),
        pytest.param({"volume": -1.0}, id="negative-volume"),
        pytest.param({"trades": 2**63}, id="trades-beyond-bigint"),
    ],
)
async def test_a_failing_write_leaves_neither_bars_nor_coverage(
        bar_store: BarStore, bad: dict[str, float]) -> None:
    """One bad bar late in the page rolls back the whole page and its coverage."""
    page = minute_bars("2024-01-02 14:30", 100)
    page[-1] = bar(page[-1].t, **bad)
    with pytest.raises(StorageError, match="writing 100 1m bars for AAPL failed"):
        await bar_store.write_page("AAPL", M1, page, span("2024-01-02 14:30", "2024-01-02 16:10"))
    assert await bar_store.fetch_bars("AAPL", M1) == []
    assert await bar_store.coverage("AAPL", M1) == []
    # The store is still usable afterwards.
    assert (await bar_store.write_page("AAPL", M1, page[:1], span("2024-01-02 14:30",
                                                                   "2024-01-02 14:31"))).inserted


async def test_connect_errors_are_storage_errors_without_the_password(database_url: str) -> None:
    """A bad DATABASE_URL becomes one StorageError that never shows the password."""
    wrong = database_url.replace(database_url.rsplit("/", 1)[-1].split("?")[0], "no_such_db")
    wrong = wrong.replace("postgres:@", "postgres:hunter2@")
    with pytest.raises(StorageError) as caught:
        await BarStore.connect(wrong)
    assert "hunter2" not in str(caught.value)
    assert "connecting to PostgreSQL failed" in str(caught.value)


def test_redact_hides_the_dsn_and_its_password() -> None:
    dsn = "postgresql://user:s3cret@db.example:5432/bars"
    text = redact(f"could not use {dsn}; password s3cret rejected", dsn)
    assert "s3cret" not in text
    assert "<database-url>" in text


# --- results and status ---------------------------------------------------------------


async def test_record_result_upserts_the_latest_run(bar_store: BarStore) -> None:
    """One row per pair; an ok run clears the previous error."""
    await bar_store.record_result("AAPL", D1, ok=False, message="HTTP 429",
                                  at=utc("2024-01-02 10:00"))
    [row] = await bar_store.status()
    assert (row.last_result, row.last_error, row.last_run_at) == (
        "error", "HTTP 429", utc("2024-01-02 10:00"))

    await bar_store.record_result("AAPL", D1, ok=True, message="wrote 3 bars",
                                  at=utc("2024-01-02 10:30"))
    [row] = await bar_store.status()
    assert (row.last_result, row.last_error, row.last_run_at) == (
        "ok", None, utc("2024-01-02 10:30"))


async def test_status_lists_every_known_pair_sorted(bar_store: BarStore) -> None:
    """Pairs with bars, with only (empty) coverage, or with only a result all show up."""
    await bar_store.write_page("MSFT", M1, minute_bars("2024-01-02 14:30", 3),
                               span("2024-01-02 14:30", "2024-01-02 14:33"))
    await bar_store.write_page("AAPL", D1, [], span("2024-01-06", "2024-01-08"))
    await bar_store.record_result("X:BTCUSD", D1, ok=False, message="HTTP 403",
                                  at=utc("2024-01-02"))
    await bar_store.record_result("MSFT", M1, ok=True, message="ok", at=utc("2024-01-03"))

    assert await bar_store.status() == [
        PairStatus("AAPL", "1d", 0, None, None, None, None, None),
        PairStatus("MSFT", "1m", 3, utc("2024-01-02 14:30"), utc("2024-01-02 14:32"),
                   "ok", None, utc("2024-01-03")),
        PairStatus("X:BTCUSD", "1d", 0, None, None, "error", "HTTP 403", utc("2024-01-02")),
    ]


# --- lifecycle ------------------------------------------------------------------------


async def test_open_database_with_a_url_migrates_and_closes(database_url: str) -> None:
    async with open_database(database_url, Path("unused")) as store:
        await store.write_page("AAPL", M1, [], span("2024-01-02", "2024-01-03"))
        assert await store.coverage("AAPL", M1) == [span("2024-01-02", "2024-01-03")]


async def test_open_database_without_a_url_runs_an_embedded_server(tmp_path: Path) -> None:
    """The default path: pgserver under a directory, data kept across restarts."""
    pg_dir = tmp_path / "pg"
    async with open_database(None, pg_dir) as store:
        await store.write_page("AAPL", M1, minute_bars("2024-01-02 14:30", 2),
                               span("2024-01-02 14:30", "2024-01-02 14:32"))
    async with open_database(None, pg_dir) as store:
        assert len(await store.fetch_bars("AAPL", M1)) == 2
    assert (pg_dir / "PG_VERSION").exists()


async def test_stored_pairs_reads_every_pair_in_one_go(bar_store: BarStore) -> None:
    """The plan's view of many pairs: earliest bar and merged coverage for each, None and
    nothing for pairs never written, the same as the one-pair reads."""
    await bar_store.write_page("AAPL", M1, minute_bars("2024-01-02T15:00", 30),
                               span("2024-01-02T14:30", "2024-01-02T16:00"))
    await bar_store.write_page("AAPL", M1, minute_bars("2024-01-03T15:00", 5),
                               span("2024-01-03T14:30", "2024-01-03T16:00"))
    await bar_store.write_page("AAPL", M1, [], span("2024-01-02T16:00", "2024-01-02T17:00"))
    stored = await bar_store.stored_pairs([("AAPL", M1), ("AAPL", D1), ("MSFT", M1)])
    assert stored[("AAPL", "1m")] == StoredPair(
        utc("2024-01-02T15:00"),
        [span("2024-01-02T14:30", "2024-01-02T17:00"),
         span("2024-01-03T14:30", "2024-01-03T16:00")])
    assert stored[("AAPL", "1m")].coverage == await bar_store.coverage("AAPL", M1)
    assert stored[("AAPL", "1d")] == StoredPair(None, [])
    assert stored[("MSFT", "1m")] == StoredPair(None, [])
    assert await bar_store.stored_pairs([]) == {}
