"""Grouped daily: the nightly one-day update of many stocks in one request per date.

``GET /v2/aggs/grouped/locale/us/market/stocks/{date}`` answers for every US stock at
once. For the usual nightly run (each ticker missing its last session or two, plus the
trailing window) that is D requests instead of one per ticker, so the plan step hands
short missing 1d ranges of plain stocks to this module whenever D is the smaller count.

Nothing is recorded as empty on the grouped answer's word alone: a ticker absent from it
(halted, delisted, renamed, or the answer is short) keeps that session in the per-ticker
plan, as does every ticker of a date whose grouped request failed. A present bar is written
with the piece of the range its session vouches for, through the scheduler's ``_write``, so
bars and coverage commit together. The grouped bar's ``t`` is 16:00 New York; the store
keys daily bars by session date, so it lands on the per-ticker bar's row, never beside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time

import structlog

from polygon_backfill.clients import Page
from polygon_backfill.errors import AuthenticationError
from polygon_backfill.models import (
    NEW_YORK,
    AssetClass,
    Bar,
    Timeframe,
    TimeRange,
    Timespan,
    asset_class,
    merge_ranges,
    session_date,
)
from polygon_backfill.planner import SymbolWork, estimated_requests, session_pieces
from polygon_backfill.summary import (
    PairOutcome,
    PassHooks,
    TickerResult,
)

log = structlog.get_logger(__name__)

DAILY = Timeframe(1, Timespan.DAY)
# Regular close: the grouped answer for a date is complete only after it.
_CLOSE = time(16, 0)
# Tickers written at the same time (each write is one short transaction).
_WRITERS = 4

FetchGrouped = Callable[[date], Awaitable[dict[str, Bar]]]


@dataclass(frozen=True, slots=True)
class GroupedSlice:
    """One ticker's missing 1d range, cut into one piece per session (``session_pieces``)."""

    ticker: str
    span: TimeRange
    pieces: tuple[tuple[date, TimeRange], ...]


@dataclass(frozen=True, slots=True)
class GroupedPlan:
    """The dates to fetch grouped, the ranges they serve, and the per-ticker requests
    those ranges would have cost."""

    dates: tuple[date, ...]
    slices: tuple[GroupedSlice, ...]
    replaced_requests: int


def _session_closed(day: date, now: datetime) -> bool:
    return datetime.combine(day, _CLOSE, tzinfo=NEW_YORK) < now


def _slice_for(ticker: str, timeframe: Timeframe, span: TimeRange, now: datetime,
               max_sessions: int) -> GroupedSlice | None:
    """The range as a grouped slice, or None when it stays per-ticker: not a plain stock's
    1d range, no session or more than ``max_sessions``, or a session not closed yet (its
    grouped answer is not out)."""
    if timeframe != DAILY or asset_class(ticker) is not AssetClass.STOCK:
        return None
    pieces = session_pieces(ticker, span)
    if not 1 <= len(pieces) <= max_sessions:
        return None
    if not all(_session_closed(day, now) for day, _ in pieces):
        return None
    return GroupedSlice(ticker, span, tuple(pieces))


def plan_grouped_daily(plan: Sequence[SymbolWork], *, now: datetime, max_sessions: int,
                       page_limit: int) -> tuple[GroupedPlan | None, list[SymbolWork]]:
    """Split ``plan`` into grouped dates and the per-ticker plan left.

    Short 1d ranges of plain stocks (at most ``max_sessions`` sessions, all closed) go
    grouped when their distinct session dates D are fewer than the per-ticker requests
    they would take (one per range: T for the nightly update of T tickers); otherwise,
    or with ``max_sessions`` 0, the plan comes back unchanged and the first item is None.
    The plan left keeps every ticker, in order, with the grouped ranges taken out.
    """
    if max_sessions <= 0:
        return None, list(plan)
    slices: list[GroupedSlice] = []
    left: list[SymbolWork] = []
    for work in plan:
        kept = []
        for timeframe, span in work.ranges:
            piece = _slice_for(work.ticker, timeframe, span, now, max_sessions)
            if piece is None:
                kept.append((timeframe, span))
            else:
                slices.append(piece)
        left.append(SymbolWork(work.ticker, tuple(kept)))
    dates = sorted({day for item in slices for day, _ in item.pieces})
    per_ticker = sum(estimated_requests(item.ticker, DAILY, item.span, page_limit)
                     for item in slices)
    if not slices or len(dates) >= per_ticker:
        return None, list(plan)
    return GroupedPlan(tuple(dates), tuple(slices), per_ticker), left


def with_fallback(plan: Sequence[SymbolWork],
                  fallback: dict[str, list[TimeRange]]) -> list[SymbolWork]:
    """``plan`` with each ticker's fallback 1d ranges added back, and tickers left with
    nothing to do dropped."""
    result = []
    for work in plan:
        extra = merge_ranges(fallback.get(work.ticker, []))
        ranges = list(work.ranges)
        if extra:
            daily = sorted([span for tf, span in ranges if tf == DAILY] + extra,
                           key=lambda span: span.start)
            others = [(tf, span) for tf, span in ranges if tf != DAILY]
            ranges = others + [(DAILY, span) for span in daily]
        if ranges:
            result.append(SymbolWork(work.ticker, tuple(ranges)))
    return result


def _merge_pairs(first: PairOutcome, second: PairOutcome) -> PairOutcome:
    ok = first.ok and second.ok
    errors = [error for error in (first.error, second.error) if error]
    return replace(
        second, ok=ok, ranges=first.ranges + second.ranges, pages=first.pages + second.pages,
        inserted=first.inserted + second.inserted, updated=first.updated + second.updated,
        rejected=first.rejected + second.rejected, error="; ".join(errors) or None,
        skipped=not ok and all(pair.ok or pair.skipped for pair in (first, second)))


def merge_results(grouped: dict[str, TickerResult],
                  per_ticker: dict[str, TickerResult]) -> dict[str, TickerResult]:
    """One result per ticker: a pair served both ways counts once, with both's figures."""
    merged = dict(grouped)
    for ticker, result in per_ticker.items():
        earlier = merged.get(ticker)
        if earlier is None:
            merged[ticker] = result
            continue
        pairs = {pair.timeframe: pair for pair in earlier.pairs}
        for pair in result.pairs:
            pairs[pair.timeframe] = (_merge_pairs(pairs[pair.timeframe], pair)
                                     if pair.timeframe in pairs else pair)
        merged[ticker] = TickerResult(ticker, list(pairs.values()),
                                      earlier.db_seconds + result.db_seconds)
    return merged


@dataclass(slots=True)
class _Fetched:
    """Each date's answer (only the tickers asked about), or why it has none."""

    answers: dict[date, dict[str, Bar]] = field(default_factory=dict)
    failed: dict[date, str] = field(default_factory=dict)


class GroupedDailyBackfill:
    """Fetches a :class:`GroupedPlan`'s dates and writes each ticker's bars; what it
    cannot vouch for goes back into the per-ticker plan."""

    def __init__(self, *, fetch: FetchGrouped, hooks: PassHooks, max_in_flight: int) -> None:
        self._fetch = fetch
        self._write = hooks.write
        self._note_failure = hooks.note_failure
        self._finish_pair = hooks.finish_pair
        self._stop = hooks.stop
        self._clock = hooks.clock
        self._max_in_flight = max_in_flight

    async def run(self, grouped: GroupedPlan, left: Sequence[SymbolWork]
                  ) -> tuple[list[SymbolWork], dict[str, TickerResult]]:
        """Serve ``grouped``; returns the per-ticker plan (``left`` plus the fallback
        ranges) and the results of the tickers written here. Raises AuthenticationError
        (the key was refused: every other request would be too)."""
        fetched = await self._fetch_dates(grouped)
        by_ticker: dict[str, list[GroupedSlice]] = {}
        for item in grouped.slices:
            by_ticker.setdefault(item.ticker, []).append(item)
        results: dict[str, TickerResult] = {}
        fallback: dict[str, list[TimeRange]] = {}
        writers = asyncio.Semaphore(_WRITERS)

        async def serve(ticker: str, slices: list[GroupedSlice]) -> None:
            async with writers:
                if self._stop.is_set():
                    return
                result = TickerResult(ticker)
                results[ticker] = result
                await self._serve_ticker(ticker, slices, fetched, result,
                                         fallback.setdefault(ticker, []))

        await asyncio.gather(*(serve(ticker, slices) for ticker, slices in by_ticker.items()))
        fallback = {ticker: spans for ticker, spans in fallback.items() if spans}
        continuing = {work.ticker for work in left if DAILY in work.timeframes} | set(fallback)
        for ticker, result in results.items():
            if ticker not in continuing:  # else the per-ticker pass finishes the pair
                await self._finish_pair(ticker, DAILY, result.pairs[0])
        served = sorted(ticker for ticker, result in results.items()
                        if result.pairs[0].pages)
        log.info("backfill.grouped_daily",
                 message=f"Grouped daily: {len(grouped.dates)} date(s) in "
                         f"{len(grouped.dates)} request(s) instead of "
                         f"{grouped.replaced_requests}, bars for {len(served)} ticker(s); "
                         f"{len(fallback)} ticker(s) left to per-ticker requests",
                 dates=[day.isoformat() for day in grouped.dates], tickers=served,
                 per_ticker_fallback=sorted(fallback),
                 failed_dates={day.isoformat(): why for day, why in fetched.failed.items()},
                 replaced_requests=grouped.replaced_requests)
        return with_fallback(left, fallback), results

    async def _fetch_dates(self, grouped: GroupedPlan) -> _Fetched:
        """Every date, ``max_in_flight`` at a time (the client's limiter paces them); a
        date that fails after the client's retries is left to per-ticker requests."""
        wanted: dict[date, set[str]] = {}
        for item in grouped.slices:
            for day, _ in item.pieces:
                wanted.setdefault(day, set()).add(item.ticker)
        fetched = _Fetched()
        gate = asyncio.Semaphore(self._max_in_flight)

        async def fetch(day: date) -> None:
            async with gate:
                if self._stop.is_set():
                    fetched.failed[day] = "stopped"
                    return
                try:
                    bars = await self._fetch(day)
                except AuthenticationError:
                    raise
                except Exception as exc:
                    fetched.failed[day] = str(exc)
                    log.warning("backfill.grouped_daily_failed",
                                message=f"Grouped daily {day} failed, its tickers are asked "
                                        f"one by one: {exc}", date=day.isoformat(),
                                error_type=type(exc).__name__)
                    return
                fetched.answers[day] = {ticker: bars[ticker] for ticker in wanted[day]
                                        if ticker in bars}

        outcomes = await asyncio.gather(*(fetch(day) for day in grouped.dates),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return fetched

    async def _serve_ticker(self, ticker: str, slices: list[GroupedSlice], fetched: _Fetched,
                            result: TickerResult, fallback: list[TimeRange]) -> None:
        """Write each run of consecutive sessions that the answers hold as one page, its
        pieces as coverage; a session without a bar (or whose date failed) falls back."""
        outcome = PairOutcome(ticker, DAILY.name)
        result.pairs.append(outcome)
        runs: list[list[tuple[Bar, TimeRange]]] = []
        for item in slices:
            outcome.ranges += 1
            runs.append([])
            for day, piece in item.pieces:
                bar = fetched.answers.get(day, {}).get(ticker)
                if bar is None or session_date(ticker, bar.t) != day:
                    fallback.append(piece)  # absent, or stamped for another session
                    runs.append([])
                else:
                    runs[-1].append((bar, piece))
        for run in filter(None, runs):
            if self._stop.is_set():
                outcome.ok, outcome.error = False, "stopped before completion"
                return
            page = Page([bar for bar, _ in run], TimeRange(run[0][1].start, run[-1][1].end), 0)
            written_at = self._clock.monotonic()
            try:
                written = await self._write(ticker, DAILY, page)
            except Exception as exc:
                self._note_failure(ticker, DAILY, outcome, exc)
                return
            finally:
                result.db_seconds += self._clock.monotonic() - written_at
            outcome.pages += 1
            outcome.inserted += written.inserted
            outcome.updated += written.updated
