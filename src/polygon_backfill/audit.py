"""What ``gaps``, ``verify`` and ``report`` find: the table measured against the calendar
(every session expected against the bars stored) and against the API itself."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from polygon_backfill.clients import PolygonClient
from polygon_backfill.config import Settings
from polygon_backfill.coverage import (
    DayState,
    Period,
    day_state,
    expected_periods,
    hole_runs,
)
from polygon_backfill.errors import AuthenticationError, PolygonError
from polygon_backfill.models import Timeframe, Timespan, canonical_bar_time
from polygon_backfill.report import CoverageGrid, CoverageRow
from polygon_backfill.storage import BarStore, StoredBar

_FIELDS = ("open", "high", "low", "close", "volume", "vwap", "trades")


@dataclass(frozen=True, slots=True)
class PairGaps:
    """One pair's holes: runs of consecutive incomplete sessions."""

    ticker: str
    timeframe: str
    expected: int
    runs: list[tuple[date, date, int]]

    @property
    def missing(self) -> int:
        return sum(count for _, _, count in self.runs)


@dataclass(slots=True)
class _PairState:
    ticker: str
    timeframe: Timeframe
    periods: list[Period]
    states: dict[date, DayState]
    with_bars: set[date]


async def _pair_state(store: BarStore, ticker: str, timeframe: Timeframe, start: datetime,
                      now: datetime) -> _PairState:
    periods = expected_periods(ticker, timeframe, start, now)
    coverage = await store.coverage(ticker, timeframe)
    with_bars, verified_empty = await store.session_marks(ticker, timeframe, periods)
    states = {period.day: day_state(period, coverage, with_bars, verified_empty)
              for period in periods}
    return _PairState(ticker, timeframe, periods, states, with_bars)


async def _pair_states(store: BarStore, settings: Settings, now: datetime) -> list[_PairState]:
    return [await _pair_state(store, ticker, timeframe,
                              settings.backfill_start_for(ticker, now), now)
            for ticker in settings.tickers for timeframe in settings.timeframes]


async def find_gaps(store: BarStore, settings: Settings, now: datetime) -> list[PairGaps]:
    """Every configured pair's holes between its backfill start and ``now``."""
    found = []
    for pair in await _pair_states(store, settings, now):
        hole_days = {day for day, state in pair.states.items() if state is not DayState.COMPLETE}
        found.append(PairGaps(pair.ticker, pair.timeframe.name, len(pair.periods),
                              hole_runs(pair.periods, hole_days)))
    return found


async def coverage_grid(store: BarStore, settings: Settings, now: datetime) -> CoverageGrid:
    """Tickers by day, for ``report``: each configured pair's state on every calendar day
    from the earliest backfill start to the last day whose sessions have closed."""
    pairs = await _pair_states(store, settings, now)
    first_days = [pair.periods[0].day for pair in pairs if pair.periods]
    first_day = min(first_days) if first_days else now.date()
    last_day = (now - timedelta(days=1)).date()
    days = [first_day + timedelta(days=offset)
            for offset in range((last_day - first_day).days + 1)]
    rows = []
    for pair in pairs:
        states = pair.states
        if pair.timeframe.timespan is Timespan.WEEK:  # a week's state on each of its days
            states = {day: state for sunday, state in pair.states.items()
                      for day in (sunday + timedelta(days=offset) for offset in range(7))}
        rows.append(CoverageRow(f"{pair.ticker} {pair.timeframe}",
                                [states.get(day, DayState.NO_SESSION) for day in days]))
    return CoverageGrid(first_day=first_day, rows=rows, generated_at=now,
                        title=f"Coverage of {len(settings.tickers)} ticker(s) x "
                              f"{len(settings.timeframes)} timeframe(s), "
                              f"{first_day} to {last_day}")


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One difference between the table and the API: a bar on one side only, or a value."""

    ticker: str
    timeframe: str
    bar_time: datetime
    field: str
    stored: object
    api: object

    def describe(self) -> str:
        return (f"{self.ticker} {self.timeframe} {self.bar_time:%Y-%m-%d %H:%M}Z "
                f"{self.field}: table {self.stored!r}, API {self.api!r}")


@dataclass(slots=True)
class Verification:
    """What ``verify`` checked and found."""

    sessions: list[tuple[str, str, date]] = field(default_factory=list)
    bars_compared: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # sessions the API did not answer


async def verify_sample(store: BarStore, client: PolygonClient, settings: Settings,
                        now: datetime, sample: int, rng: random.Random) -> Verification:
    """Fetch ``sample`` stored sessions again, drawn at random among every configured
    pair's complete sessions that hold bars, and compare them bar by bar and value by
    value."""
    candidates = [(pair, period) for pair in await _pair_states(store, settings, now)
                  for period in pair.periods
                  if pair.states[period.day] is DayState.COMPLETE
                  and period.day in pair.with_bars]
    chosen = rng.sample(candidates, min(sample, len(candidates)))
    chosen.sort(key=lambda item: (item[0].ticker, item[0].timeframe.name, item[1].day))
    result = Verification()
    for pair, period in chosen:
        result.sessions.append((pair.ticker, pair.timeframe.name, period.day))
        stored = await store.fetch_bars(pair.ticker, pair.timeframe,
                                        period.keys.start, period.keys.end)
        try:
            fetched = await client.fetch_range(pair.ticker, pair.timeframe,
                                               period.keys.start, period.keys.end)
        except AuthenticationError:
            raise
        except PolygonError as exc:  # one session's failure does not end the check
            result.failed.append(f"{pair.ticker} {pair.timeframe} {period.day}: {exc}")
            continue
        api = {canonical_bar_time(pair.ticker, pair.timeframe, bar.t): bar for bar in fetched}
        result.bars_compared += len(set(api) | {bar.bar_time for bar in stored})
        result.mismatches += _compare(pair.ticker, pair.timeframe.name, stored, api)
    return result


def _compare(ticker: str, timeframe: str, stored: Sequence[StoredBar],
             api: dict[datetime, object]) -> list[Mismatch]:
    found = []
    table = {bar.bar_time: bar for bar in stored}
    for bar_time in sorted(set(table) | set(api)):
        ours, theirs = table.get(bar_time), api.get(bar_time)
        if ours is None or theirs is None:
            found.append(Mismatch(ticker, timeframe, bar_time, "bar",
                                  "present" if ours else "absent",
                                  "present" if theirs else "absent"))
            continue
        for name in _FIELDS:
            mine, other = getattr(ours, name), getattr(theirs, name)
            if mine != other:
                found.append(Mismatch(ticker, timeframe, bar_time, name, mine, other))
    return found
