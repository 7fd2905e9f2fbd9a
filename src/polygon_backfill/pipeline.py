"""The best mode: fetching and writing overlap, and the rate limiter sets the pace.

Each missing range starts as one request. When its first page shows there is more (a
``next_url``), the rest is cut into pieces of one request each (``planner.split_range``,
from the calendar) that are fetched at the same time instead of one ``next_url`` after
another. Asking first costs nothing (the first page is needed anyway) and keeps a range whose
data starts late (a backfill start before the listing) at one request instead of many. A
range is cut into at most ``max_in_flight`` pieces, each a whole number of requests, so an
estimate that overshoots (data ending early) wastes at most that many requests.

A fixed number of fetchers (``max_in_flight``) keeps the rate limiter busy: when one
request ends another starts, with no barrier waiting for the slowest of a group. There are
as many as the limiter lets into one window, so each window's requests go out together:
a window that starts spread out stays spread out, since the sliding window repeats its
pattern. What they may hold at once is bounded by ``max_bars_in_flight`` (each request
weighed by the bars the calendar says its page holds), so a backfill of 1-minute pages of
50,000 bars keeps a few in flight where one of 5-minute pages for a month keeps dozens. Pages
go onto bounded queues drained by two writers (each piece always to the same one, so its
pages commit in order), so database time hides under API time, two transactions commit
at once, and memory is bounded by the pages in flight plus the queues, however long the
backfill.

Tickers still enter in groups of ``group_size`` (logged as ``Processing symbol group``),
but a group starts as soon as the fetchers reach it, not after the previous one finished.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import structlog

from polygon_backfill.clients import Page
from polygon_backfill.errors import AuthenticationError
from polygon_backfill.models import Timeframe, TimeRange
from polygon_backfill.planner import (
    SymbolWork,
    estimated_page_bars,
    estimated_requests,
    split_range,
)
from polygon_backfill.sessions import may_hold_bars
from polygon_backfill.summary import (
    PairOutcome,
    PassHooks,
    PreparePage,
    TickerResult,
)

if TYPE_CHECKING:
    from polygon_backfill.storage import ReadyPage

log = structlog.get_logger(__name__)

FetchPages = Callable[[str, Timeframe, datetime, datetime], AsyncIterator[Page]]


@dataclass(frozen=True, slots=True)
class _Piece:
    ticker: str
    timeframe: Timeframe
    span: TimeRange
    group: int
    first: bool = True  # a whole range, not yet split after its first page


@dataclass(slots=True)
class _PairState:
    outcome: PairOutcome
    pieces_left: int
    error: Exception | None = None  # the first cause, reported once the pair is done

    def fail(self, error: Exception) -> None:
        """Keep the first cause, for its type and message, without its tracebacks: their
        frames hold the page being written or the body being read, which would otherwise
        stay alive until the pass ends, one per failing pair."""
        if self.error is not None:
            return
        seen: set[int] = set()
        links: list[BaseException | None] = [error]
        while links:
            link = links.pop()
            if link is not None and id(link) not in seen:
                seen.add(id(link))
                link.__traceback__ = None
                links += [link.__cause__, link.__context__]
        self.error = error


@dataclass(frozen=True, slots=True)
class _PieceDone:
    """Sent after a piece's last page: the writer counts pieces to know a pair is done."""

    key: tuple[str, str]
    error: Exception | None


_END = object()
WRITERS = 2
"""Pages written at once, each on its own connection: two transactions commit together
(one writer waits on every commit), and a 2-core database gains nothing from more."""


class BarBudget:
    """At most ``capacity`` bars held by requests at once, each request weighed by its
    estimate, granted first come, first served (a big page is not overtaken forever by
    small ones). One weighing more than the whole budget waits until it is empty and goes
    alone. Released synchronously, so a cancellation cannot leak a share."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, bars: int) -> AsyncIterator[None]:
        bars = min(bars, self._capacity)
        if self._waiting or self._held + bars > self._capacity:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (bars, turn)
            self._waiting.append(entry)
            try:
                await turn
            except asyncio.CancelledError:
                if not turn.cancelled():  # granted, then cancelled
                    self._release(bars)
                elif entry in self._waiting:
                    self._waiting.remove(entry)
                    self._grant()  # it may have been what held the others back
                raise
        else:
            self._held += bars
        try:
            yield
        finally:
            self._release(bars)

    def _release(self, bars: int) -> None:
        self._held -= bars
        self._grant()

    def _grant(self) -> None:
        """Let waiters in, in order, while the first one fits."""
        while self._waiting and self._held + self._waiting[0][0] <= self._capacity:
            bars, turn = self._waiting.popleft()
            if turn.cancelled():  # its task is leaving; it takes nothing
                continue
            self._held += bars
            turn.set_result(None)


class PipelinedBackfill:
    """One pass in the best mode; ``run`` returns per-ticker results like the other modes."""

    def __init__(self, *, fetch: FetchPages, prepare: PreparePage, hooks: PassHooks,
                 max_in_flight: int, max_bars_in_flight: int, queued_pages: int,
                 group_size: int, page_limit: int, writers: int = WRITERS) -> None:
        self._fetch = fetch
        self._prepare = prepare
        self._write = hooks.write
        self._note_failure = hooks.note_failure
        self._finish_pair = hooks.finish_pair
        self._stop = hooks.stop
        self._clock = hooks.clock
        self._max_in_flight = max_in_flight
        self._budget = BarBudget(max_bars_in_flight)
        # One queue per writer; a piece always goes to the same one, so its pages commit in
        # order and its end marker comes after them.
        self._queues: list[asyncio.Queue[object]] = [
            asyncio.Queue(maxsize=queued_pages) for _ in range(writers)]
        self._group_size = group_size
        self._page_limit = page_limit
        self._pairs: dict[tuple[str, str], _PairState] = {}
        self._results: dict[str, TickerResult] = {}
        self._groups: list[list[str]] = []
        self._groups_started: set[int] = set()
        self._fatal: AuthenticationError | None = None
        self._todo: asyncio.Queue[_Piece] = asyncio.Queue()
        self._next_queue = 0

    async def run(self, plan: Sequence[SymbolWork]) -> dict[str, TickerResult]:
        pieces = self._pieces(plan)
        for piece in pieces:
            self._todo.put_nowait(piece)
        writers = [asyncio.ensure_future(self._drain(queue)) for queue in self._queues]
        fetchers = [asyncio.ensure_future(self._fetcher())
                    for _ in range(min(self._max_in_flight, max(1, len(pieces))))]
        try:
            await asyncio.gather(*fetchers)  # a fetcher reports its errors; only cancels end it
            for queue in self._queues:
                await queue.put(_END)
            await asyncio.gather(*writers)
        except BaseException:
            # Cancelled (the daemon's shutdown timeout): a writer may be stuck on the
            # database, its queue full. Uncommitted pages are fetched again next pass.
            for task in (*fetchers, *writers):
                task.cancel()
            await asyncio.gather(*fetchers, *writers, return_exceptions=True)
            raise
        for key, state in self._pairs.items():  # pieces never started (a stop)
            if state.pieces_left:
                state.outcome.ok = False
                state.outcome.error = state.outcome.error or "stopped before completion"
                await self._finish_pair(key[0], Timeframe.parse(key[1]), state.outcome)
        if self._fatal is not None:
            raise self._fatal
        return self._results

    def _pieces(self, plan: Sequence[SymbolWork]) -> list[_Piece]:
        tickers = [work.ticker for work in plan]
        self._groups = [tickers[i:i + self._group_size]
                        for i in range(0, len(tickers), self._group_size)]
        pieces: list[_Piece] = []
        for index, work in enumerate(plan):
            result = self._results.setdefault(work.ticker, TickerResult(work.ticker))
            for timeframe in work.timeframes:
                outcome = PairOutcome(work.ticker, timeframe.name)
                result.pairs.append(outcome)
                spans = [span for tf, span in work.ranges if tf == timeframe]
                outcome.ranges = len(spans)
                self._pairs[(work.ticker, timeframe.name)] = _PairState(outcome, len(spans))
                pieces += [_Piece(work.ticker, timeframe, span, index // self._group_size)
                           for span in spans]
        return pieces

    async def _fetcher(self) -> None:
        while not self._stop.is_set():
            try:
                piece = self._todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            queue = self._queues[self._next_queue % len(self._queues)]
            self._next_queue += 1
            error: Exception | None = None
            try:
                self._announce(piece.group)
                weight = estimated_page_bars(piece.ticker, piece.timeframe, piece.span,
                                             self._page_limit)
                pages = self._fetch(piece.ticker, piece.timeframe, piece.span.start,
                                    piece.span.end)
                async with self._budget.hold(weight), aclosing(pages):
                    async for page in pages:
                        # Encoded now, and the bars let go: a page waiting for its writer
                        # holds bytes only, so memory stays flat however long the range.
                        ready = self._prepare(piece.ticker, piece.timeframe, page)
                        del page
                        covered_until = ready.covered.end
                        await queue.put((piece, ready))
                        # The queue holds it now: a reference kept here would outlive the
                        # budget's share, through the next request and the next piece.
                        del ready
                        if self._stop.is_set():
                            error = RuntimeError("stopped before completion")
                            break
                        if piece.first and covered_until < piece.span.end:
                            self._split_rest(piece, covered_until)
                            break
            except AuthenticationError as exc:
                self._fatal = exc
                self._stop.set()
                error = exc
            except Exception as exc:  # reported per pair by the writer
                error = exc
            await queue.put(_PieceDone((piece.ticker, piece.timeframe.name), error))

    def _split_rest(self, piece: _Piece, done_until: datetime) -> None:
        """Queue the rest of a range as pieces of one request each, fetched concurrently."""
        rest = TimeRange(done_until, piece.span.end)
        requests = estimated_requests(piece.ticker, piece.timeframe, rest, self._page_limit)
        per_piece = max(1, math.ceil(requests / self._max_in_flight))
        spans = [span for span in split_range(piece.ticker, piece.timeframe, rest,
                                              self._page_limit * per_piece)
                 if may_hold_bars(piece.ticker, piece.timeframe, span.start, span.end)]
        self._pairs[(piece.ticker, piece.timeframe.name)].pieces_left += len(spans)
        for span in spans:
            self._todo.put_nowait(_Piece(piece.ticker, piece.timeframe, span, piece.group,
                                         first=False))

    def _announce(self, group: int) -> None:
        if group in self._groups_started:
            return
        self._groups_started.add(group)
        tickers = self._groups[group]
        log.info("scheduler.group_started",
                 message=f"Processing symbol group {group + 1}/{len(self._groups)}: {tickers}",
                 group=group + 1, groups=len(self._groups), tickers=tickers)

    async def _drain(self, queue: asyncio.Queue[object]) -> None:
        """One writer: its pages in arrival order, then each pair's result once done."""
        while (item := await queue.get()) is not _END:
            try:
                if isinstance(item, _PieceDone):
                    await self._piece_done(item)
                else:
                    await self._write_page(*item)  # type: ignore[misc]
            except Exception as exc:  # a writer that died would leave its fetchers waiting
                log.error("pipeline.writer_error", message=f"Reporting a page or a pair "
                          f"failed: {type(exc).__name__}: {exc}", exc_info=exc)
            del item  # not kept while waiting for the next one

    async def _write_page(self, piece: _Piece, page: ReadyPage) -> None:
        state = self._pairs[(piece.ticker, piece.timeframe.name)]
        started = self._clock.monotonic()
        try:
            written = await self._write(piece.ticker, piece.timeframe, page)
        except Exception as exc:
            state.fail(exc)
            return
        finally:
            self._results[piece.ticker].db_seconds += self._clock.monotonic() - started
        state.outcome.pages += 1
        state.outcome.inserted += written.inserted
        state.outcome.updated += written.updated
        state.outcome.rejected += page.rejected

    async def _piece_done(self, done: _PieceDone) -> None:
        state = self._pairs[done.key]
        if done.error is not None:
            state.fail(done.error)
        state.pieces_left -= 1
        if state.pieces_left:
            return
        ticker, timeframe = done.key[0], Timeframe.parse(done.key[1])
        if isinstance(state.error, AuthenticationError):
            state.outcome.ok, state.outcome.error = False, str(state.error)
        elif state.error is not None:  # one line per pair, the first cause
            self._note_failure(ticker, timeframe, state.outcome, state.error)
        await self._finish_pair(ticker, timeframe, state.outcome)
