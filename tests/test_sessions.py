"""The trading calendar: NYSE for stocks and indices (holidays, special closures, early
closes), every UTC day for crypto, Sunday to Friday for forex; the daemon and the sandbox
must agree on it."""

from __future__ import annotations

import warnings
from datetime import UTC, date, datetime, timedelta

import exchange_calendars
import pytest

from polygon_backfill.models import NEW_YORK, AssetClass, Timeframe, Timespan, datetime_to_ms
from polygon_backfill.sandbox import sessions as sandbox_sessions
from polygon_backfill.sandbox.synthetic import SyntheticSource
from polygon_backfill.sessions import (
    base_aggregates,
    holds_full_session,
    is_early_close,
    is_trading_day,
    may_hold_bars,
    nyse_session,
    session_dates,
    trading_hours,
)

GOOD_FRIDAY = date(2025, 4, 18)
CARTER_MOURNING = date(2025, 1, 9)  # national day of mourning: an unscheduled closure
SANDY = (date(2012, 10, 29), date(2012, 10, 30))  # hurricane: two days closed
BUSH_MOURNING = date(2018, 12, 5)
BLACK_FRIDAY = date(2025, 11, 28)  # the day after Thanksgiving: 13:00 close
CHRISTMAS_EVE = date(2025, 12, 24)  # also 13:00
NORMAL_DAY = date(2025, 11, 26)
CLOSED = (GOOD_FRIDAY, CARTER_MOURNING, *SANDY, BUSH_MOURNING, date(2025, 12, 25))
ONE_MINUTE = Timeframe.parse("1m")


def ny(day: date, hour: int, minute: int = 0) -> datetime:
    """A New York wall time as aware UTC."""
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=NEW_YORK).astimezone(UTC)


@pytest.mark.parametrize("day", CLOSED)
def test_nyse_holidays_and_closures_have_no_stock_or_index_session(day: date) -> None:
    for ticker in ("AAPL", "SPY", "I:SPX"):
        assert not is_trading_day(ticker, day)
        assert trading_hours(ticker, day) is None
        assert base_aggregates(ticker, day, intraday=True) == 0
        assert base_aggregates(ticker, day, intraday=False) == 0
    assert is_trading_day("X:BTCUSD", day)
    assert trading_hours("X:BTCUSD", day) == (datetime(day.year, day.month, day.day,
                                                       tzinfo=UTC),
                                               datetime(day.year, day.month, day.day,
                                                        tzinfo=UTC) + timedelta(days=1))


def test_a_normal_day_has_extended_hours_for_stocks_and_the_regular_session_for_indices(
) -> None:
    assert trading_hours("AAPL", NORMAL_DAY) == (ny(NORMAL_DAY, 4), ny(NORMAL_DAY, 20))
    assert trading_hours("I:SPX", NORMAL_DAY) == (ny(NORMAL_DAY, 9, 30), ny(NORMAL_DAY, 16))
    assert not is_early_close("AAPL", NORMAL_DAY)
    assert base_aggregates("AAPL", NORMAL_DAY, intraday=True) == 960
    assert base_aggregates("I:SPX", NORMAL_DAY, intraday=True) == 390
    assert base_aggregates("X:BTCUSD", NORMAL_DAY, intraday=True) == 1440
    assert base_aggregates("AAPL", NORMAL_DAY, intraday=False) == 1


@pytest.mark.parametrize("day", [BLACK_FRIDAY, CHRISTMAS_EVE, date(2024, 7, 3)])
def test_early_close_days_stop_at_13_00_and_after_hours_at_17_00(day: date) -> None:
    assert is_early_close("AAPL", day)
    assert is_early_close("I:SPX", day)
    assert not is_early_close("X:BTCUSD", day)
    assert not is_early_close("C:EURUSD", day)
    assert trading_hours("AAPL", day) == (ny(day, 4), ny(day, 17))
    assert trading_hours("I:SPX", day) == (ny(day, 9, 30), ny(day, 13))
    assert base_aggregates("AAPL", day, intraday=True) == 780
    assert base_aggregates("I:SPX", day, intraday=True) == 210
    assert base_aggregates("AAPL", day, intraday=False) == 1


def test_black_friday_2025_in_utc() -> None:
    """EST: 04:00 New York is 09:00 UTC, the 17:00 end is 22:00 UTC, 13:00 is 18:00 UTC."""
    assert trading_hours("AAPL", BLACK_FRIDAY) == (datetime(2025, 11, 28, 9, tzinfo=UTC),
                                                   datetime(2025, 11, 28, 22, tzinfo=UTC))
    assert trading_hours("I:SPX", BLACK_FRIDAY)[1] == datetime(2025, 11, 28, 18, tzinfo=UTC)


def test_trading_hours_follow_new_york_across_the_dst_change() -> None:
    """2025-03-09 (Sunday) moved New York to EDT: 04:00 is 09:00 UTC on Friday the 7th and
    08:00 UTC on Monday the 10th; the weekend between has no session."""
    assert trading_hours("AAPL", date(2025, 3, 7)) == (datetime(2025, 3, 7, 9, tzinfo=UTC),
                                                       datetime(2025, 3, 8, 1, tzinfo=UTC))
    assert trading_hours("AAPL", date(2025, 3, 9)) is None
    assert trading_hours("AAPL", date(2025, 3, 10)) == (datetime(2025, 3, 10, 8, tzinfo=UTC),
                                                        datetime(2025, 3, 11, 0, tzinfo=UTC))
    assert trading_hours("I:SPX", date(2025, 3, 10)) == (
        datetime(2025, 3, 10, 13, 30, tzinfo=UTC), datetime(2025, 3, 10, 20, tzinfo=UTC))
    assert base_aggregates("AAPL", date(2025, 3, 10), intraday=True) == 960


def test_session_dates_of_2025_match_the_exchange_calendar() -> None:
    first, last = date(2025, 1, 1), date(2025, 12, 31)
    days = session_dates("AAPL", first, last)
    with warnings.catch_warnings():  # the library's pandas deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        calendar = exchange_calendars.get_calendar("XNYS")
    expected = [ts.date() for ts in
                calendar.sessions_in_range(first.isoformat(), last.isoformat())]
    assert days == expected
    assert len(days) == 250
    assert session_dates("I:SPX", first, last) == days
    assert GOOD_FRIDAY not in days
    assert CARTER_MOURNING not in days
    assert len(session_dates("X:BTCUSD", first, last)) == 365


def test_session_dates_are_ascending_and_inclusive() -> None:
    assert session_dates("AAPL", date(2025, 4, 16), date(2025, 4, 21)) == [
        date(2025, 4, 16), date(2025, 4, 17), date(2025, 4, 21)]
    assert session_dates("AAPL", NORMAL_DAY, NORMAL_DAY) == [NORMAL_DAY]
    assert session_dates("AAPL", GOOD_FRIDAY, GOOD_FRIDAY) == []
    assert session_dates("AAPL", NORMAL_DAY, NORMAL_DAY - timedelta(days=1)) == []


def test_forex_trades_sunday_to_friday() -> None:
    """Saturday 2025-11-29 is the only closed day of the week; NYSE holidays do not count."""
    week = session_dates("C:EURUSD", date(2025, 11, 23), date(2025, 11, 29))
    assert week == [date(2025, 11, 23) + timedelta(days=n) for n in range(6)]
    assert is_trading_day("C:EURUSD", GOOD_FRIDAY)
    assert trading_hours("C:EURUSD", date(2025, 11, 29)) is None


def test_outside_the_loaded_calendar_the_weekday_rule_applies() -> None:
    """1985-12-25 and 2100-12-24 fall outside 1990-2099: a weekday is a full session."""
    for day in (date(1985, 12, 25), date(2100, 12, 24)):
        assert day.weekday() < 5
        assert trading_hours("I:SPX", day) == (ny(day, 9, 30), ny(day, 16))
        assert not is_early_close("AAPL", day)
    assert trading_hours("AAPL", date(2100, 12, 25)) is None  # a Saturday
    # Inside the calendar the same kind of day is a holiday.
    assert trading_hours("AAPL", date(2098, 12, 25)) is None


def test_holds_full_session_knows_holidays_and_short_sessions() -> None:
    """Good Friday's whole day holds no session (an empty answer is believed); an early
    close's session is whole at 13:00."""
    assert not holds_full_session("AAPL", ny(GOOD_FRIDAY, 0), ny(GOOD_FRIDAY, 23))
    assert holds_full_session("X:BTCUSD", datetime(2025, 4, 18, tzinfo=UTC),
                              datetime(2025, 4, 19, tzinfo=UTC))
    assert holds_full_session("AAPL", ny(BLACK_FRIDAY, 9, 30), ny(BLACK_FRIDAY, 13))
    assert not holds_full_session("AAPL", ny(NORMAL_DAY, 9, 30), ny(NORMAL_DAY, 13))
    assert holds_full_session("I:SPX", ny(NORMAL_DAY, 9, 30), ny(NORMAL_DAY, 16))


def test_may_hold_bars_skips_holidays_and_the_end_of_early_closes() -> None:
    assert not may_hold_bars("AAPL", ONE_MINUTE, ny(GOOD_FRIDAY, 0), ny(GOOD_FRIDAY, 23))
    assert not may_hold_bars("AAPL", ONE_MINUTE, ny(BLACK_FRIDAY, 17), ny(BLACK_FRIDAY, 23))
    assert may_hold_bars("AAPL", ONE_MINUTE, ny(NORMAL_DAY, 17), ny(NORMAL_DAY, 23))
    assert not may_hold_bars("I:SPX", ONE_MINUTE, ny(BLACK_FRIDAY, 13), ny(BLACK_FRIDAY, 16))
    day = Timeframe.parse("1d")
    assert not may_hold_bars("AAPL", day, ny(GOOD_FRIDAY, 0), ny(GOOD_FRIDAY, 23))
    assert may_hold_bars("X:BTCUSD", day, datetime(2025, 4, 18, tzinfo=UTC),
                         datetime(2025, 4, 18, 1, tzinfo=UTC))


def test_nyse_session_is_the_regular_session() -> None:
    assert nyse_session(BLACK_FRIDAY) == (ny(BLACK_FRIDAY, 9, 30), ny(BLACK_FRIDAY, 13))
    assert nyse_session(GOOD_FRIDAY) is None


# -- the sandbox agrees ------------------------------------------------------------------

_KINDS = {"AAPL": AssetClass.STOCK, "I:SPX": AssetClass.INDEX}


@pytest.mark.parametrize("ticker", list(_KINDS))
@pytest.mark.parametrize("day", [*CLOSED, BLACK_FRIDAY, CHRISTMAS_EVE, NORMAL_DAY,
                                 date(2025, 3, 10), date(2025, 11, 3), date(2025, 3, 8)])
def test_sandbox_day_session_agrees_with_the_daemon(ticker: str, day: date) -> None:
    hours = trading_hours(ticker, day)
    expected = None if hours is None else (datetime_to_ms(hours[0]), datetime_to_ms(hours[1]))
    assert sandbox_sessions.day_session(_KINDS[ticker], day.toordinal()) == expected
    assert sandbox_sessions.is_trading_day(day) == is_trading_day(ticker, day)


def test_sandbox_agrees_with_the_daemon_on_every_day_of_2025() -> None:
    for ticker, kind in _KINDS.items():
        day = date(2025, 1, 1)
        while day.year == 2025:
            hours = trading_hours(ticker, day)
            session = sandbox_sessions.day_session(kind, day.toordinal())
            assert (session is None) == (hours is None), (ticker, day)
            if hours is not None and session is not None:
                assert session == (datetime_to_ms(hours[0]), datetime_to_ms(hours[1]))
            day += timedelta(days=1)


def test_sandbox_forex_week_lies_inside_the_daemons_forex_days() -> None:
    """The sandbox trades forex Sunday 17:00 to Friday 17:00 New York; the daemon expects
    bars on any UTC day but Saturday, so every sandbox minute is one it allows for."""
    start = datetime(2025, 11, 22, tzinfo=UTC)  # a Saturday
    for a, b in sandbox_sessions.sessions_after(AssetClass.FOREX, datetime_to_ms(start)):
        if a >= datetime_to_ms(start + timedelta(days=14)):
            break
        for edge in (a, b - 1):
            moment = datetime.fromtimestamp(edge / 1000, tz=UTC)
            assert trading_hours("C:EURUSD", moment.date()) is not None


def test_sandbox_overlap_has_no_minutes_on_a_holiday() -> None:
    start, end = datetime_to_ms(ny(GOOD_FRIDAY, 0)), datetime_to_ms(ny(GOOD_FRIDAY, 23, 59))
    for kind in (AssetClass.STOCK, AssetClass.INDEX):
        assert sandbox_sessions.overlap(kind, start, end) is None
    assert sandbox_sessions.overlap(AssetClass.CRYPTO, start, end) is not None
    # An early close: stocks trade 04:00-17:00 (780 minutes), indices 09:30-13:00.
    start, end = datetime_to_ms(ny(BLACK_FRIDAY, 0)), datetime_to_ms(ny(BLACK_FRIDAY, 23))
    assert sandbox_sessions.overlap(AssetClass.STOCK, start, end) == (
        datetime_to_ms(ny(BLACK_FRIDAY, 4)), datetime_to_ms(ny(BLACK_FRIDAY, 17)), 780)
    assert sandbox_sessions.overlap(AssetClass.INDEX, start, end) == (
        datetime_to_ms(ny(BLACK_FRIDAY, 9, 30)), datetime_to_ms(ny(BLACK_FRIDAY, 13)), 210)


def test_synthetic_bars_skip_holidays_and_stop_at_early_closes() -> None:
    source = SyntheticSource(date(2020, 1, 1))

    def times(ticker: str, timespan: Timespan, day: date) -> list[int]:
        lo, hi = datetime_to_ms(ny(day, 0)), datetime_to_ms(ny(day, 23, 59))
        return [int(bar["t"]) for bar, _ in source.select(ticker, 1, timespan, lo, hi, False)]

    for ticker in ("AAPL", "I:SPX"):
        assert times(ticker, Timespan.MINUTE, GOOD_FRIDAY) == []
        assert times(ticker, Timespan.DAY, GOOD_FRIDAY) == []
        assert times(ticker, Timespan.DAY, BLACK_FRIDAY) == [datetime_to_ms(ny(BLACK_FRIDAY, 0))]
    minutes = times("AAPL", Timespan.MINUTE, BLACK_FRIDAY)
    assert minutes
    assert max(minutes) < datetime_to_ms(ny(BLACK_FRIDAY, 17))
    assert min(minutes) >= datetime_to_ms(ny(BLACK_FRIDAY, 4))
    index_minutes = times("I:SPX", Timespan.MINUTE, BLACK_FRIDAY)
    assert index_minutes[-1] == datetime_to_ms(ny(BLACK_FRIDAY, 12, 59))
    assert times("X:BTCUSD", Timespan.MINUTE, GOOD_FRIDAY)
