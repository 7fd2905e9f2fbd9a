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
from zoneinfo import ZoneInfo

from polygon_backfill.models import NEW_YORK, AssetClass, Timeframe, asset_class

_FIXED_HOLIDAYS = {(1, 1), (7, 4), (12, 25)}
# Minutes with trades on a full day: stocks 04:00-20:00 New York (extended hours), indices
# 09:30-16:00, crypto and forex around the clock.
_MINUTES_PER_DAY = {AssetClass.STOCK: 960, AssetClass.INDEX: 390, AssetClass.CRYPTO: 1440,
                    AssetClass.FOREX: 1440}
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


def is_trading_day(ticker: str, day: date) -> bool:
    """Whether ``day`` (local to the ticker's home zone) has a session at all."""
    kind = asset_class(ticker)
    if kind is AssetClass.CRYPTO:
        return True
    if kind is AssetClass.FOREX:
        return day.weekday() != 5
    return day.weekday() < 5 and (day.month, day.day) not in _FIXED_HOLIDAYS


def base_aggregates(ticker: str, day: date, *, intraday: bool) -> int:
    """How many of Polygon's base aggregates (minutes for intraday bars, days for daily and
    weekly ones) ``day`` holds at most; what the API's ``limit`` counts."""
    if not is_trading_day(ticker, day):
        return 0
    return _MINUTES_PER_DAY[asset_class(ticker)] if intraday else 1


def may_hold_bars(ticker: str, timeframe: Timeframe, start: datetime, end: datetime) -> bool:
    """Whether ``[start, end)`` overlaps any session (extended hours for stocks), so a bar
    could exist there; used before asking again after a full page (pitfall 1)."""
    kind = asset_class(ticker)
    zone = UTC if kind in (AssetClass.CRYPTO, AssetClass.FOREX) else NEW_YORK
    day, last = start.astimezone(zone).date(), end.astimezone(zone).date()
    while day <= last:
        if is_trading_day(ticker, day):
            if timeframe.is_daily:
                if start <= datetime.combine(day, time(0), tzinfo=zone) < end:
                    return True
            else:
                opens, closes = _extended_hours(kind, day, zone)
                if opens < end and start < closes:
                    return True
        day += timedelta(days=1)
    return False


def _extended_hours(kind: AssetClass, day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """When minute bars can exist on a trading day."""
    if kind is AssetClass.STOCK:
        return (datetime.combine(day, time(4), tzinfo=zone),
                datetime.combine(day, time(20), tzinfo=zone))
    if kind is AssetClass.INDEX:
        return (datetime.combine(day, _REGULAR_OPEN, tzinfo=zone),
                datetime.combine(day, _REGULAR_CLOSE, tzinfo=zone))
    midnight = datetime.combine(day, time(0), tzinfo=zone)
    return midnight, midnight + timedelta(days=1)


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
