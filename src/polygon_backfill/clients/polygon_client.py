"""PolygonClient: one keep-alive httpx client, header auth, per-page retries, safe pagination.

A range is fetched as a chain of pages. Each page is retried on its own (tenacity, 5
attempts, waits 1, 2, 4, 8 s or the server's ``Retry-After``), so a 429 storm mid-range
resumes from the page that failed (pitfall 2). ``next_url`` is followed on our own base URL
only; a full page without ``next_url`` is continued by hand (pitfall 1); a ``next_url`` that
does not start after the page it follows (a loop: Polygon's cursor itself repeats on every
page, only the ``from`` segment moves) or too many pages is a :class:`PaginationError`
(pitfall 14).

Optional guards, shared by every task of the process: an :class:`AdaptiveRateLimiter` paces
request starts under the plan's limit and adapts to 429s; a :class:`CircuitBreaker` stops
calling an API that keeps failing. Without them the client calls as fast as it is asked.

``fetch_splits`` reads the splits reference through the same machinery, page by page.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import structlog
from pydantic_core import from_json
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from polygon_backfill.clients import _urls
from polygon_backfill.clients.circuit_breaker import CircuitBreaker
from polygon_backfill.clients.rate_limiter import AdaptiveRateLimiter
from polygon_backfill.clients.responses import (
    NOT_AUTHORIZED,
    SUCCESS_STATUSES,
    AggregatesResponse,
    PayloadError,
    ReadBars,
    SplitsPage,
    parse_aggregates,
    parse_aggregates_fast,
    parse_grouped_daily,
    parse_splits,
    read_status,
    select_bars,
    server_text,
)
from polygon_backfill.errors import (
    AuthenticationError,
    CircuitOpenError,
    MalformedResponseError,
    NotAuthorizedError,
    PaginationError,
    PolygonClientError,
    PolygonError,
    RateLimitedError,
    SuspectEmptyError,
    TransientPolygonError,
)
from polygon_backfill.models import (
    Bar,
    Split,
    Timeframe,
    TimeRange,
    Timespan,
    datetime_to_ms,
    ms_to_datetime,
    session_start,
    validate_ticker,
)
from polygon_backfill.sessions import holds_full_session, may_hold_bars

log = structlog.get_logger(__name__)

# A decoded answer: its top level, and its bars read and checked.
_Answer = tuple[AggregatesResponse, ReadBars]
# A decoded grouped-daily answer: bars by ticker, and whether ``results`` was null.
_Grouped = tuple[dict[str, Bar], bool]
_T = TypeVar("_T")

_GROUPED_PATH = "/v2/aggs/grouped/locale/us/market/stocks/"
_SPLITS_PATH = "/v3/reference/splits"
_SPLITS_MAX_LIMIT = 1000  # Polygon's maximum for reference lists
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_SPAN = TimeRange(_EPOCH, _EPOCH)  # a request that is not about a span of bars
_DAILY = Timeframe(1, Timespan.DAY)
# The grouped endpoint answers for US stocks: any plain stock ticker names their calendar.
_STOCK_CALENDAR = "SPY"

Sleep = Callable[[float], Awaitable[None]]


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verified TLS context for every client: building it loads the CA bundle (~20 ms)."""
    return httpx.create_ssl_context()


class ServerError(TransientPolygonError):
    """HTTP 5xx; ``retry_after_s`` is the server's Retry-After when it sent one (503)."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **context: Any):
        self.retry_after_s = retry_after_s
        super().__init__(message, **context)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a range: its sound bars and the span of time it answers for.

    ``covered`` runs from this page's ``from`` to the next page's ``from`` (or the range
    end for the last page), so the caller can record coverage page by page.
    """

    bars: Sequence[Bar]
    covered: TimeRange
    rejected: int


@dataclass(frozen=True, slots=True)
class _Request:
    """One page to ask for: a path relative to the base URL and the moment it starts at."""

    url: str
    params: dict[str, str] | None
    covers_from: datetime


@dataclass(frozen=True, slots=True)
class _Job:
    """What one ``iter_pages`` call is about; its fields go into every error and log line.

    ``label`` names a request that is not one ticker's series (grouped daily, splits);
    ``what`` names its kind of answer in a malformed-body error."""

    ticker: str
    timeframe: Timeframe
    span: TimeRange
    label: str | None = None
    what: str = "aggregates"

    @property
    def name(self) -> str:
        return self.label or f"{self.ticker} {self.timeframe}"

    @property
    def context(self) -> dict[str, Any]:
        if self.label is not None:
            return {"ticker": self.label}
        return {"ticker": self.ticker, "timeframe": self.timeframe.name}


class PolygonClient:
    """Fetches aggregates for one API key. Share one instance; it is safe across tasks."""

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://api.polygon.io",
        *,
        timeout_s: float = 30.0,
        max_attempts: int = 5,
        max_wait_s: float = 300.0,
        page_limit: int = 50_000,
        max_pages: int = 10_000,
        adjusted: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        rate_limiter: AdaptiveRateLimiter | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        max_connections: int = 32,
    ) -> None:
        if max_attempts < 1 or max_pages < 1 or not 1 <= page_limit <= 50_000:
            raise ValueError("max_attempts and max_pages must be >= 1, page_limit 1..50000")
        self._api_key = api_key
        self._max_attempts = max_attempts
        self._max_wait_s = max_wait_s
        self._page_limit = page_limit
        self._max_pages = max_pages
        self._adjusted = adjusted
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._limiter = rate_limiter
        self._breaker = circuit_breaker
        self._backoff = wait_exponential(multiplier=1, min=1, max=max_wait_s)
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                     "User-Agent": "polygon-backfill"},
            timeout=httpx.Timeout(timeout_s),
            # A connection per request in flight, or granted requests would queue in
            # httpx's pool holding their place in the limiter's window.
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections,
                                keepalive_expiry=30.0),
            transport=transport,
            verify=_ssl_context(),
            follow_redirects=False,
        )
        self.total_requests = 0
        self.rate_limited_count = 0
        self.api_seconds = 0.0

    @property
    def rate_limiter(self) -> AdaptiveRateLimiter | None:
        """The shared limiter every attempt waits on, or None for no client-side limit."""
        return self._limiter

    @property
    def circuit_breaker(self) -> CircuitBreaker | None:
        """The breaker every attempt asks first, or None."""
        return self._breaker

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def fetch_range(self, ticker: str, timeframe: Timeframe, start: datetime,
                          end: datetime) -> list[Bar]:
        """Every sound bar in ``[start, end)``, one per ``t``, sorted."""
        bars: dict[int, Bar] = {}
        async for page in self.iter_pages(ticker, timeframe, start, end):
            bars.update((bar.t, bar) for bar in page.bars)
        return [bars[t] for t in sorted(bars)]

    async def iter_pages(self, ticker: str, timeframe: Timeframe, start: datetime,
                         end: datetime) -> AsyncIterator[Page]:
        """Yield the pages of ``[start, end)`` in time order; each one is retried alone."""
        validate_ticker(ticker)
        job = _Job(ticker, timeframe, TimeRange(start, end))
        if job.span.empty:
            return
        from_, to = _urls.range_bounds(ticker, timeframe, start, end)
        in_range = _urls.range_filter(ticker, timeframe, start, end)
        request: _Request | None = _Request(
            _urls.aggs_path(ticker, timeframe, from_, to), self._params(), start)
        pages = 0
        while request is not None:
            if pages >= self._max_pages:
                raise PaginationError(f"page cap of {self._max_pages} reached", **job.context)
            pages += 1
            answer, read = await self._fetch_page(request, job)
            selection = select_bars(read, in_range)
            if selection.rejected:
                log.warning(
                    "polygon.bars_rejected",
                    message=f"Dropped {selection.rejected} bar(s) from {ticker} {timeframe} "
                            f"page {pages}: {selection.first_reason}",
                    **job.context, page=pages, rejected=selection.rejected,
                    reason=selection.first_reason)
            last_t = selection.bars[-1].t if selection.bars else None
            following = self._next_request(answer, last_t, request, to, job)
            if following is not None and following.covers_from >= end:
                following = None
            covered_end = end if following is None else following.covers_from
            if selection.first_unsound_t is not None:
                # An invalid bar inside the range is not "covered": the next run asks again.
                covered_end = max(request.covers_from, min(
                    covered_end, _urls.exact_datetime(selection.first_unsound_t)))
            log.debug("polygon.page_fetched",
                      message=f"Fetched page {pages} of {ticker} {timeframe}: "
                              f"{len(selection.bars)} bar(s)",
                      **job.context, page=pages, bars=len(selection.bars),
                      rejected=selection.rejected, more=following is not None)
            # Hand the page over without keeping a reference: a generator paused at its
            # yield keeps its locals alive, and a caller that has encoded the bars and waits
            # (on a full queue) must not hold them through us. Same for the decoded body.
            box = [Page(selection.bars, TimeRange(request.covers_from, covered_end),
                        selection.rejected)]
            del answer, read, selection
            yield box.pop()
            request = following

    def _params(self) -> dict[str, str]:
        return {"adjusted": "true" if self._adjusted else "false", "sort": "asc",
                "limit": str(self._page_limit)}

    def _next_request(self, answer: AggregatesResponse, last_t: int | None, request: _Request,
                      to: str, job: _Job) -> _Request | None:
        """The page after this one: ``next_url`` on our base URL, or a hand-made
        continuation after a suspiciously full page (pitfall 1), or None when done.
        ``last_t`` is the last bar kept: a stray bar past the range must not move it."""
        if answer.next_url:
            try:
                url = _urls.local_next_url(
                    answer.next_url, _urls.series_path(job.ticker, job.timeframe))
            except ValueError as exc:
                raise PaginationError(str(exc), **job.context) from None
            starts = _urls.from_of(url, job.ticker)
            if starts is None and last_t is not None:
                starts = _urls.exact_datetime(last_t + 1)
            if starts is None or starts <= request.covers_from:
                # Following it could only fetch this page again: a loop (pitfall 14). The
                # page is not yielded, so no coverage is recorded for what it claims.
                raise PaginationError("next_url does not advance past the page it follows",
                                      **job.context)
            # Polygon's cursor carries limit and sort but not always adjusted: re-add what
            # is missing, so every page of a range is the same series.
            query = parse_qs(urlsplit(url).query)
            missing = {key: value for key, value in self._params().items() if key not in query}
            if missing:  # appended by hand: httpx's params= would replace the cursor
                url += ("&" if "?" in url else "?") + urlencode(missing)
            return _Request(url, None, starts)
        counts = (answer.results_count, answer.query_count)
        if not any(count is not None and count >= self._page_limit for count in counts):
            return None
        if last_t is None or last_t + 1 <= datetime_to_ms(request.covers_from):
            raise PaginationError("a full page without next_url did not advance",
                                  **job.context)
        after_last = ms_to_datetime(last_t) + job.timeframe.duration
        if not may_hold_bars(job.ticker, job.timeframe, after_last, job.span.end):
            return None  # full, but no session is left in the range: nothing was cut off
        log.info("polygon.self_paginating",
                 message=f"Full page without next_url for {job.ticker} {job.timeframe}, "
                         f"continuing after t={last_t}",
                 **job.context, last_t=last_t)
        url = _urls.aggs_path(job.ticker, job.timeframe, str(last_t + 1), to)
        return _Request(url, self._params(), _urls.exact_datetime(last_t + 1))

    async def fetch_grouped_daily(self, day: date) -> dict[str, Bar]:
        """Every US stock's bar of session ``day`` in one request, keyed by ticker (``T``).

        Same retries, limiter and breaker as an aggregates page. ``results: null`` for a
        session that has closed is retried and, when the attempts run out, raised as
        :class:`SuspectEmptyError`, never returned as "no bars" (pitfall 4); a body without
        ``results`` is Polygon's ordinary "no data" and comes back as ``{}``. The bars' ``t``
        is 16:00 New York: key them by session date (the store does).
        """
        label = f"grouped daily {day.isoformat()}"
        opens = session_start(_STOCK_CALENDAR, day)
        closes = session_start(_STOCK_CALENDAR, day + timedelta(days=1))
        job = _Job(_STOCK_CALENDAR, _DAILY, TimeRange(opens, closes), label=label,
                   what="grouped daily")
        request = _Request(f"{_GROUPED_PATH}{day.isoformat()}",
                           {"adjusted": "true" if self._adjusted else "false"}, opens)

        def suspect(answer: _Grouped) -> bool:
            closed_by = min(job.span.end, datetime.now(UTC))
            return answer[1] and holds_full_session(_STOCK_CALENDAR, opens, closed_by)

        bars, _ = await self._with_retries(
            job, lambda: self._attempt(request, job, _read_grouped), suspect)
        return bars

    async def fetch_splits(self, ticker: str) -> list[Split]:
        """Every split Polygon lists for ``ticker``, sorted by execution date (an exact
        duplicate listed twice comes back once).

        ``GET /v3/reference/splits?ticker=T&limit=1000&order=asc&sort=execution_date``
        (``limit`` is ``page_limit`` when that is smaller), then each ``next_url`` on our
        own base URL with the key in the header only; a ``next_url`` naming another
        endpoint or ticker, one already fetched (a loop), or more than ``max_pages`` pages
        is a :class:`PaginationError`. Each page has the retries, limiter and breaker of an
        aggregates page. A malformed body (a bad date, a ratio that is not a positive
        number, another ticker's split) is retried and then raised as
        :class:`MalformedResponseError`; ``results: null`` is doubted the same way and
        ends as :class:`SuspectEmptyError`. Only a body without results means none.
        """
        validate_ticker(ticker)
        job = _Job(ticker, _DAILY, _NO_SPAN, label=f"{ticker} splits", what="splits")
        params = {"ticker": ticker, "limit": str(min(self._page_limit, _SPLITS_MAX_LIMIT)),
                  "order": "asc", "sort": "execution_date"}
        request = _Request(_SPLITS_PATH, params, _EPOCH)
        seen = {_urls.url_key(f"{_SPLITS_PATH}?{urlencode(params)}")}
        found: set[Split] = set()
        pages = 0
        while True:
            if pages >= self._max_pages:
                raise PaginationError(f"page cap of {self._max_pages} reached", **job.context)
            pages += 1
            page = await self._fetch_splits_page(request, job)
            found.update(page.splits)
            if not page.next_url:
                break
            try:
                url = _urls.local_reference_url(page.next_url, _SPLITS_PATH, ticker)
            except ValueError as exc:
                raise PaginationError(str(exc), **job.context) from None
            key = _urls.url_key(url)
            if key in seen:
                raise PaginationError("next_url repeats a page already fetched",
                                      **job.context)
            seen.add(key)
            request = _Request(url, None, _EPOCH)
        log.debug("polygon.splits_fetched",
                  message=f"Fetched {len(found)} split(s) of {ticker} in {pages} page(s)",
                  **job.context, splits=len(found), pages=pages)
        return sorted(found)

    async def _fetch_splits_page(self, request: _Request, job: _Job) -> SplitsPage:
        """One splits page with retries; ``results: null`` is retried like a failure."""
        return await self._with_retries(
            job, lambda: self._attempt(
                request, job, functools.partial(parse_splits, ticker=job.ticker)),
            lambda page: page.results_null)

    async def _fetch_page(self, request: _Request, job: _Job) -> _Answer:
        """One page with retries; after the last attempt the last error is raised as is."""
        return await self._with_retries(
            job, lambda: self._attempt(request, job, parse_aggregates),
            lambda answer: answer[0].results_null and self._expects_bars(request, job))

    async def _with_retries(self, job: _Job, call: Callable[[], Awaitable[_T]],
                            suspect: Callable[[_T], bool]) -> _T:
        """``call`` with tenacity; an answer ``suspect`` finds too empty to believe is
        retried like a failure. After the last attempt the last error is raised as is."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(TransientPolygonError),
            sleep=self._sleep,
            before_sleep=lambda state: self._log_retry(state, job),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    answer = await call()
                    if suspect(answer):
                        raise SuspectEmptyError(
                            "results: null for a span holding a whole trading session"
                            if job.span is not _NO_SPAN else "results: null",
                            **job.context)
                    return answer
        except RateLimitedError:
            log.warning(
                "polygon.rate_limited",
                message=f"Rate limited on {job.name}, attempt "
                        f"{self._max_attempts}/{self._max_attempts}, giving up",
                **job.context, attempt=self._max_attempts, wait_s=None)
            raise
        raise AssertionError("tenacity ended without a result")  # pragma: no cover

    @staticmethod
    def _expects_bars(request: _Request, job: _Job) -> bool:
        """Pitfall 4: ``results: null`` for a liquid ticker on a trading day happens under
        load; such an answer is asked again, and never believed: when the attempts run out
        the range fails (no coverage is recorded) and the next run asks again. A body
        without a ``results`` key is Polygon's ordinary "no data" and is believed at once."""
        return holds_full_session(job.ticker, request.covers_from, job.span.end)

    def _wait(self, state: RetryCallState) -> float:
        """Retry-After when the server sent one (capped), else exponential 1, 2, 4, 8 s."""
        error = state.outcome.exception() if state.outcome else None
        hint = getattr(error, "retry_after_s", None)
        if hint is None:  # an open circuit: wait for its probe, not less
            hint = getattr(error, "retry_in_s", None)
        if hint is not None:
            return min(float(hint), self._max_wait_s)
        return float(self._backoff(state))

    def _log_retry(self, state: RetryCallState, job: _Job) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.upcoming_sleep
        attempt = state.attempt_number
        fields = {**job.context, "attempt": attempt, "max_attempts": self._max_attempts,
                  "wait_s": wait}
        if isinstance(error, RateLimitedError):
            log.warning("polygon.rate_limited",
                        message=f"Rate limited on {job.name}, attempt "
                                f"{attempt}/{self._max_attempts}, waiting {wait:.1f} s",
                        **fields)
        else:
            log.warning("polygon.retrying",
                        message=f"Retrying {job.name} after: {error}; "
                                f"attempt {attempt}/{self._max_attempts}, "
                                f"waiting {wait:.1f} s",
                        reason=str(error), **fields)

    async def _attempt(self, request: _Request, job: _Job,
                       parse: Callable[[object], _T]) -> _T:
        """One attempt: ask the breaker, wait for the limiter, send, and report the outcome.

        A 429's Retry-After is both the limiter's hold (an absolute deadline, so every task
        waits) and tenacity's wait for this task; as the deadline is absolute, the second
        wait finds it passed and the two never add up, provided ``sleep`` and the limiter's
        clock tell the same time (both real in production).
        """
        self._ask_breaker(job)
        try:
            if self._limiter is None:
                answer = await self._send(request, job, parse)
            else:
                async with self._limiter.slot() as slot:
                    answer = await self._send(request, job, parse, on_sent=slot.sent)
        except RateLimitedError as exc:
            if self._limiter is not None:
                self._limiter.on_rate_limited(exc.retry_after_s)
            self._breaker_answered()
            raise
        except TransientPolygonError as exc:
            if self._breaker is not None:
                self._breaker.record_failure(exc)
            raise
        except PolygonClientError:
            self._breaker_answered()  # a 4xx is the API answering, not an outage
            raise
        except BaseException:  # cancelled, or a request httpx could not even build
            if self._breaker is not None:
                self._breaker.release()
            raise
        if self._limiter is not None:
            self._limiter.on_success()
        self._breaker_answered()
        return answer

    def _ask_breaker(self, job: _Job) -> None:
        """Fail fast while the circuit is open; the error names the ticker like any other."""
        if self._breaker is None:
            return
        try:
            self._breaker.before_call()
        except CircuitOpenError as exc:
            raise CircuitOpenError(str(exc), retry_in_s=exc.retry_in_s,
                                   last_error=exc.last_error, **job.context) from None

    def _breaker_answered(self) -> None:
        """The API answered (2xx, 4xx or 429): not an outage, whatever the answer said."""
        if self._breaker is not None:
            self._breaker.record_success()

    async def _send(self, request: _Request, job: _Job, parse: Callable[[object], _T], *,
                    on_sent: Callable[[], None] | None = None) -> _T:
        """One HTTP request, with transport failures mapped into the error tree; ``on_sent``
        is called once its headers are on the wire (httpcore's ``trace`` extension).

        ``api_seconds`` is measured here, so time spent waiting in the limiter is not in it.
        """
        self.total_requests += 1
        started = time.monotonic()
        try:
            # httpx's timeout bounds each phase; this bounds the whole exchange, so a body
            # that trickles in forever is abandoned too.
            async with (asyncio.timeout(self._timeout_s),
                        self._http.stream("GET", request.url, params=request.params,
                                          extensions=_sent_trace(on_sent)) as response):
                # Read into our own bytes, not response.content: an httpx Response and its
                # stream refer to each other, so a body kept on it lives until the cyclic
                # garbage collector runs (tens of MB of old pages in a long backfill).
                body = b"".join([chunk async for chunk in response.aiter_bytes()])
        except TimeoutError as exc:
            raise TransientPolygonError(
                f"request took longer than {self._timeout_s:g} s", **job.context) from exc
        except httpx.TimeoutException as exc:
            raise TransientPolygonError(
                f"request timed out after {self._timeout_s:g} s ({type(exc).__name__})",
                **job.context) from exc
        except httpx.TransportError as exc:
            raise TransientPolygonError(
                f"connection failed: {self._redact(f'{type(exc).__name__}: {exc}')}",
                **job.context) from exc
        except httpx.DecodingError as exc:
            raise MalformedResponseError("body could not be decoded", **job.context) from exc
        except httpx.RequestError as exc:
            raise PolygonError(f"request failed: {type(exc).__name__}", **job.context) from exc
        finally:
            self.api_seconds += time.monotonic() - started
        return self._read(response, body, job, parse)

    def _read(self, response: httpx.Response, body: bytes, job: _Job,
              parse: Callable[[object], _T]) -> _T:
        """Turn a response and its body into an answer (``parse`` reads a successful body)
        or the matching error."""
        code = response.status_code
        context: dict[str, Any] = {**job.context, "status_code": code}
        if code == 429:
            self.rate_limited_count += 1
            raise RateLimitedError("rate limited", retry_after_s=self._retry_after(response),
                                   server_message=self._error_text(body), **context)
        if code >= 500:
            raise ServerError("server error", retry_after_s=self._retry_after(response),
                              server_message=self._error_text(body), **context)
        if code == 408:
            raise TransientPolygonError("request timeout",
                                        server_message=self._error_text(body), **context)
        if not 200 <= code < 300:
            kind = {401: AuthenticationError, 403: NotAuthorizedError}.get(
                code, PolygonClientError)
            raise kind("request refused", server_message=self._error_text(body),
                       **context)
        fast = _FAST_PARSERS.get(parse)
        if fast is not None and (answer := fast(body)) is not None:
            return answer  # type: ignore[no-any-return]
        try:
            payload = from_json(body, allow_inf_nan=True)
        except ValueError:
            raise MalformedResponseError(
                f"body is not valid JSON ({len(body)} bytes)", **context) from None
        try:
            status = read_status(payload)
            if status == NOT_AUTHORIZED:
                raise NotAuthorizedError("not authorized",
                                         server_message=self._message(payload), **context)
            if status not in SUCCESS_STATUSES:
                raise MalformedResponseError(f"status {status}",
                                             server_message=self._message(payload), **context)
            return parse(payload)
        except PayloadError as exc:
            # redacted: a splits error quotes the server's values, which could echo the key
            raise MalformedResponseError(self._redact(f"malformed {job.what} answer: {exc}"),
                                         **context) from None

    def _retry_after(self, response: httpx.Response) -> float | None:
        return _urls.parse_retry_after(response.headers.get("Retry-After"), datetime.now(UTC))

    def _error_text(self, body: bytes) -> str | None:
        """The server's ``error``/``message``, or the start of a non-JSON body."""
        try:
            return self._message(from_json(body, allow_inf_nan=True))
        except ValueError:
            text = body.decode("utf-8", errors="replace").strip()[:200]
            return self._redact(text) if text else None

    def _message(self, payload: object) -> str | None:
        text = server_text(payload)
        return None if text is None else self._redact(text)

    def _redact(self, text: str) -> str:
        """Keep the key out of messages even if a server or proxy echoes it."""
        return text.replace(self._api_key, "***") if self._api_key else text


_HEADERS_SENT: Final = frozenset({"http11.send_request_headers.complete",
                                  "http2.send_request_headers.complete"})


def _sent_trace(on_sent: Callable[[], None] | None) -> dict[str, object]:
    """httpx ``extensions`` whose trace calls ``on_sent`` when the headers have gone out."""
    if on_sent is None:
        return {}

    async def trace(event: str, _info: dict[str, object]) -> None:
        if event in _HEADERS_SENT:
            on_sent()

    return {"trace": trace}


# Bodies a parser can read straight from bytes in the common case (None: read carefully).
_FAST_PARSERS: dict[Callable[[object], Any], Callable[[bytes], Any]] = {
    parse_aggregates: parse_aggregates_fast}


def _read_grouped(payload: object) -> _Grouped:
    """A grouped-daily body's bars by ticker, and whether its ``results`` was null."""
    try:
        bars = parse_grouped_daily(payload)
    except MalformedResponseError as exc:
        raise PayloadError(str(exc).removeprefix("grouped daily answer is malformed: ")) from None
    null = isinstance(payload, dict) and "results" in payload and payload["results"] is None
    return bars, null
