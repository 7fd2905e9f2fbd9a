"""AutoBackfillScheduler: plan -> fetch -> validate -> write -> record, on a cron schedule.

An APScheduler cron job calls ``_backfill_job``; it plans what is missing per (ticker,
timeframe), then works through tickers in staggered groups (``parallel_backfill``) or one
by one. Each page is written, with its coverage, in one transaction as soon as it arrives,
so an interrupted run resumes where it stopped. One ticker's failure never stops the others;
a rejected API key (401) stops the run, since every other request would fail the same way.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack, aclosing
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from polygon_backfill.clients import Page, PolygonClient
from polygon_backfill.clients.circuit_breaker import CircuitBreaker
from polygon_backfill.clients.rate_limiter import AdaptiveRateLimiter, RateLimit
from polygon_backfill.clock import Clock, SystemClock
from polygon_backfill.config import Settings, load_settings
from polygon_backfill.coverage import expected_periods, is_covered, vouched_sessions
from polygon_backfill.errors import (
    AuthenticationError,
    PolygonClientError,
    StorageUnavailableError,
)
from polygon_backfill.grouped import GroupedDailyBackfill, merge_results, plan_grouped_daily
from polygon_backfill.models import Timeframe, TimeRange
from polygon_backfill.pipeline import PipelinedBackfill
from polygon_backfill.planner import SymbolWork, missing_ranges
from polygon_backfill.sessions import load_calendar
from polygon_backfill.splits import refresh_splits
from polygon_backfill.storage import (
    BarStore,
    ReadyPage,
    StoredPair,
    WriteResult,
    encode_page,
    open_database,
)
from polygon_backfill.summary import BackfillSummary, PairOutcome, PassHooks, TickerResult

log = structlog.get_logger(__name__)


class BackfillProgress(Protocol):
    """Receives progress of a run (the CLI draws a progress bar from it)."""

    def planned(self, pairs: int) -> None: ...

    def pair_done(self, outcome: PairOutcome) -> None: ...


class AutoBackfillScheduler:
    """Keeps bars for the configured tickers and timeframes complete in PostgreSQL.

    Settings come from the environment / ``.env``; keyword arguments override them. The
    client, the store and the clock can be injected (tests hand in a fake clock).
    """

    def __init__(
        self,
        polygon_api_key: str | None = None,
        database_url: str | None = None,
        parallel_backfill: bool | None = None,
        max_concurrent_symbols: int | None = None,
        *,
        settings: Settings | None = None,
        polygon_client: PolygonClient | None = None,
        store: BarStore | None = None,
        clock: Clock | None = None,
        progress: BackfillProgress | None = None,
        **overrides: Any,
    ) -> None:
        named = {"polygon_api_key": polygon_api_key, "database_url": database_url,
                 "parallel_backfill": parallel_backfill,
                 "max_concurrent_symbols": max_concurrent_symbols}
        given = {key: value for key, value in named.items() if value is not None} | overrides
        if settings is None:
            settings = load_settings(**given)
        elif given:
            settings = settings.with_overrides(**given)
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.progress = progress
        self.polygon_client = polygon_client or client_for(
            settings, self.clock, on_circuit_change=self._circuit_changed)
        self._store = store
        self._exit_stack = AsyncExitStack()
        self._job_lock = asyncio.Lock()
        self._stop_requested = asyncio.Event()
        self._pending_writes: set[asyncio.Task[Any]] = set()
        self._current_job: asyncio.Task[Any] | None = None
        self.fatal_error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def parallel_backfill(self) -> bool:
        return self.settings.parallel_backfill

    @property
    def mode(self) -> str:
        """``sequential`` (the seed's Phase 2), ``groups`` (Phase 3) or ``pipeline``."""
        return self.settings.backfill_mode if self.parallel_backfill else "sequential"

    @property
    def max_concurrent_symbols(self) -> int:
        return self.settings.max_concurrent_symbols

    @property
    def store(self) -> BarStore:
        if self._store is None:
            raise RuntimeError("AutoBackfillScheduler.start() has not been awaited")
        return self._store

    async def start(self) -> None:
        """Connect to PostgreSQL (starting the embedded one when no URL is set) and migrate;
        read the exchange calendar meanwhile, off the event loop (about a second, once)."""
        calendar = asyncio.ensure_future(asyncio.to_thread(load_calendar))
        try:
            await self._connect()
        finally:
            await calendar

    async def _connect(self) -> None:
        if self._store is None:
            self._store = await self._exit_stack.enter_async_context(open_database(
                self.settings.database_dsn(), self.settings.embedded_pg_dir))

    async def close(self) -> None:
        """Let in-flight writes commit, then close the client and the database."""
        if self._pending_writes:
            _, late = await asyncio.wait(self._pending_writes,
                                         timeout=self.settings.shutdown_timeout_seconds)
            for task in late:  # a write hung past the timeout: its transaction rolls back
                task.cancel()
        await self.polygon_client.aclose()
        await self._exit_stack.aclose()

    async def __aenter__(self) -> AutoBackfillScheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def request_stop(self) -> None:
        """Stop after the pages being written now; nothing is left half-written."""
        if not self._stop_requested.is_set():
            log.info("scheduler.stopping", message="Stop requested: finishing in-flight writes")
        self._stop_requested.set()

    async def run_once(self) -> dict[str, Any]:
        """One pass now; what ``polygon-backfill once`` and tests await."""
        await self.start()
        return await self._backfill_job()

    async def run_forever(self) -> None:
        """The daemon: cron-scheduled passes until SIGTERM/SIGINT, then a graceful drain."""
        await self.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        zone = ZoneInfo(self.settings.schedule_timezone)
        scheduler = AsyncIOScheduler(timezone=zone)
        job_options: dict[str, Any] = {"id": "backfill", "max_instances": 1, "coalesce": True,
                                       "misfire_grace_time": 3600}
        if self.settings.run_on_start:
            job_options["next_run_time"] = self.clock.now()
        scheduler.add_job(self._scheduled_job,
                          CronTrigger.from_crontab(self.settings.schedule_cron, timezone=zone),
                          **job_options)
        scheduler.start()
        log.info("scheduler.started", message="Backfill daemon started",
                 cron=self.settings.schedule_cron, timezone=self.settings.schedule_timezone,
                 tickers=self.settings.tickers,
                 timeframes=[tf.name for tf in self.settings.timeframes])
        try:
            await self._stop_requested.wait()
        finally:
            # Pause first, drain, then shut down: APScheduler's shutdown cancels a running
            # job, which would throw away the page being fetched.
            scheduler.pause()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self._drain()
            scheduler.shutdown(wait=False)
            await self.close()
        if self.fatal_error is not None:
            raise self.fatal_error

    async def _drain(self) -> None:
        job = self._current_job
        if job is None or job.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(job), self.settings.shutdown_timeout_seconds)
        except TimeoutError:
            log.warning("scheduler.drain_timeout", message="Backfill still running at shutdown "
                        "timeout; cancelling it (committed pages are kept)")
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
        except Exception:  # the job logged its own failure
            pass

    async def _scheduled_job(self) -> None:
        self._current_job = asyncio.current_task()
        try:
            await self._backfill_job()
        except AuthenticationError as exc:
            self.fatal_error = exc
            self.request_stop()
        except Exception:
            log.exception("backfill.job_crashed", message="Backfill job failed unexpectedly")

    def _circuit_changed(self, state: str, last_error: str | None) -> None:
        """Persist the breaker's state for ``status``; the callback is sync, the write not."""
        if self._store is None:
            return
        task = asyncio.ensure_future(self._store.record_service_state(
            "circuit", state, last_error, self.clock.now()))
        self._pending_writes.add(task)
        task.add_done_callback(self._pending_writes.discard)
        task.add_done_callback(_log_failed_state_write)

    # -- the job -------------------------------------------------------------------------

    async def _backfill_job(self) -> dict[str, Any]:
        """Plan, backfill every ticker, log and return the run's summary."""
        async with self._job_lock, self.store.backfill_lock(on_wait=_log_lock_wait):
            started = self.clock.monotonic()
            requests_before = self.polygon_client.total_requests
            limited_before = self.polygon_client.rate_limited_count
            api_before = self.polygon_client.api_seconds
            if self.settings.adjusted and self.settings.check_splits:
                await self._check_splits()
            plan = await self._plan()
            if self.progress is not None:
                self.progress.planned(sum(len(work.timeframes) for work in plan))
            log.info("backfill.started", message=f"Backfill started: {len(plan)} tickers, "
                     f"{sum(len(work.ranges) for work in plan)} ranges, mode {self.mode}",
                     mode=self.mode)
            plan, grouped = await self._backfill_grouped_daily(plan)
            if not self.parallel_backfill:
                results = await self._backfill_symbols_sequential(plan)
            elif self.settings.backfill_mode == "groups":
                results = await self._backfill_symbols_parallel(
                    plan, max_concurrent=self.max_concurrent_symbols)
            else:
                results = await self._backfill_symbols_pipelined(plan)
            results = merge_results(grouped, results)
            if self._pending_writes:  # circuit-state records started during the pass
                await asyncio.gather(*self._pending_writes, return_exceptions=True)
            summary = BackfillSummary.from_results(
                results,
                requests=self.polygon_client.total_requests - requests_before,
                rate_limited=self.polygon_client.rate_limited_count - limited_before,
                api_seconds=round(self.polygon_client.api_seconds - api_before, 3),
                total_seconds=round(self.clock.monotonic() - started, 3),
                stopped_early=self._stop_requested.is_set(),
            )
            log.info("backfill.finished",
                     message=f"Backfill finished: {len(summary.tickers_ok)} tickers ok, "
                     f"{len(summary.tickers_failed)} failed, {summary.bars_written} bars written",
                     **summary.as_dict())
            return summary.as_dict()

    async def _check_splits(self) -> None:
        """Forget the coverage of stock tickers whose split list changed (``splits.py``)."""
        try:
            await refresh_splits(self.polygon_client.fetch_splits, self.store,
                                 self.settings.tickers, self.clock.now(),
                                 self._stop_requested.is_set)
        except AuthenticationError as exc:  # every other request would be refused too
            self.fatal_error = exc
            self.request_stop()
            raise

    async def _plan(self) -> list[SymbolWork]:
        """What each pair misses: uncovered time, holes in covered time, trailing window.

        The window reaches back to the earliest stored bar when that is older than the
        backfill start (a rolling ``BACKFILL_DAYS``, a start moved later): bars kept must
        stay complete and current too, and after a split every one of them is fetched
        again, so no stored adjusted price is left on the other side of it.
        """
        now = self.clock.now()
        pairs = [(ticker, timeframe) for ticker in self.settings.tickers
                 for timeframe in self.settings.timeframes]
        stored = await self.store.stored_pairs(pairs)
        # Pairs with fetched ranges are probed for lost sessions; those probes overlap.
        probes = [asyncio.ensure_future(
            self._missing(ticker, timeframe, stored[(ticker, timeframe.name)], now))
            for ticker, timeframe in pairs]
        try:
            missing = await asyncio.gather(*probes)
        except BaseException:  # one failed (the database is gone): stop the others too
            for probe in probes:
                probe.cancel()
            await asyncio.gather(*probes, return_exceptions=True)
            raise
        ranges: dict[str, list[tuple[Timeframe, TimeRange]]] = {
            ticker: [] for ticker in self.settings.tickers}
        for (ticker, timeframe), gaps in zip(pairs, missing, strict=True):
            ranges[ticker] += [(timeframe, gap) for gap in gaps]
        return [SymbolWork(ticker, tuple(found)) for ticker, found in ranges.items()]

    async def _missing(self, ticker: str, timeframe: Timeframe, stored: StoredPair,
                       now: datetime) -> list[TimeRange]:
        """One pair's part of the plan (see :meth:`_plan`)."""
        configured = self.settings.backfill_start_for(ticker, now)
        start = min(configured, stored.first_bar) if stored.first_bar else configured
        holes = await self._holes(ticker, timeframe, stored.coverage, start, now)
        return missing_ranges(
            ticker, timeframe, stored.coverage, start=start, now=now, holes=holes,
            trailing_window=self.settings.trailing_window_for(timeframe),
            page_limit=self.settings.page_limit)

    async def _holes(self, ticker: str, timeframe: Timeframe, coverage: list[TimeRange],
                     start: datetime, now: datetime) -> list[TimeRange]:
        """Sessions inside fetched ranges that hold no bar yet were not verified empty (bars
        deleted or lost after the fetch): their days are fetched again."""
        if not coverage:
            return []
        periods = [period for period in expected_periods(ticker, timeframe, start, now)
                   if is_covered(period.needs, coverage)]
        with_bars, verified_empty = await self.store.session_marks(ticker, timeframe, periods)
        return [period.keys for period in periods
                if period.day not in with_bars and period.day not in verified_empty]

    async def _backfill_grouped_daily(
        self, plan: list[SymbolWork]
    ) -> tuple[list[SymbolWork], dict[str, TickerResult]]:
        """Serve short missing 1d stock ranges by date from the grouped-daily endpoint when
        that takes fewer requests (``grouped.py``); returns the per-ticker plan left (with
        whatever the grouped answers could not vouch for) and the results written."""
        grouped, left = plan_grouped_daily(
            plan, now=self.clock.now(), max_sessions=self.settings.grouped_daily_max_sessions,
            page_limit=self.settings.page_limit)
        if grouped is None:
            return plan, {}
        runner = GroupedDailyBackfill(
            fetch=self.polygon_client.fetch_grouped_daily, hooks=self._hooks(),
            max_in_flight=self.settings.max_in_flight_requests)
        try:
            return await runner.run(grouped, left)
        except AuthenticationError as exc:  # every other request would be refused too
            self.fatal_error = exc
            self.request_stop()
            raise

    def _hooks(self) -> PassHooks:
        return PassHooks(write=self._write, note_failure=self._note_failure,
                         finish_pair=self._finish_pair, stop=self._stop_requested,
                         clock=self.clock)

    async def _backfill_symbols_parallel(
        self, symbols_data: Sequence[SymbolWork], max_concurrent: int = 3
    ) -> dict[str, TickerResult]:
        """Groups of ``max_concurrent`` tickers; starts staggered inside a group, a pause
        between groups (the seed's Phase 3 mode)."""
        groups = [symbols_data[i:i + max_concurrent]
                  for i in range(0, len(symbols_data), max_concurrent)]
        results: dict[str, TickerResult] = {}
        for number, group in enumerate(groups, start=1):
            if self._stop_requested.is_set():
                break
            tickers = [work.ticker for work in group]
            log.info("scheduler.group_started",
                     message=f"Processing symbol group {number}/{len(groups)}: {tickers}",
                     group=number, groups=len(groups), tickers=tickers)
            outcomes = await asyncio.gather(
                *(self._staggered(index * self.settings.stagger_seconds, work)
                  for index, work in enumerate(group)),
                return_exceptions=True)
            for work, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    raise outcome
                results[work.ticker] = outcome
            if number < len(groups) and not self._stop_requested.is_set():
                await self.clock.sleep(self.settings.group_pause_seconds)
        return results

    async def _backfill_symbols_pipelined(
        self, symbols_data: Sequence[SymbolWork]
    ) -> dict[str, TickerResult]:
        """The best mode (``pipeline.py``): fetchers paced by the rate limiter, one writer."""
        pipeline = PipelinedBackfill(
            fetch=self.polygon_client.iter_pages, prepare=self._prepare, hooks=self._hooks(),
            max_in_flight=self.settings.max_in_flight_requests,
            max_bars_in_flight=self.settings.max_bars_in_flight,
            queued_pages=self.settings.queued_pages,
            group_size=self.max_concurrent_symbols, page_limit=self.settings.page_limit)
        return await pipeline.run(symbols_data)

    async def _backfill_symbols_sequential(
        self, symbols_data: Sequence[SymbolWork]
    ) -> dict[str, TickerResult]:
        """One ticker after another (``parallel_backfill=False``, the seed's Phase 2 mode)."""
        results: dict[str, TickerResult] = {}
        for work in symbols_data:
            if self._stop_requested.is_set():
                break
            results[work.ticker] = await self._backfill_symbol(work)
        return results

    async def _staggered(self, delay_s: float, work: SymbolWork) -> TickerResult:
        if delay_s:
            await self.clock.sleep(delay_s)
        return await self._backfill_symbol(work)

    async def _backfill_symbol(self, work: SymbolWork) -> TickerResult:
        """All of one ticker's ranges; each timeframe's failure is caught and reported."""
        result = TickerResult(work.ticker)
        log.info("backfill.symbol_started", message=f"Backfilling {work.ticker}",
                 ticker=work.ticker, ranges=len(work.ranges))
        for timeframe in work.timeframes:
            ranges = [time_range for tf, time_range in work.ranges if tf == timeframe]
            outcome = PairOutcome(work.ticker, timeframe.name)
            result.pairs.append(outcome)
            await self._backfill_pair(work.ticker, timeframe, ranges, outcome, result)
        return result

    async def _backfill_pair(self, ticker: str, timeframe: Timeframe, ranges: list[TimeRange],
                             outcome: PairOutcome, result: TickerResult) -> None:
        try:
            for time_range in ranges:
                if self._stop_requested.is_set():
                    outcome.ok, outcome.error = False, "stopped before completion"
                    break
                outcome.ranges += 1
                pages = self.polygon_client.iter_pages(
                    ticker, timeframe, time_range.start, time_range.end)
                async with aclosing(pages):
                    async for page in pages:
                        written_at = self.clock.monotonic()
                        written = await self._write(ticker, timeframe, page)
                        result.db_seconds += self.clock.monotonic() - written_at
                        outcome.pages += 1
                        outcome.inserted += written.inserted
                        outcome.updated += written.updated
                        outcome.rejected += page.rejected
                        if self._stop_requested.is_set():
                            break
        except Exception as exc:
            self._note_failure(ticker, timeframe, outcome, exc)
        await self._finish_pair(ticker, timeframe, outcome)

    def _note_failure(self, ticker: str, timeframe: Timeframe, outcome: PairOutcome,
                      exc: Exception) -> None:
        """Classify a pair's failure: a rejected key stops the run (re-raised), a 4xx skips
        the pair, anything else fails it; none of them stops the other pairs."""
        if isinstance(exc, AuthenticationError):
            # Every other request would be refused the same way: stop the whole run now.
            outcome.ok, outcome.error = False, str(exc)
            self.fatal_error = exc
            self.request_stop()
            raise exc
        if isinstance(exc, PolygonClientError):  # 403 outside the plan, 404 unknown ticker
            outcome.ok, outcome.skipped, outcome.error = False, True, str(exc)
            log.warning("backfill.pair_skipped", message=f"Skipping {ticker} {timeframe} for "
                        f"this run: {exc}", ticker=ticker, timeframe=timeframe.name,
                        status_code=exc.status_code)
            return
        outcome.ok, outcome.error = False, str(exc)
        log.error("backfill.pair_failed", message=f"Backfill of {ticker} {timeframe} failed: "
                  f"{exc}", ticker=ticker, timeframe=timeframe.name,
                  error_type=type(exc).__name__)

    async def _finish_pair(self, ticker: str, timeframe: Timeframe,
                           outcome: PairOutcome) -> None:
        """Record the pair's result for ``status`` and report progress."""
        message = (f"ok: {outcome.inserted} new, {outcome.updated} changed" if outcome.ok
                   else f"failed: {outcome.error}")
        try:
            await self.store.record_result(ticker, timeframe, ok=outcome.ok, message=message,
                                           at=self.clock.now())
        except Exception as exc:
            log.error("backfill.record_failed", message=f"Could not record the result of "
                      f"{ticker} {timeframe}: {exc}", ticker=ticker, timeframe=timeframe.name)
        if self.progress is not None:
            self.progress.pair_done(outcome)

    @staticmethod
    def _prepare(ticker: str, timeframe: Timeframe, page: Page) -> ReadyPage:
        """Encode a fetched page and mark the sessions it vouches for; its bar objects
        can go (the pipeline does this as pages arrive, before they queue for a writer)."""
        filled, empty = vouched_sessions(ticker, timeframe, page.bars, page.covered)
        return ReadyPage(encode_page(ticker, timeframe, page.bars), page.covered, filled,
                         empty, page.rejected)

    async def _write(self, ticker: str, timeframe: Timeframe,
                     page: Page | ReadyPage) -> WriteResult:
        """Write one page and its coverage, retrying while PostgreSQL is unreachable or
        restarting (the page is kept in memory meanwhile). Shielded, so a shutdown never
        cuts a write in half; coverage is only recorded with the committed bars."""
        ready = page if isinstance(page, ReadyPage) else self._prepare(ticker, timeframe, page)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StorageUnavailableError),
            stop=stop_after_attempt(self.settings.db_retry_attempts),
            wait=wait_exponential(multiplier=1, min=1, max=30),
            sleep=self.clock.sleep, before_sleep=_log_db_retry, reraise=True)
        async for attempt in retrying:
            with attempt:
                task = asyncio.ensure_future(self.store.write_ready(ticker, timeframe, ready))
                self._pending_writes.add(task)
                task.add_done_callback(self._pending_writes.discard)
                result: WriteResult = await asyncio.shield(task)
        log.debug("backfill.page_written", ticker=ticker, timeframe=timeframe.name,
                  bars=ready.encoded.count, inserted=result.inserted, updated=result.updated)
        return result


def client_for(settings: Settings, clock: Clock,
               on_circuit_change: Callable[[str, str | None], None] | None = None
               ) -> PolygonClient:
    """The client ``settings`` describe, with its rate limiter and circuit breaker."""
    return PolygonClient(
        settings.polygon_api_key.get_secret_value(),
        settings.polygon_base_url,
        timeout_s=settings.http_timeout_seconds,
        max_attempts=settings.retry_attempts,
        max_wait_s=settings.retry_max_wait_seconds,
        page_limit=settings.page_limit,
        max_pages=settings.max_pages,
        adjusted=settings.adjusted,
        max_connections=settings.max_in_flight_requests,
        sleep=clock.sleep,
        rate_limiter=AdaptiveRateLimiter(RateLimit.parse(settings.rate_limit), clock=clock),
        circuit_breaker=CircuitBreaker(
            failure_threshold=settings.circuit_failure_threshold,
            cooldown_s=settings.circuit_cooldown_seconds, clock=clock,
            on_change=on_circuit_change),
    )


def _log_lock_wait() -> None:
    log.warning("backfill.lock_wait", message="Another polygon-backfill is running a backfill "
                "on this database; waiting for it to finish")


def _log_db_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    log.warning("storage.retrying", message=f"Database unavailable, retrying the write in "
                f"{wait:.0f} s (attempt {state.attempt_number}): {error}",
                attempt=state.attempt_number, wait_s=wait)


def _log_failed_state_write(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("storage.state_not_saved",
                    message=f"Could not save the circuit state: {task.exception()}")
