"""What a complete table holds: the sessions a pair should have bars for, and which of them
are holes.

Coverage intervals say which time was fetched successfully; they cannot tell a session
that was verified empty from one whose bars were deleted (or never written) after the
fetch. So each fetch also marks the sessions it vouches for that held no bar
(``empty_sessions``), and a session is complete when its trading hours are covered and it
has bars or such a mark. Days without a session are never expected (pitfall 8), and
minutes without trades are never looked for (pitfall 9): the unit of completeness is the
session (the week for weekly bars).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import StrEnum
from functools import lru_cache

from polygon_backfill.bar_columns import bar_times
from polygon_backfill.models import (
    AssetClass,
    Bar,
    Timeframe,
    TimeRange,
    Timespan,
    asset_class,
    datetime_to_ms,
    home_zone,
    session_start,
)
from polygon_backfill.sessions import session_dates, trading_hours

_ONE_MS = timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class Period:
    """One unit a pair should hold bars for: a session, or a week with a session.

    ``keys`` is where the keys of its bars lie (its local day or week), ``needs`` the
    span a fetch must cover to vouch for it (the trading hours; a daily bar's key),
    ``closes`` when its bars are final enough to expect.
    """

    day: date
    keys: TimeRange
    needs: TimeRange
    closes: datetime


class DayState(StrEnum):
    """A session's state in the table, as ``gaps`` and ``report`` show it."""

    COMPLETE = "complete"
    PARTIAL = "partial"
    MISSING = "missing"
    NO_SESSION = "no_session"

    @property
    def severity(self) -> int:
        """Rank used when several days share one pixel column: the worst one must show."""
        return _SEVERITY[self]

    @property
    def text(self) -> str:
        """Human wording ("no session", not the enum value) for legends and tooltips."""
        return self.value.replace("_", " ")


_SEVERITY = {DayState.NO_SESSION: 0, DayState.COMPLETE: 1, DayState.PARTIAL: 2,
             DayState.MISSING: 3}


def _local_day(ticker: str, day: date, days: int = 1) -> TimeRange:
    return TimeRange(session_start(ticker, day), session_start(ticker, day + timedelta(days)))


def periods_between(ticker: str, timeframe: Timeframe, first: date, last: date) -> list[Period]:
    """Every period of ``timeframe`` with a session in ``[first, last]``; a week closes
    with its own last session, even one after ``last``. The calendar depends on the asset
    class alone, so a plan of many tickers computes each span once."""
    return list(_periods(_CALENDAR_OF[asset_class(ticker)], timeframe, first, last))


# One ticker per asset class: its calendar and home zone are every such ticker's.
_CALENDAR_OF = {AssetClass.STOCK: "SPY", AssetClass.INDEX: "I:SPX",
                AssetClass.CRYPTO: "X:BTCUSD", AssetClass.FOREX: "C:EURUSD"}


@lru_cache(maxsize=256)
def _periods(ticker: str, timeframe: Timeframe, first: date, last: date) -> tuple[Period, ...]:
    if timeframe.timespan is Timespan.WEEK:
        weeks: dict[date, date] = {}  # Sunday (Polygon's weeks) -> its last session
        inside: set[date] = set()
        for day in session_dates(ticker, first, last + timedelta(days=6)):
            sunday = day - timedelta(days=(day.weekday() + 1) % 7)
            weeks[sunday] = day
            if day <= last:
                inside.add(sunday)
        return tuple(_keyed(ticker, sunday, _local_day(ticker, sunday, 7), weeks[sunday])
                     for sunday in sorted(inside))
    days = session_dates(ticker, first, last)
    if timeframe.is_daily:
        return tuple(_keyed(ticker, day, _local_day(ticker, day), day) for day in days)
    periods = []
    for day in days:
        hours = trading_hours(ticker, day)
        if hours is not None:
            periods.append(Period(day, _local_day(ticker, day), TimeRange(*hours), hours[1]))
    return tuple(periods)


def _keyed(ticker: str, day: date, keys: TimeRange, closing_session: date) -> Period:
    """A daily or weekly period: one bar, stored under ``keys.start``."""
    hours = trading_hours(ticker, closing_session)
    closes = hours[1] if hours is not None else keys.end
    return Period(day, keys, TimeRange(keys.start, keys.start + _ONE_MS), closes)


def expected_periods(ticker: str, timeframe: Timeframe, start: datetime,
                     now: datetime) -> list[Period]:
    """The periods from ``start`` that have closed by ``now``: what a complete table holds."""
    zone = home_zone(ticker)
    first, last = start.astimezone(zone).date(), now.astimezone(zone).date()
    return [period for period in periods_between(ticker, timeframe, first, last)
            if period.keys.start >= start and period.closes <= now]


def is_covered(span: TimeRange, coverage: Sequence[TimeRange]) -> bool:
    """Whether merged ``coverage`` holds all of ``span``."""
    index = bisect_left(coverage, span.start, key=lambda item: item.end)
    while index < len(coverage) and coverage[index].end <= span.start:
        index += 1
    return (index < len(coverage) and coverage[index].start <= span.start
            and span.end <= coverage[index].end)


def day_state(period: Period, coverage: Sequence[TimeRange], with_bars: set[date],
              verified_empty: set[date]) -> DayState:
    """Complete when fetched whole and holding bars (or verified empty); partial when it
    holds bars but part of it was never fetched; missing otherwise."""
    covered = is_covered(period.needs, coverage)
    if period.day in with_bars:
        return DayState.COMPLETE if covered else DayState.PARTIAL
    if covered and period.day in verified_empty:
        return DayState.COMPLETE
    return DayState.MISSING


def vouched_sessions(ticker: str, timeframe: Timeframe, bars: Sequence[Bar],
                     covered: TimeRange) -> tuple[list[date], list[date]]:
    """The periods a fetched page vouches for (``covered`` holds their ``needs`` and runs
    past their close, so a daily bar fetched mid-session vouches for nothing yet), split
    into those with a bar in the page and those without: the verified-empty ones."""
    if covered.empty:
        return [], []
    zone = home_zone(ticker)
    first = (covered.start.astimezone(zone) - timedelta(days=7)).date()
    last = covered.end.astimezone(zone).date()
    times = bar_times(bars)
    filled: list[date] = []
    empty: list[date] = []
    for period in periods_between(ticker, timeframe, first, last):
        if not (covered.start <= period.needs.start and period.needs.end <= covered.end
                and period.closes <= covered.end):
            continue
        lo = datetime_to_ms(period.keys.start)
        index = bisect_left(times, lo)
        held = index < len(times) and times[index] < datetime_to_ms(period.keys.end)
        (filled if held else empty).append(period.day)
    return filled, empty


def hole_runs(periods: Sequence[Period], hole_days: set[date]) -> list[tuple[date, date, int]]:
    """Holes that follow one another among ``periods`` (no complete session between them)
    as ``(first, last, sessions)``: a holiday inside a run does not break it."""
    runs: list[tuple[date, date, int]] = []
    previous_was_hole = False
    for period in periods:
        is_hole = period.day in hole_days
        if is_hole and previous_was_hole:
            first, _, count = runs[-1]
            runs[-1] = (first, period.day, count + 1)
        elif is_hole:
            runs.append((period.day, period.day, 1))
        previous_was_hole = is_hole
    return runs
