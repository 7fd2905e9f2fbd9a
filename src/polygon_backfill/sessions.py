"""Which time spans certainly contain a trading session.

Used to tell a suspicious empty answer from a genuine one (pitfall 4): Polygon sometimes
answers ``results: null`` under load for a liquid ticker on a trading day. A span that holds
a whole regular session should have bars; an empty answer for it is asked again.

A deliberately small calendar: weekdays, less New Year's Day, Independence Day and
Christmas for US stocks and indices (regular hours 09:30-16:00 New York); every UTC day for
crypto; Monday to Thursday UTC days for forex. Holidays it does not know cost a few
retries, never a wrong answer: after the retries the empty answer is accepted.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from polygon_backfill.models import NEW_YORK, AssetClass, asset_class

_FIXED_HOLIDAYS = {(1, 1), (7, 4), (12, 25)}
_REGULAR_OPEN = time(9, 30)
_REGULAR_CLOSE = time(16, 0)


def _session(kind: AssetClass, day: date) -> tuple[datetime, datetime] | None:
    """The regular session of ``day`` as aware UTC bounds, or None when there is none."""
    if kind is AssetClass.CRYPTO or (kind is AssetClass.FOREX and day.weekday() < 4):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return start, start + timedelta(days=1)
    if kind is AssetClass.FOREX or day.weekday() >= 5:
        return None
    if (day.month, day.day) in _FIXED_HOLIDAYS:
        return None
    opens = datetime.combine(day, _REGULAR_OPEN, tzinfo=NEW_YORK).astimezone(UTC)
    closes = datetime.combine(day, _REGULAR_CLOSE, tzinfo=NEW_YORK).astimezone(UTC)
    return opens, closes


def holds_full_session(ticker: str, start: datetime, end: datetime) -> bool:
    """Whether ``[start, end)`` contains at least one whole regular session of ``ticker``."""
    kind = asset_class(ticker)
    zone = UTC if kind in (AssetClass.CRYPTO, AssetClass.FOREX) else NEW_YORK
    day, last = start.astimezone(zone).date(), end.astimezone(zone).date()
    while day <= last:
        session = _session(kind, day)
        if session is not None and start <= session[0] and session[1] <= end:
            return True
        day += timedelta(days=1)
    return False
