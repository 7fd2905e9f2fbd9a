"""When synthetic tickers trade: one session per local calendar day, in UTC ms.

Stocks 04:00-20:00 New York (extended hours), indices 09:30-16:00, both on weekdays that are
not Jan 1, Jul 4 or Dec 25; forex from Sunday 17:00 to Friday 17:00 New York; crypto every
minute (its days are UTC days).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

from polygon_backfill.models import NEW_YORK, AssetClass, datetime_to_ms

_HOLIDAYS = {(1, 1), (7, 4), (12, 25)}


def is_trading_day(day: date) -> bool:
    """Weekdays except a few fixed US holidays."""
    return day.weekday() < 5 and (day.month, day.day) not in _HOLIDAYS


def _local_minutes(kind: AssetClass, day: date) -> tuple[int, int] | None:
    """Session [start, end) as minutes after local midnight, or None when closed."""
    if kind is AssetClass.CRYPTO:
        return 0, 1440
    if kind is AssetClass.FOREX:
        weekday = day.weekday()
        if weekday == 5:
            return None
        if weekday == 6:
            return 17 * 60, 1440
        return (0, 17 * 60) if weekday == 4 else (0, 1440)
    if not is_trading_day(day):
        return None
    return (4 * 60, 20 * 60) if kind is AssetClass.STOCK else (9 * 60 + 30, 16 * 60)


@lru_cache(maxsize=65_536)
def day_session(kind: AssetClass, ordinal: int) -> tuple[int, int] | None:
    """The session of local day ``ordinal`` as UTC ms ``(start, end)``, or None."""
    day = date.fromordinal(ordinal)
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
