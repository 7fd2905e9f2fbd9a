"""When each ticker trades: the calendar behind request planning and empty-answer checks.

The planner sizes requests by how many base aggregates a day can hold, and the client tells
a suspicious empty answer from a genuine one (pitfall 4: Polygon sometimes answers
``results: null`` under load for a liquid ticker on a trading day; a span that holds a whole
regular session should have bars, so an empty answer for it is asked again). Both need the
real exchange calendar: a holiday taken for a session costs retries and wrong request
counts, an early close taken for a full day overestimates its minutes.

- Stocks, ETFs and indices (``I:``) follow the NYSE calendar (``XNYS`` from
  ``exchange_calendars``): weekends, holidays and special closures (2012-10-29/30,
  2018-12-05, 2025-01-09, ...) have no session; early-close days end at 13:00 New York.
  Stock bars can exist from 04:00 New York to four hours after the close (20:00, or 17:00
  on early closes); index bars only in the regular session (09:30 to the close).
- Crypto (``X:``) trades every UTC day, around the clock.
- Forex (``C:``) trades Sunday to Friday: bars can exist on any UTC day but Saturday (a
  superset of the real week, Sunday 17:00 to Friday 17:00 New York); only Monday to
  Thursday UTC days are counted as whole sessions, since Sunday and Friday are partial.

The NYSE calendar is read once per process, on first use, into plain dictionaries so the
hot loops (the planner walks every day of a range per ticker) stay pure Python. It spans
1990-01-01 to 2099-12-31, a fixed window so answers never depend on the wall clock; future
years follow the library's holiday rules (an unannounced closure is unknown either way).
Outside that window stocks and indices fall back to the weekday rule: every Monday to
Friday is a full 09:30-16:00 session.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cache, lru_cache
from zoneinfo import ZoneInfo

from polygon_backfill.models import NEW_YORK, AssetClass, Timeframe, asset_class

_CALENDAR_NAME = "XNYS"
_CALENDAR_FIRST = date(1990, 1, 1)
_CALENDAR_LAST = date(2099, 12, 31)
_REGULAR_OPEN = time(9, 30)
_REGULAR_CLOSE = time(16, 0)
_PRE_MARKET_OPEN = time(4, 0)
_AFTER_HOURS = timedelta(hours=4)  # after-hours trading runs this long past the close
_DAY = timedelta(days=1)
_MINUTE = timedelta(minutes=1)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_EXCHANGE_KINDS = (AssetClass.STOCK, AssetClass.INDEX)


@dataclass(frozen=True, slots=True)
class _Nyse:
    """The NYSE calendar as plain Python values: regular sessions by date (UTC bounds)."""

    first: date
    last: date
    sessions: dict[date, tuple[datetime, datetime]]
    early_closes: frozenset[date]


@cache
def _nyse() -> _Nyse:
    """Load ``XNYS`` once per process and convert it; pandas stays out of the lookups."""
    # Imported here, not at the top: pandas takes a good half second to import, which
    # commands that never look at the calendar need not pay.
    import exchange_calendars

    with warnings.catch_warnings():
        # The library's own use of pandas raises deprecation notices (Series.values on
        # tz-aware columns under pandas 3.1) that this code cannot act on; under pytest's
        # "error" filter they would break the first calendar lookup.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        calendar = exchange_calendars.get_calendar(
            _CALENDAR_NAME, start=_CALENDAR_FIRST.isoformat(), end=_CALENDAR_LAST.isoformat())
    # Whole days and seconds since the epoch, with the units spelled out (pandas' own
    # resolution differs between versions); one vectorised pass instead of 27,000 Timestamps.
    days = calendar.sessions.to_numpy().astype("datetime64[D]").astype("int64").tolist()
    opens, closes = (column.dt.tz_convert(None).to_numpy().astype("datetime64[s]")
                     .astype("int64").tolist() for column in (calendar.opens, calendar.closes))
    sessions: dict[date, tuple[datetime, datetime]] = {}
    early: set[date] = set()
    for epoch_day, open_s, close_s in zip(days, opens, closes, strict=True):
        day = date.fromordinal(_EPOCH_ORDINAL + epoch_day)
        closes_at = datetime.fromtimestamp(close_s, tz=UTC)
        sessions[day] = (datetime.fromtimestamp(open_s, tz=UTC), closes_at)
        if closes_at.astimezone(NEW_YORK).time() < _REGULAR_CLOSE:
            early.add(day)
    return _Nyse(_CALENDAR_FIRST, _CALENDAR_LAST, sessions, frozenset(early))


def load_calendar() -> None:
    """Read the NYSE calendar now (about a second, once per process) rather than on the
    first lookup, e.g. before a server starts answering requests."""
    _nyse()


@lru_cache(maxsize=65_536)
def nyse_session(day: date) -> tuple[datetime, datetime] | None:
    """NYSE's regular session on ``day`` (a New York date) as aware UTC ``(open, close)``,
    or None when the exchange is closed; the weekday rule outside the loaded calendar.

    Shared with the sandbox, so the fake Polygon and the daemon keep the same calendar."""
    nyse = _nyse()
    if nyse.first <= day <= nyse.last:
        return nyse.sessions.get(day)
    if day.weekday() >= 5:
        return None
    return (datetime.combine(day, _REGULAR_OPEN, tzinfo=NEW_YORK).astimezone(UTC),
            datetime.combine(day, _REGULAR_CLOSE, tzinfo=NEW_YORK).astimezone(UTC))


def _utc_day(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + _DAY


def _zone(kind: AssetClass) -> ZoneInfo:
    return NEW_YORK if kind in _EXCHANGE_KINDS else ZoneInfo("UTC")


def _regular_session(kind: AssetClass, day: date) -> tuple[datetime, datetime] | None:
    """The regular session of ``day`` as aware UTC bounds, or None when there is none
    (forex: only Monday to Thursday, whose UTC days are traded whole)."""
    if kind is AssetClass.CRYPTO or (kind is AssetClass.FOREX and day.weekday() < 4):
        return _utc_day(day)
    if kind is AssetClass.FOREX:
        return None
    return nyse_session(day)


@lru_cache(maxsize=65_536)
def _trading_hours(kind: AssetClass, day: date) -> tuple[datetime, datetime] | None:
    if kind is AssetClass.CRYPTO:
        return _utc_day(day)
    if kind is AssetClass.FOREX:
        return None if day.weekday() == 5 else _utc_day(day)
    session = nyse_session(day)
    if session is None or kind is AssetClass.INDEX:
        return session
    pre_market = datetime.combine(day, _PRE_MARKET_OPEN, tzinfo=NEW_YORK).astimezone(UTC)
    # The close is on a weekday afternoon, never next to a DST change: adding in UTC is exact.
    return pre_market, session[1] + _AFTER_HOURS


def trading_hours(ticker: str, day: date) -> tuple[datetime, datetime] | None:
    """When bars of ``ticker`` can exist on ``day`` (a date in its home zone), as aware UTC
    ``(start, end)``; None when there is no session. Stocks include extended hours."""
    return _trading_hours(asset_class(ticker), day)


def is_trading_day(ticker: str, day: date) -> bool:
    """Whether ``day`` (local to the ticker's home zone) has a session at all."""
    return _trading_hours(asset_class(ticker), day) is not None


def is_early_close(ticker: str, day: date) -> bool:
    """Whether the exchange closes early on ``day`` (13:00 New York, e.g. the day after
    Thanksgiving); always False for crypto and forex, which follow no exchange."""
    if asset_class(ticker) not in _EXCHANGE_KINDS:
        return False
    return day in _nyse().early_closes


def session_dates(ticker: str, first: date, last: date) -> list[date]:
    """Every date in ``[first, last]`` (home-zone dates) with a session of ``ticker``,
    ascending."""
    kind = asset_class(ticker)
    days: list[date] = []
    day = first
    while day <= last:
        if _trading_hours(kind, day) is not None:
            days.append(day)
        day += _DAY
    return days


def base_aggregates(ticker: str, day: date, *, intraday: bool) -> int:
    """How many of Polygon's base aggregates (minutes for intraday bars, days for daily and
    weekly ones) ``day`` holds at most; what the API's ``limit`` counts. Early closes hold
    fewer minutes (stocks 780 instead of 960, indices 210 instead of 390)."""
    hours = _trading_hours(asset_class(ticker), day)
    if hours is None:
        return 0
    return (hours[1] - hours[0]) // _MINUTE if intraday else 1


def may_hold_bars(ticker: str, timeframe: Timeframe, start: datetime, end: datetime) -> bool:
    """Whether ``[start, end)`` overlaps any session (extended hours for stocks), so a bar
    could exist there; used before asking again after a full page (pitfall 1)."""
    kind = asset_class(ticker)
    zone = _zone(kind)
    day, last = start.astimezone(zone).date(), end.astimezone(zone).date()
    while day <= last:
        hours = _trading_hours(kind, day)
        if hours is not None:
            if timeframe.is_daily:
                if start <= datetime.combine(day, time(0), tzinfo=zone) < end:
                    return True
            elif hours[0] < end and start < hours[1]:
                return True
        day += _DAY
    return False


def holds_full_session(ticker: str, start: datetime, end: datetime) -> bool:
    """Whether ``[start, end)`` contains at least one whole regular session of ``ticker``
    (an early close's shortened session counts as whole)."""
    kind = asset_class(ticker)
    zone = _zone(kind)
    day, last = start.astimezone(zone).date(), end.astimezone(zone).date()
    while day <= last:
        session = _regular_session(kind, day)
        if session is not None and start <= session[0] and session[1] <= end:
            return True
        day += _DAY
    return False
