"""Versioned, idempotent schema migrations.

Each migration runs once, in order, recorded in ``schema_migrations``. ``migrate`` holds a
transaction-scoped advisory lock, so two daemons starting together cannot both apply one.
Never edit a released migration: append a new one.

Tables (ticker and timeframe use the "C" collation: byte order is right for symbols and
keeps the primary-key B-tree fast whatever the server's locale):

- ``bars``: one row per (ticker, timeframe, canonical bar time); values replaced on re-fetch.
- ``coverage``: half-open ranges fetched successfully, empty ones included. Gaps between
  them are the holes a later run fills (pitfall 15), so this is a log of intervals, not a
  high-water mark.
- ``pair_status``: the outcome of the last run per (ticker, timeframe), for ``status``.
- ``service_state``: process-wide states worth showing in ``status`` (the API circuit
  breaker), with the last error.
- ``empty_sessions``: sessions a successful fetch vouched for that held no bar, so that a
  session without bars is a hole unless it is here (``coverage.py``).
- ``split_lists``: each stock ticker's splits as last seen, so a changed list (a new or
  corrected split) triggers a re-fetch of the ticker's adjusted history.
"""

from __future__ import annotations

from typing import Final

import asyncpg

# Any constant shared by every process that migrates this database.
_MIGRATION_LOCK_ID: Final = 0x706F6C79_6D696772  # "polymigr"

_CREATE_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

_FINITE = "({col} <> 'NaN' AND {col} > '-Infinity' AND {col} < 'Infinity')"


def _finite(column: str, *, nullable: bool = False) -> str:
    check = _FINITE.format(col=column)
    return f"({column} IS NULL OR {check})" if nullable else check


_V1_INITIAL: Final = f"""
CREATE TABLE bars (
    ticker       text COLLATE "C" NOT NULL,
    timeframe    text COLLATE "C" NOT NULL,
    bar_time     timestamptz NOT NULL,
    session_date date,
    open         double precision NOT NULL,
    high         double precision NOT NULL,
    low          double precision NOT NULL,
    close        double precision NOT NULL,
    volume       double precision,
    vwap         double precision,
    trades       bigint,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ticker, timeframe, bar_time),
    CONSTRAINT bars_prices_finite CHECK (
        {_finite("open")} AND {_finite("high")} AND {_finite("low")} AND {_finite("close")}),
    CONSTRAINT bars_high_not_below_low CHECK (high >= low),
    CONSTRAINT bars_volume_valid CHECK ({_finite("volume", nullable=True)} AND volume >= 0),
    CONSTRAINT bars_vwap_finite CHECK ({_finite("vwap", nullable=True)}),
    CONSTRAINT bars_trades_valid CHECK (trades IS NULL OR trades >= 0)
);

CREATE TABLE coverage (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticker      text COLLATE "C" NOT NULL,
    timeframe   text COLLATE "C" NOT NULL,
    range_start timestamptz NOT NULL,
    range_end   timestamptz NOT NULL,
    bar_count   integer NOT NULL DEFAULT 0 CHECK (bar_count >= 0),
    fetched_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT coverage_range_ordered CHECK (range_end >= range_start)
);
CREATE INDEX coverage_pair_start_idx ON coverage (ticker, timeframe, range_start);

CREATE TABLE pair_status (
    ticker       text COLLATE "C" NOT NULL,
    timeframe    text COLLATE "C" NOT NULL,
    last_run_at  timestamptz NOT NULL,
    last_result  text NOT NULL CHECK (last_result IN ('ok', 'error')),
    last_message text,
    last_error   text,
    PRIMARY KEY (ticker, timeframe)
);
"""

_V2_SERVICE_STATE: Final = """
CREATE TABLE service_state (
    name       text COLLATE "C" PRIMARY KEY,
    state      text NOT NULL,
    detail     text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""

_V3_EMPTY_SESSIONS: Final = """
CREATE TABLE empty_sessions (
    ticker       text COLLATE "C" NOT NULL,
    timeframe    text COLLATE "C" NOT NULL,
    session_date date NOT NULL,
    verified_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ticker, timeframe, session_date)
);
"""

_V4_SPLIT_LISTS: Final = """
CREATE TABLE split_lists (
    ticker     text COLLATE "C" PRIMARY KEY,
    splits     jsonb NOT NULL,
    checked_at timestamptz NOT NULL
);
"""

# (version, name, sql); append only.
MIGRATIONS: Final[tuple[tuple[int, str, str], ...]] = (
    (1, "initial bars, coverage and pair_status", _V1_INITIAL),
    (2, "service_state", _V2_SERVICE_STATE),
    (3, "empty_sessions", _V3_EMPTY_SESSIONS),
    (4, "split_lists", _V4_SPLIT_LISTS),
)


async def migrate(conn: asyncpg.Connection) -> None:
    """Bring the schema up to date; a no-op when it already is, safe to run concurrently."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_ID)
        await conn.execute(_CREATE_MIGRATIONS_TABLE)
        applied = {row["version"] for row in
                   await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in MIGRATIONS:
            if version in applied:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest applied migration, 0 for an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
