"""When synthetic tickers trade: one session per local calendar day, in UTC ms.

The fake Polygon must leave gaps exactly where the real one does, or the daemon's
calendar-driven planning and empty-answer checks go untested: stocks and indices follow the
NYSE calendar, shared with the daemon (``polygon_backfill.sessions.nyse_session``, real
``XNYS`` holidays, special closures and 13:00 early closes; the weekday rule outside the
calendar's 1990-2099 window). Stocks trade 04:00 New York to four hours after the close
(20:00, 17:00 on early closes), indices in the regular session (09:30 to the close); forex
from Sunday 17:00 to Friday 17:00 New York (its days are New York days here; the daemon only
assumes "any UTC day but Saturday", which contains this week); crypto every minute (its days
are UTC days).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

from polygon_backfill.models import NEW_YORK, AssetClass, datetime_to_ms
from polygon_backfill.sessions import load_calendar, nyse_session

_AFTER_HOURS = timedelta(hours=4)  # stocks trade this long past the NYSE close

# Read the calendar as the sandbox is imported, not on its first request: a second's pause
# there would bunch up the requests queued behind it and trip the sandbox's own rate limit.
load_calendar()


def is_trading_day(day: date) -> bool:
    """Whether NYSE (stocks and indices) has a session on ``day``, a New York date."""
    return nyse_session(day) is not None


def _local_minutes(kind: AssetClass, day: date) -> tuple[int, int] | None:
    """A forex or crypto session [start, end) as minutes after local midnight, or None."""
    if kind is AssetClass.CRYPTO:
        return 0, 1440
    weekday = day.weekday()
    if weekday == 5:
        return None
    if weekday == 6:
        return 17 * 60, 1440
    return (0, 17 * 60) if weekday == 4 else (0, 1440)


def _exchange_session(kind: AssetClass, day: date) -> tuple[int, int] | None:
    """A stock's or index's session on ``day`` as UTC ms, from the NYSE calendar."""
    session = nyse_session(day)
    if session is None:
        return None
    if kind is AssetClass.INDEX:
        return datetime_to_ms(session[0]), datetime_to_ms(session[1])
    pre_market = datetime(day.year, day.month, day.day, 4, tzinfo=NEW_YORK)
    after_hours = session[1].astimezone(NEW_YORK) + _AFTER_HOURS  # a weekday: no DST change
    return datetime_to_ms(pre_market), datetime_to_ms(after_hours)


@lru_cache(maxsize=65_536)
def day_session(kind: AssetClass, ordinal: int) -> tuple[int, int] | None:
    """The session of local day ``ordinal`` as UTC ms ``(start, end)``, or None."""
    day = date.fromordinal(ordinal)
    if kind in (AssetClass.STOCK, AssetClass.INDEX):
        return _exchange_session(kind, day)
    minutes = _local_minutes(kind, day)
    if minutes is None:
        return None
    zone = UTC if kind is AssetClass.CRYPTO else NEW_YORK
    midnight = datetime(day.year, day.month, day.day)

    def to_ms(offset: int) -> int:
        return datetime_to_ms((midnight + timedelta(minutes=offset)).replace(tzinfo=zone))

    return to_ms(minutes[0]), to_ms(minutes[1])


def _local_ordinal(kind: AssetClass, ms: int) -> int:
    zone = UTC if kind is AssetClass.CRYPTO else NEW_YORK
    return datetime.fromtimestamp(ms / 1000, tz=zone).date().toordinal()


def sessions_after(kind: AssetClass, ms: int) -> Iterator[tuple[int, int]]:
    """Sessions ending after ``ms``, ascending, without end (the caller stops)."""
    ordinal = _local_ordinal(kind, ms) - 1
    while ordinal < date.max.toordinal():
        session = day_session(kind, ordinal)
        if session is not None and session[1] > ms:
            yield session
        ordinal += 1


def sessions_before(kind: AssetClass, ms: int) -> Iterator[tuple[int, int]]:
    """Sessions starting before ``ms``, descending, without end (the caller stops)."""
    ordinal = _local_ordinal(kind, ms) + 1
    while ordinal > 1:
        session = day_session(kind, ordinal)
        if session is not None and session[0] < ms:
            yield session
        ordinal -= 1


def overlap(kind: AssetClass, start: int, end: int) -> tuple[int, int, int] | None:
    """Trading inside ``[start, end)``: (first traded ms, last traded ms end, minutes)."""
    first = last = None
    total = 0
    for a, b in sessions_after(kind, start):
        if a >= end:
            break
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            first = lo if first is None else first
            last = hi
            total += hi - lo
    if first is None or last is None:
        return None
    return first, last, max(1, total // 60_000)
