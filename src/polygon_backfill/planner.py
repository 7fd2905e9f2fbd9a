"""Plan step: what is missing for one (ticker, timeframe), from its recorded coverage.

Coverage is a set of half-open intervals fetched successfully (empty ones included), so a
hole anywhere (an outage, a failed range, an earlier backfill start) is found, not only what
lies after the last stored bar. The trailing window is always asked again, because the
newest bars are published late and corrected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from polygon_backfill.models import (
    Timeframe,
    TimeRange,
    Timespan,
    datetime_to_ms,
    home_zone,
    merge_ranges,
    session_date,
    session_start,
)
from polygon_backfill.sessions import (
    base_aggregates,
    is_trading_day,
    may_hold_bars,
    session_dates,
    trading_hours,
)


@dataclass(frozen=True, slots=True)
class SymbolWork:
    """Everything one ticker needs in one run: ``(timeframe, range)`` pairs, in order."""

    ticker: str
    ranges: Sequence[tuple[Timeframe, TimeRange]] = field(default_factory=tuple)

    @property
    def timeframes(self) -> list[Timeframe]:
        return list(dict.fromkeys(timeframe for timeframe, _ in self.ranges))


def align_start(ticker: str, timeframe: Timeframe, moment: datetime) -> datetime:
    """Move ``moment`` back to the start of the bar that contains it, so a range never
    begins inside a bar (that bar would be skipped by the API's inclusive ``from``)."""
    if timeframe.is_daily:
        day = session_date(ticker, datetime_to_ms(moment))
        if timeframe.timespan is Timespan.WEEK:  # Polygon's weeks start on Sunday
            day -= timedelta(days=(day.weekday() + 1) % 7)
        return session_start(ticker, day)
    step_ms = int(timeframe.duration.total_seconds() * 1000)
    ms = datetime_to_ms(moment)
    return datetime.fromtimestamp((ms - ms % step_ms) / 1000, tz=UTC)


def subtract(window: TimeRange, covered: Iterable[TimeRange]) -> list[TimeRange]:
    """The parts of ``window`` that no interval in ``covered`` contains."""
    missing: list[TimeRange] = []
    cursor = window.start
    for item in merge_ranges(covered):
        if item.end <= cursor:
            continue
        if item.start >= window.end:
            break
        if item.start > cursor:
            missing.append(TimeRange(cursor, item.start))
        cursor = max(cursor, item.end)
    if cursor < window.end:
        missing.append(TimeRange(cursor, window.end))
    return missing


def missing_ranges(
    ticker: str,
    timeframe: Timeframe,
    coverage: Sequence[TimeRange],
    *,
    start: datetime,
    now: datetime,
    trailing_window: timedelta,
    holes: Iterable[TimeRange] = (),
    page_limit: int = 50_000,
) -> list[TimeRange]:
    """Ranges to fetch: ``[start, now)`` less what is covered, plus the trailing window and
    ``holes`` (covered sessions whose bars are gone, from ``coverage.holes``).

    Coverage inside the trailing window does not count, so late and corrected bars are
    fetched again on every run. Ranges start on bar boundaries; a range that holds no
    session (a weekend, a holiday) is never asked for, one that starts on days without a
    session starts at its first session instead, and two ranges with only days without a
    session between them, or that fit in one request of ``page_limit`` base aggregates
    together, are asked for as one.
    """
    window_start = align_start(ticker, timeframe, start)
    if now <= window_start:
        return []
    trusted_until = align_start(ticker, timeframe, now - trailing_window)
    trusted = [TimeRange(item.start, min(item.end, trusted_until)) for item in coverage
               if item.start < trusted_until]
    gaps = merge_ranges([*subtract(TimeRange(window_start, now), trusted), *holes])
    wanted: list[TimeRange] = []
    for gap in gaps:
        # From the start of the bar holding the first session still open at gap.start: a
        # daily bar fetched mid-session is asked again, a closed session's is not.
        first = _first_open_session(ticker, gap)
        if first is None:
            continue
        gap = TimeRange(align_start(ticker, timeframe, max(gap.start, first)), gap.end)
        if wanted and _one_request_will_do(ticker, timeframe, wanted[-1], gap, page_limit):
            gap = TimeRange(wanted.pop().start, gap.end)
        wanted.append(gap)
    return wanted


def _one_request_will_do(ticker: str, timeframe: Timeframe, before: TimeRange,
                         after: TimeRange, page_limit: int) -> bool:
    """Whether two ranges are better asked as one: only days without a session lie
    between them, or together they still fit in one request (holes a few sessions apart,
    such as a thin ticker's empty sessions, cost one request, not one each)."""
    if not may_hold_bars(ticker, timeframe, before.end, after.start):
        return True
    joined = TimeRange(before.start, after.end)
    return estimated_requests(ticker, timeframe, joined, page_limit) <= 1


def _first_open_session(ticker: str, span: TimeRange) -> datetime | None:
    """Local midnight of the first session in ``span`` that had not closed by
    ``span.start`` (a session that had closed was fetched whole, its daily bar final), or
    None when there is none: nothing in ``span`` to ask for."""
    zone = home_zone(ticker)
    for day in session_dates(ticker, span.start.astimezone(zone).date(),
                             span.end.astimezone(zone).date()):
        hours = trading_hours(ticker, day)
        if hours is not None and hours[1] > span.start and hours[0] < span.end:
            return session_start(ticker, day)
    return None


def estimated_requests(ticker: str, timeframe: Timeframe, span: TimeRange,
                       page_limit: int) -> int:
    """The fewest requests ``span`` needs under the paging rules, from the calendar."""
    zone = home_zone(ticker)
    day, last = span.start.astimezone(zone).date(), span.end.astimezone(zone).date()
    total = 0
    while day <= last:
        total += base_aggregates(ticker, day, intraday=not timeframe.is_daily)
        day += timedelta(days=1)
    return max(1, math.ceil(total / page_limit))


def estimated_page_bars(ticker: str, timeframe: Timeframe, span: TimeRange,
                        page_limit: int) -> int:
    """At most how many bars the first page of ``span`` holds, from the calendar (every
    day the span touches counted whole, and no more than a page's worth): what a request
    will hold in memory."""
    zone = home_zone(ticker)
    day, last = span.start.astimezone(zone).date(), span.end.astimezone(zone).date()
    total = 0
    while day <= last and total < page_limit:
        total += base_aggregates(ticker, day, intraday=not timeframe.is_daily)
        day += timedelta(days=1)
    per_bar = 1 if timeframe.is_daily else timeframe.duration // timedelta(minutes=1)
    return max(1, min(total, page_limit) // per_bar)


def split_range(ticker: str, timeframe: Timeframe, span: TimeRange,
                page_limit: int) -> list[TimeRange]:
    """Cut ``span`` into pieces of at most ``page_limit`` base aggregates each (estimated
    from the calendar), on bar boundaries, so the pieces can be fetched at the same time
    instead of one ``next_url`` after another. The request count stays the fewest the
    paging rules allow; where the estimate falls short, ``next_url`` still covers the rest."""
    zone = home_zone(ticker)
    pieces: list[TimeRange] = []
    start, budget = span.start, page_limit
    day = span.start.astimezone(zone).date()
    while True:
        day_start = session_start(ticker, day)
        if day_start >= span.end:
            break
        needed = base_aggregates(ticker, day, intraday=not timeframe.is_daily)
        if needed > budget and day_start > start:
            cut = max(start, align_start(ticker, timeframe, day_start))
            if cut > start:
                pieces.append(TimeRange(start, cut))
                start, budget = cut, page_limit
        budget -= needed
        day += timedelta(days=1)
    pieces.append(TimeRange(start, span.end))
    return pieces


def session_pieces(ticker: str, span: TimeRange) -> list[tuple[date, TimeRange]]:
    """Cut a daily ``span`` into one piece per session whose bar it holds, each piece with
    the session's date; together the pieces cover ``span`` exactly (days without a session
    ride along with the session before them, leading ones with the first), so a fetch of
    each session's bar may record its piece as covered."""
    zone = home_zone(ticker)
    day = span.start.astimezone(zone).date()
    days: list[date] = []
    while session_start(ticker, day) < span.end:
        if is_trading_day(ticker, day):
            days.append(day)
        day += timedelta(days=1)
    bounds = [span.start, *(session_start(ticker, day) for day in days[1:]), span.end]
    return [(day, TimeRange(bounds[i], bounds[i + 1])) for i, day in enumerate(days)]
