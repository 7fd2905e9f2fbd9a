"""The plan step: the backfill window less coverage, plus the trailing window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from polygon_backfill.models import Timeframe, TimeRange, merge_ranges
from polygon_backfill.planner import align_start, estimated_page_bars, missing_ranges, subtract

NOW = datetime(2026, 1, 9, 20, 0, tzinfo=UTC)
DAY = Timeframe.parse("1d")
FIVE = Timeframe.parse("5m")


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_first_run_plans_the_whole_window_from_an_aligned_start() -> None:
    """No coverage: one range from the bar containing the start up to now; a start on a
    day without a session (New Year's Day) moves to the next session's local midnight."""
    ranges = missing_ranges("AAPL", FIVE, [], start=at(2026, 1, 2, 10, 3), now=NOW,
                            trailing_window=timedelta(days=1))
    assert ranges == [TimeRange(at(2026, 1, 2, 10, 0), NOW)]
    ranges = missing_ranges("AAPL", FIVE, [], start=at(2026, 1, 1, 10, 3), now=NOW,
                            trailing_window=timedelta(days=1))
    assert ranges == [TimeRange(at(2026, 1, 2, 5, 0), NOW)]


def test_daily_start_aligns_to_new_york_midnight_and_crypto_to_utc() -> None:
    """Daily ranges begin at the session's local midnight (EST 05:00 UTC, EDT 04:00 UTC)."""
    assert align_start("AAPL", DAY, at(2026, 1, 5, 12)) == at(2026, 1, 5, 5)
    assert align_start("AAPL", DAY, at(2026, 7, 6, 12)) == at(2026, 7, 6, 4)
    assert align_start("AAPL", DAY, at(2026, 1, 5, 3)) == at(2026, 1, 4, 5)
    assert align_start("X:BTCUSD", DAY, at(2026, 1, 5, 3)) == at(2026, 1, 5)


def test_later_run_asks_only_after_coverage_plus_the_trailing_window() -> None:
    """Coverage up to an hour ago: only the trailing window (which contains it) is asked."""
    covered = [TimeRange(at(2025, 12, 1), NOW - timedelta(hours=1))]
    ranges = missing_ranges("X:BTCUSD", FIVE, covered, start=at(2025, 12, 1), now=NOW,
                            trailing_window=timedelta(days=1))
    assert ranges == [TimeRange(NOW - timedelta(days=1), NOW)]


def test_a_hole_in_the_middle_is_planned_as_well_as_the_tail() -> None:
    """An outage's hole is found from the intervals, not only what follows the last bar."""
    covered = [TimeRange(at(2025, 12, 1), at(2025, 12, 10)),
               TimeRange(at(2025, 12, 15), at(2026, 1, 9, 19))]
    ranges = missing_ranges("X:BTCUSD", FIVE, covered, start=at(2025, 12, 1), now=NOW,
                            trailing_window=timedelta(hours=2), page_limit=5_000)
    assert ranges == [TimeRange(at(2025, 12, 10), at(2025, 12, 15)),
                      TimeRange(at(2026, 1, 9, 18), NOW)]
    # When the two fit in one request of 50,000 minutes, they are asked as one.
    assert missing_ranges("X:BTCUSD", FIVE, covered, start=at(2025, 12, 1), now=NOW,
                          trailing_window=timedelta(hours=2)) == [
        TimeRange(at(2025, 12, 10), NOW)]


def test_an_earlier_start_is_filled_backwards() -> None:
    """Moving the backfill start earlier plans the part before the first coverage."""
    covered = [TimeRange(at(2025, 12, 1), NOW)]
    ranges = missing_ranges("X:BTCUSD", FIVE, covered, start=at(2025, 11, 1), now=NOW,
                            trailing_window=timedelta(0))
    assert ranges == [TimeRange(at(2025, 11, 1), at(2025, 12, 1))]


def test_merge_and_subtract_handle_touching_overlapping_and_disjoint_intervals() -> None:
    """Intervals join when they touch or overlap; subtraction leaves the exact rest."""
    merged = merge_ranges([TimeRange(at(2026, 1, 3), at(2026, 1, 4)),
                    TimeRange(at(2026, 1, 1), at(2026, 1, 2)),
                    TimeRange(at(2026, 1, 2), at(2026, 1, 3, 12))])
    assert merged == [TimeRange(at(2026, 1, 1), at(2026, 1, 4))]
    rest = subtract(TimeRange(at(2025, 12, 31), at(2026, 1, 6)),
                    [*merged, TimeRange(at(2026, 1, 5), at(2026, 1, 5, 6))])
    assert rest == [TimeRange(at(2025, 12, 31), at(2026, 1, 1)),
                    TimeRange(at(2026, 1, 4), at(2026, 1, 5)),
                    TimeRange(at(2026, 1, 5, 6), at(2026, 1, 6))]


def test_nothing_is_planned_when_the_start_is_in_the_future() -> None:
    """A start after now is an empty plan, not an error."""
    assert missing_ranges("AAPL", DAY, [], start=NOW + timedelta(days=2), now=NOW,
                          trailing_window=timedelta(days=3)) == []


def test_weekly_ranges_start_on_sunday_and_multi_day_bars_are_refused() -> None:
    """Polygon's week bars start Sunday 00:00 in the home zone; 2d/2w have no known anchor."""
    week = Timeframe.parse("1w")
    assert align_start("AAPL", week, at(2026, 1, 8, 15)) == at(2026, 1, 4, 5)
    assert align_start("X:BTCUSD", week, at(2026, 1, 4, 0)) == at(2026, 1, 4)
    for text in ("2d", "3w"):
        with pytest.raises(ValueError, match="only as 1d and 1w"):
            Timeframe.parse(text)


@pytest.mark.parametrize(("ticker", "timeframe", "days", "expected"), [
    # crypto trades every minute; every day the span touches counts whole (an upper
    # bound): 31 days of 288 five-minute bars
    ("X:BTCUSD", "5m", 30, 31 * 288),
    # a page holds 50,000 base aggregates (minutes), so at most 10,000 five-minute bars
    ("X:BTCUSD", "5m", 300, 10_000),
    ("X:BTCUSD", "1m", 300, 50_000),
    # stocks: 16 extended hours on each of the 21 sessions of 2024-03-04..2024-04-02
    # (Good Friday closed), 4 bars an hour
    ("AAPL", "15m", 30, 21 * 16 * 4),
    ("AAPL", "1d", 30, 21),
])
def test_a_first_page_is_weighed_by_the_bars_the_calendar_puts_in_it(
        ticker: str, timeframe: str, days: int, expected: int) -> None:
    start = datetime(2024, 3, 4, tzinfo=UTC) if days == 30 else datetime(2023, 6, 1, tzinfo=UTC)
    span = TimeRange(start, start + timedelta(days=days))
    assert estimated_page_bars(ticker, Timeframe.parse(timeframe), span, 50_000) == expected
