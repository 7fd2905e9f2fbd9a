"""Coverage by session: which sessions a page vouches for, holes as runs, the plan trimmed to
sessions, the split staleness rule, per-timeframe trailing windows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from polygon_backfill.config import Settings
from polygon_backfill.coverage import (
    DayState,
    day_state,
    expected_periods,
    hole_runs,
    is_covered,
    periods_between,
    vouched_sessions,
)
from polygon_backfill.errors import ConfigError
from polygon_backfill.models import (
    NEW_YORK,
    Bar,
    Split,
    Timeframe,
    TimeRange,
    datetime_to_ms,
    session_start,
)
from polygon_backfill.planner import missing_ranges
from polygon_backfill.splits import is_stale

DAY, HOUR, WEEK = Timeframe.parse("1d"), Timeframe.parse("1h"), Timeframe.parse("1w")


def ny(*args: int) -> datetime:
    return datetime(*args, tzinfo=NEW_YORK).astimezone(UTC)


def bar_at(moment: datetime) -> Bar:
    return Bar(t=datetime_to_ms(moment), open=1, high=2, low=1, close=1.5, volume=10)


def test_daily_periods_skip_weekends_and_holidays_and_key_on_new_york_midnight() -> None:
    periods = periods_between("AAPL", DAY, date(2025, 11, 26), date(2025, 12, 1))
    # Thanksgiving (27th) and the weekend have no session; the 28th closes early.
    assert [p.day for p in periods] == [date(2025, 11, 26), date(2025, 11, 28), date(2025, 12, 1)]
    assert periods[0].keys == TimeRange(ny(2025, 11, 26), ny(2025, 11, 27))
    assert periods[1].closes == ny(2025, 11, 28, 17)  # extended hours end 17:00 on early closes


def test_intraday_periods_need_the_trading_hours_crypto_the_whole_utc_day() -> None:
    (stock,) = periods_between("AAPL", HOUR, date(2025, 3, 10), date(2025, 3, 10))
    assert stock.needs == TimeRange(ny(2025, 3, 10, 4), ny(2025, 3, 10, 20))
    (coin,) = periods_between("X:BTCUSD", HOUR, date(2025, 3, 9), date(2025, 3, 9))
    assert coin.needs == TimeRange(datetime(2025, 3, 9, tzinfo=UTC),
                                   datetime(2025, 3, 10, tzinfo=UTC))


def test_weekly_periods_are_weeks_with_a_session_keyed_on_sunday() -> None:
    periods = periods_between("AAPL", WEEK, date(2025, 12, 21), date(2026, 1, 10))
    assert [p.day for p in periods] == [date(2025, 12, 21), date(2025, 12, 28),
                                        date(2026, 1, 4)]
    assert periods[0].needs.start == session_start("AAPL", date(2025, 12, 21))


def test_expected_periods_start_at_the_start_and_end_with_the_last_closed_session() -> None:
    periods = expected_periods("AAPL", DAY, ny(2025, 3, 3, 12), ny(2025, 3, 7, 15))
    assert [p.day for p in periods] == [date(2025, 3, 4), date(2025, 3, 5), date(2025, 3, 6)]


def test_a_page_vouches_for_sessions_inside_its_range_only() -> None:
    covered = TimeRange(ny(2025, 3, 3), ny(2025, 3, 8))  # Monday to Saturday
    bars = [bar_at(ny(2025, 3, 3)), bar_at(ny(2025, 3, 5))]
    assert vouched_sessions("AAPL", DAY, bars, covered) == (
        [date(2025, 3, 3), date(2025, 3, 5)], [date(2025, 3, 4), date(2025, 3, 6),
                                              date(2025, 3, 7)])
    # An intraday page ending mid-session vouches for nothing on that day.
    partial = TimeRange(ny(2025, 3, 3), ny(2025, 3, 4, 12))
    assert vouched_sessions("AAPL", HOUR, [bar_at(ny(2025, 3, 3, 9))], partial) == (
        [date(2025, 3, 3)], [])
    assert vouched_sessions("AAPL", DAY, bars, TimeRange(ny(2025, 3, 3), ny(2025, 3, 3))) == (
        [], [])


def test_day_state_and_hole_runs() -> None:
    periods = periods_between("AAPL", DAY, date(2025, 3, 3), date(2025, 3, 12))
    coverage = [TimeRange(ny(2025, 3, 3), ny(2025, 3, 11))]
    with_bars = {date(2025, 3, 3), date(2025, 3, 5), date(2025, 3, 6)}
    empty = {date(2025, 3, 4)}
    states = {p.day: day_state(p, coverage, with_bars, empty) for p in periods}
    assert states[date(2025, 3, 3)] is DayState.COMPLETE
    assert states[date(2025, 3, 4)] is DayState.COMPLETE   # verified empty
    assert states[date(2025, 3, 7)] is DayState.MISSING    # covered but no bar: deleted
    assert states[date(2025, 3, 11)] is DayState.MISSING   # never fetched
    holes = {day for day, state in states.items() if state is not DayState.COMPLETE}
    # Friday 7th and Monday 10th follow one another (the weekend is no session).
    assert hole_runs(periods, holes) == [(date(2025, 3, 7), date(2025, 3, 12), 4)]


def test_is_covered_needs_one_interval_holding_the_whole_span() -> None:
    coverage = [TimeRange(ny(2025, 1, 2), ny(2025, 1, 3)), TimeRange(ny(2025, 1, 3, 1),
                                                                     ny(2025, 1, 4))]
    assert is_covered(TimeRange(ny(2025, 1, 2, 4), ny(2025, 1, 2, 20)), coverage)
    assert not is_covered(TimeRange(ny(2025, 1, 2, 20), ny(2025, 1, 3, 2)), coverage)
    assert not is_covered(TimeRange(ny(2025, 1, 5), ny(2025, 1, 6)), coverage)


def test_plan_never_asks_for_a_range_without_a_session() -> None:
    friday_night = ny(2025, 8, 29, 21)
    covered = [TimeRange(ny(2025, 8, 1), friday_night)]
    # Labor Day Monday night, no trailing window: Saturday to Monday hold no session.
    assert missing_ranges("AAPL", HOUR, covered, start=ny(2025, 8, 1), now=ny(2025, 9, 1, 21),
                          trailing_window=timedelta(0)) == []
    # Tuesday night: from Tuesday, not from the weekend; Friday closed before it was
    # fetched, so its daily bar is final.
    tuesday_night = ny(2025, 9, 2, 21)
    for timeframe in (HOUR, DAY):
        assert missing_ranges("AAPL", timeframe, covered, start=ny(2025, 8, 1),
                              now=tuesday_night, trailing_window=timedelta(0)) == [
            TimeRange(ny(2025, 9, 2), tuesday_night)]


def test_a_daily_bar_fetched_mid_session_is_asked_again_after_the_close() -> None:
    covered = [TimeRange(ny(2025, 8, 1), ny(2025, 8, 29, 12))]  # Friday noon
    assert missing_ranges("AAPL", DAY, covered, start=ny(2025, 8, 1), now=ny(2025, 8, 30, 10),
                          trailing_window=timedelta(0)) == [
        TimeRange(ny(2025, 8, 29), ny(2025, 8, 30, 10))]
    # ... and marked verified only by a fetch that ran past the close.
    assert vouched_sessions("AAPL", DAY, [], TimeRange(ny(2025, 8, 29), ny(2025, 8, 29, 12))) \
        == ([], [])
    assert vouched_sessions("AAPL", DAY, [], TimeRange(ny(2025, 8, 29), ny(2025, 8, 29, 21))) \
        == ([], [date(2025, 8, 29)])


def test_plan_merges_holes_with_only_days_without_a_session_between_them() -> None:
    covered = [TimeRange(ny(2025, 3, 3), ny(2025, 3, 15))]
    holes = [TimeRange(ny(2025, 3, 7), ny(2025, 3, 8)), TimeRange(ny(2025, 3, 10),
                                                                  ny(2025, 3, 11))]
    assert missing_ranges("AAPL", DAY, covered, start=ny(2025, 3, 3), now=ny(2025, 3, 15),
                          trailing_window=timedelta(0), holes=holes) == [
        TimeRange(ny(2025, 3, 7), ny(2025, 3, 11))]


def test_split_lists_compared_to_the_recorded_one_or_to_the_oldest_write() -> None:
    split = Split(date(2025, 6, 9), 1, 4)
    assert is_stale([split], [], None)
    assert not is_stale([split], [split], None)
    assert is_stale([Split(date(2025, 6, 9), 1, 5)], [split], None)  # a corrected ratio
    # Never checked: stale only when the split took effect after the oldest write.
    assert is_stale([split], None, ny(2025, 6, 6, 12))
    assert not is_stale([split], None, ny(2025, 6, 10, 12))
    assert not is_stale([split], None, None)


def test_trailing_window_per_timeframe() -> None:
    settings = Settings(trailing_window_days=3, trailing_window_by_timeframe="1m=0.5,1d=10")
    assert settings.trailing_window_for(Timeframe.parse("1m")) == timedelta(hours=12)
    assert settings.trailing_window_for(DAY) == timedelta(days=10)
    assert settings.trailing_window_for(HOUR) == timedelta(days=3)
    for bad in ("1d", "1x=2", "1d=-1"):
        with pytest.raises((ConfigError, ValueError), match="TIMEFRAME=DAYS"):
            Settings(trailing_window_by_timeframe=bad)
