"""A local HTTP server that answers like Polygon's aggregates API, for tests and demos.

It serves CSV files (exact values) and deterministic synthetic bars, pages by base
aggregates with ``next_url`` like Polygon, and can be told to be slow, rate limited,
strict about the API key or faulty (``faults.py``), so every client failure path can be
exercised offline through real HTTP.

Splits added with ``add_split`` are listed by ``/v3/reference/splits`` and change what
``adjusted=true`` (the default) serves for the bars before their execution dates; a ticker
without splits is served from the same caches whichever ``adjusted`` is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web

from polygon_backfill.models import (
    NEW_YORK,
    AssetClass,
    Split,
    Timespan,
    asset_class,
    datetime_to_ms,
    validate_ticker,
)
from polygon_backfill.sandbox.buckets import Adjustment, Bar, local_midnight_ms
from polygon_backfill.sandbox.cache import Row, SyntheticCache
from polygon_backfill.sandbox.config import RequestRecord, SandboxConfig
from polygon_backfill.sandbox.dataset import Dataset
from polygon_backfill.sandbox.fault_bodies import (
    RATE_LIMIT_ERROR,
    Reply,
    error_body,
    fault_reply,
    json_reply,
    request_id,
)
from polygon_backfill.sandbox.faults import FaultInjector, FaultKind, FaultRule, Target
from polygon_backfill.sandbox.query import (
    AggsQuery,
    BadRequestError,
    SplitsQuery,
    encode_cursor,
    matches,
    parse_aggs,
    parse_flag,
    parse_splits,
)
from polygon_backfill.sandbox.synthetic import SyntheticSource

log = structlog.get_logger(__name__)

_AGGS = "/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}"
_GROUPED = "/v2/aggs/grouped/locale/us/market/stocks/{date}"
_SPLITS = "/v3/reference/splits"

Body = dict[str, Any]


def _dumps(body: Body) -> str:
    return json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Answer:
    """An endpoint's JSON reply before faults, with what fault rules look at.

    Aggregates pages are joined from cached bar texts rather than dumped from dicts (the
    sandbox must outpace any client); ``body()`` parses the text back for the few replies
    a fault rewrites, exactly, since every float round-trips through its repr.
    """

    status: int
    text: str
    results: int = 0
    has_bars: bool = False
    has_next: bool = False

    @classmethod
    def of(cls, status: int, body: Body, results: int = 0, *, bars: bool = True) -> Answer:
        """``bars=False`` for results that are not bars (bar faults must not touch them)."""
        return cls(status, _dumps(body), results, bars and bool(body.get("results")),
                   "next_url" in body)

    def body(self) -> Body:
        return dict(json.loads(self.text))


def take_page(rows: Iterable[Row], limit: int) -> tuple[list[str], int, int | None]:
    """Bars until the next would push the base-aggregate count past ``limit`` (at least one).

    Returns the bars' texts, the base aggregates they consume, and the next bar's ``t``
    (or None).
    """
    texts: list[str] = []
    consumed = 0
    for t, count, text in rows:
        if texts and consumed + count > limit:
            return texts, consumed, t
        texts.append(text)
        consumed += count
    return texts, consumed, None


class SandboxServer:
    """The sandbox on ``host:port`` (port 0 picks a free one); ``base_url`` after start."""

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.base_url = ""
        self.requests: list[RequestRecord] = []
        self.rate_limited_count = 0
        self.faults_injected: Counter[str] = Counter()
        self._faults = FaultInjector(config.faults, config.fault_seed)
        self._stopping = asyncio.Event()
        self._dataset = Dataset(config.data_dir)
        self._synthetic = (SyntheticCache(SyntheticSource(config.synthetic_start))
                           if config.synthetic else None)
        self._splits: dict[str, list[Split]] = {}
        self._adjustments: dict[tuple[str, tuple[Split, ...]], Adjustment | None] = {}
        self._monotonic: Callable[[], float] = config.monotonic or time.monotonic
        self._window: deque[float] = deque()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        """The aiohttp application (also usable with aiohttp's own test client)."""
        app = web.Application()
        app.router.add_get(_AGGS, self._handle_aggs)
        app.router.add_get(_GROUPED, self._handle_grouped)
        app.router.add_get(_SPLITS, self._handle_splits)
        app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        return app

    async def start(self) -> None:
        """Bind and serve; afterwards ``base_url`` names the real port."""
        self._stopping.clear()
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self.port = int(port)
        shown = f"[{host}]" if ":" in str(host) else str(host)
        self.base_url = f"http://{shown}:{self.port}"

    async def stop(self) -> None:
        """Close the listener and any open connections; hung (TIMEOUT) requests end first."""
        self._stopping.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> SandboxServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def override_bar(self, ticker: str, timespan: str, t: int, **values: float) -> None:
        """Serve other ``o/h/l/c/v/vw/n`` for one CSV row from now on (a correction).

        Passthrough and aggregated answers built from that row both change. Dataset
        tickers only: synthetic bars are computed, not stored, so there is no row to edit.
        """
        if ticker not in self._dataset.tickers():
            raise ValueError(f"override_bar supports dataset (CSV) tickers only, not {ticker!r}")
        self._dataset.override(ticker, Timespan(timespan), t, values)

    def add_split(self, ticker: str, execution_date: date, split_from: float,
                  split_to: float) -> None:
        """List a split from now on, and adjust the ticker's bars for it from its execution
        date (the sandbox's "now", New York date) on.

        ``/v3/reference/splits`` lists it; with ``adjusted=true`` (the default) every bar
        of a session before ``execution_date`` is served with o, h, l, c and vw times
        ``split_from / split_to`` and v times ``split_to / split_from`` (n kept), for CSV
        and synthetic tickers alike; ``adjusted=false`` serves the raw series unchanged.
        Coarser CSV bars are aggregated from adjusted rows, as Polygon does; a synthetic
        bar is scaled as a whole by the splits after the last session of its bucket.
        """
        split = Split(execution_date, split_from, split_to)  # checks the numbers
        validate_ticker(ticker)
        self._splits[ticker] = sorted([*self._splits.get(ticker, []), split])
        self._dataset.forget(ticker)  # its series for the old split list are never asked again

    def _adjustment(self, ticker: str) -> Adjustment | None:
        """The adjustment for the splits in effect at the sandbox's "now": as on Polygon,
        a split announced for a later date changes no bar until that date."""
        listed = self._splits.get(ticker)
        if not listed:
            return None
        today = self.config.current_time().astimezone(NEW_YORK).date()
        effective = tuple(split for split in listed if split.execution_date <= today)
        if not effective:
            return None
        key = (ticker, effective)
        if key not in self._adjustments:
            self._adjustments[key] = Adjustment.of(ticker, list(effective))
        return self._adjustments[key]

    def splits(self, ticker: str) -> list[Split]:
        """The splits added for ``ticker``, by execution date."""
        return list(self._splits.get(ticker, []))

    # -- request pipeline: auth -> rate limit -> answer -> fault -> log -> latency -----

    async def _handle_aggs(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._aggs, scope="aggs")

    async def _handle_grouped(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._grouped, scope="grouped")

    async def _handle_splits(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, self._splits_answer, scope="splits")

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(
            request, lambda _: Answer.of(404, error_body("Not found.", "NOT_FOUND")))

    async def _serve(self, request: web.Request, answer: Callable[[web.Request], Answer],
                     scope: str | None = None) -> web.StreamResponse:
        """``scope`` ("aggs", "grouped" or "splits") is what fault rules see; None for
        routes that faults never touch."""
        rule: FaultRule | None = None
        if not self._authorized(request):
            reply = json_reply(401, error_body("Unknown API Key"))
        elif not self._admit():
            self.rate_limited_count += 1
            reply = json_reply(429, error_body(RATE_LIMIT_ERROR))
        else:
            found = answer(request)
            reply = Reply(found.status, found.text, results=found.results)
            if scope is not None:
                rule = self._pick_fault(request, scope, found)
            if rule is not None:
                reply = fault_reply(rule, found.status, found.body(), str(request.url),
                                    self._query(request), found.results)
                self.faults_injected[rule.kind.value] += 1
        hangs = rule is not None and rule.kind is FaultKind.TIMEOUT
        self.requests.append(RequestRecord(
            path=request.path, params=dict(request.query), status=0 if hangs else reply.status,
            ticker=request.match_info.get("ticker"), results=0 if hangs else reply.results,
            fault=rule.kind.value if rule is not None else None,
        ))
        if self.config.latency_s > 0:
            await asyncio.sleep(self.config.latency_s)
        if hangs and rule is not None:
            return await self._hang(request, reply, rule.hang_s)
        if rule is not None and rule.kind is FaultKind.CONNECTION_RESET:
            return await _reset(request, reply)
        return _response(reply)

    def _pick_fault(self, request: web.Request, scope: str,
                    found: Answer) -> FaultRule | None:
        """Splits requests are seen like grouped ones (no range, no bars to corrupt) with
        neither ticker nor timespan: only rules naming neither hit them, so a rule aimed
        at a ticker's bars is never spent on its split check."""
        match = request.match_info
        first_page = "cursor" not in request.query
        if scope == "splits":
            target = Target(ticker=None, timespan=None, grouped=True,
                            status=found.status, has_bars=False, has_next=found.has_next,
                            first_page=first_page)
        else:
            grouped = scope == "grouped"
            target = Target(
                ticker=match.get("ticker"), timespan="day" if grouped else match.get("timespan"),
                grouped=grouped, status=found.status, has_bars=found.has_bars,
                has_next=found.has_next, first_page=first_page)
        return self._faults.pick(target)

    @staticmethod
    def _query(request: web.Request) -> AggsQuery | None:
        if "ticker" not in request.match_info:
            return None
        try:
            return parse_aggs(request.match_info, request.query)
        except BadRequestError:
            return None

    async def _hang(self, request: web.Request, reply: Reply,
                    hang_s: float) -> web.StreamResponse:
        """Say nothing until ``stop()`` (then drop the connection) or ``hang_s`` (then
        answer late, which doubles as a latency spike)."""
        try:
            await asyncio.wait_for(self._stopping.wait(), hang_s)
        except TimeoutError:
            return _response(reply)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        return (request.headers.get("Authorization") == f"Bearer {key}"
                or request.query.get("apiKey") == key)

    def _admit(self) -> bool:
        """Sliding window: at most ``rate_limit`` admitted requests per ``rate_period_s``."""
        limit = self.config.rate_limit
        if limit is None:
            return True
        now = self._monotonic()
        period = self.config.rate_period_s - 1e-9  # tolerate float rounding at the boundary
        while self._window and now - self._window[0] >= period:
            self._window.popleft()
        if len(self._window) >= limit:
            return False
        self._window.append(now)
        return True

    def _now_ms(self) -> int:
        return datetime_to_ms(self.config.current_time())

    # -- endpoints ---------------------------------------------------------------------

    def _aggs(self, request: web.Request) -> Answer:
        try:
            query = parse_aggs(request.match_info, request.query)
        except BadRequestError as exc:
            return Answer.of(400, error_body(str(exc)))
        hi = min(query.hi, self._now_ms() - 1)
        texts: list[str] = []
        consumed, next_t = 0, None
        if query.lo <= hi:
            texts, consumed, next_t = take_page(self._select(query, query.lo, hi), query.limit)
        head: Body = {"ticker": query.ticker, "queryCount": consumed,
                      "resultsCount": len(texts), "adjusted": query.adjusted}
        tail: Body = {"status": "OK", "request_id": request_id(), "count": len(texts)}
        if next_t is not None:
            tail["next_url"] = self._next_url(request, query, next_t)
        # json.dumps of {**head, "results": [...], **tail}, with the bars spliced in as text
        results = f',"results":[{",".join(texts)}]' if texts else ""
        text = f"{_dumps(head)[:-1]}{results},{_dumps(tail)[1:]}"
        return Answer(200, text, len(texts), bool(texts), next_t is not None)

    def _select(self, query: AggsQuery, lo: int, hi: int) -> Iterator[Row]:
        adjustment = self._adjustment(query.ticker) if query.adjusted else None
        series = self._dataset.series(query.ticker, query.multiplier, query.timespan,
                                      adjustment)
        if series is not None:
            return series.rows(lo, hi, query.descending)
        if self._synthetic is not None:
            return self._synthetic.select(query.ticker, query.multiplier, query.timespan,
                                          lo, hi, query.descending, adjustment)
        return iter(())

    def _next_url(self, request: web.Request, query: AggsQuery, next_t: int) -> str:
        """Polygon moves ``from`` to the next bar (``to`` when sorting descending)."""
        match = request.match_info
        start, end = (match["from"], str(next_t)) if query.descending else (
            str(next_t), match["to"])
        options = query.options()
        params = "&".join(f"{key}={value}" for key, value in options.items())
        return (f"{request.scheme}://{request.host}/v2/aggs/ticker/{query.ticker}/range/"
                f"{query.multiplier}/{query.timespan.value}/{start}/{end}"
                f"?cursor={encode_cursor(options)}&{params}")

    def _grouped(self, request: web.Request) -> Answer:
        """Every stock in ``data_dir`` with a bar that session, stamped 16:00 New York."""
        try:
            day = date.fromisoformat(request.match_info["date"])
        except ValueError:
            return Answer.of(400, error_body(f"Invalid date: '{request.match_info['date']}'."))
        try:
            adjusted = parse_flag(request.query.get("adjusted", "true"), "adjusted")
        except BadRequestError as exc:
            return Answer.of(400, error_body(str(exc)))
        close_ms = datetime_to_ms(datetime(day.year, day.month, day.day, 16, tzinfo=NEW_YORK))
        results: list[Bar] = []
        if close_ms < self._now_ms():
            start = local_midnight_ms(day, NEW_YORK)
            end = local_midnight_ms(day + timedelta(days=1), NEW_YORK) - 1
            for ticker in self._dataset.tickers():
                if asset_class(ticker) is not AssetClass.STOCK:
                    continue
                adjustment = self._adjustment(ticker) if adjusted else None
                series = self._dataset.series(ticker, 1, Timespan.DAY, adjustment)
                found = next(series.select(start, end, False), None) if series else None
                if found is not None:
                    results.append({"T": ticker, **found[0], "t": close_ms})
        body: Body = {"queryCount": len(results), "resultsCount": len(results),
                      "adjusted": adjusted}
        if results:
            body["results"] = results
        body.update(status="OK", request_id=request_id(), count=len(results))
        return Answer.of(200, body, len(results))

    def _splits_answer(self, request: web.Request) -> Answer:
        """``/v3/reference/splits``: the added splits that pass the filters, sorted, one
        page of ``limit`` at a time; ``next_url`` carries everything in its cursor."""
        try:
            query = parse_splits(request.query)
        except BadRequestError as exc:
            return Answer.of(400, error_body(str(exc)))
        found = [(ticker, split) for ticker, listed in self._splits.items()
                 for split in listed if _split_matches(query, ticker, split)]
        if query.sort == "ticker":
            found.sort(key=lambda item: (item[0], item[1]), reverse=query.descending)
        else:
            found.sort(key=lambda item: (item[1], item[0]), reverse=query.descending)
        end = query.offset + query.limit
        page = found[query.offset:end]
        body: Body = {}
        if page:
            body["results"] = [_split_json(ticker, split) for ticker, split in page]
        body.update(status="OK", request_id=request_id())
        if end < len(found):
            cursor = encode_cursor({**dict(query.options), "offset": str(end)})
            body["next_url"] = f"{request.scheme}://{request.host}{_SPLITS}?cursor={cursor}"
        return Answer.of(200, body, len(page), bars=False)


def _split_matches(query: SplitsQuery, ticker: str, split: Split) -> bool:
    if query.reverse_split is not None and (
            split.split_from > split.split_to) is not query.reverse_split:
        return False
    return (all(matches(op, ticker, value) for op, value in query.tickers)
            and all(matches(op, split.execution_date, value) for op, value in query.dates))


def _number(value: float) -> float | int:
    """Whole ratios as JSON integers (``1``, ``4``), as Polygon writes them."""
    return int(value) if float(value).is_integer() else value


def _split_json(ticker: str, split: Split) -> Body:
    """One result in Polygon's shape; ``id`` is stable for the same split."""
    day = split.execution_date.isoformat()
    digest = hashlib.blake2b(f"{ticker}|{day}|{split.split_from!r}|{split.split_to!r}".encode(),
                             digest_size=16).hexdigest()
    return {"execution_date": day, "id": f"E{digest}", "split_from": _number(split.split_from),
            "split_to": _number(split.split_to), "ticker": ticker}


def _response(reply: Reply) -> web.Response:
    return web.Response(text=reply.text, status=reply.status, headers=reply.headers,
                        content_type=reply.content_type)


async def _reset(request: web.Request, reply: Reply) -> web.StreamResponse:
    """Promise the whole body (Content-Length), send half, then drop the connection."""
    data = reply.text.encode()
    response = web.StreamResponse(status=reply.status, headers=reply.headers)
    response.content_type = reply.content_type
    response.content_length = len(data)
    await response.prepare(request)
    await response.write(data[: len(data) // 2])
    if request.transport is not None:
        request.transport.close()
    return response


def run_sandbox(config: SandboxConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM; prints the base URL once listening (for the CLI)."""
    asyncio.run(_serve_until_signalled(config, host, port))


async def _serve_until_signalled(config: SandboxConfig, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with SandboxServer(config, host, port) as server:
        log.info("sandbox.started", base_url=server.base_url,
                 message=f"Polygon sandbox listening on {server.base_url}")
        print(f"Polygon sandbox listening on {server.base_url}", flush=True)
        await stop.wait()
        log.info("sandbox.stopped", requests=len(server.requests),
                 rate_limited=server.rate_limited_count, message="Polygon sandbox stopped")
