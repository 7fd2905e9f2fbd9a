"""Splits: the sandbox's ``/v3/reference/splits``, split-adjusted aggregates (CSV and
synthetic tickers, grouped daily) and ``PolygonClient.fetch_splits``.

Behaviour goes through a real sandbox over real HTTP; the client's answers to bodies the
sandbox never sends (malformed, looping, foreign) are canned with respx.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from polygon_backfill.clients import CircuitBreaker, PolygonClient
from polygon_backfill.errors import (
    AuthenticationError,
    CircuitOpenError,
    MalformedResponseError,
    PaginationError,
    RateLimitedError,
    SuspectEmptyError,
)
from polygon_backfill.models import NEW_YORK, Split, Timeframe, session_date, session_start
from polygon_backfill.sandbox import FaultKind, FaultRule, SandboxServer
from tests.support import RecordingSleep, SandboxFactory

NOW = datetime(2024, 6, 1, tzinfo=UTC)
KEY = "sk-SECRET-0123456789"
BASE_URL = "https://api.test.polygon"
SPLITS = "/v3/reference/splits"
GROUPED = "/v2/aggs/grouped/locale/us/market/stocks/"
DAY = Timeframe.parse("1d")
Json = dict[str, Any]






@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


async def get(server: SandboxServer, url: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        return await client.get(url, params=params or None)


async def bars(server: SandboxServer, ticker: str, span: str, start: str, end: str,
               adjusted: bool | None = None) -> list[Json]:
    """Every bar of one request (limit 50000: no paging needed here)."""
    params = {"limit": "50000"}
    if adjusted is not None:
        params["adjusted"] = str(adjusted).lower()
    response = await get(server, f"/v2/aggs/ticker/{ticker}/range/{span}/{start}/{end}",
                         **params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert "next_url" not in body
    return list(body.get("results", []))


def scaled(bar: Json, price: float, volume: float) -> Json:
    """``bar`` as the sandbox adjusts it: prices and vw times ``price``, v times ``volume``."""
    return {key: value * price if key in ("o", "h", "l", "c", "vw")
            else value * volume if key == "v" else value
            for key, value in bar.items()}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def splits_body(*results: Json, next_url: str | None = None, **top: Any) -> httpx.Response:
    body: Json = {"status": "OK", "request_id": "r1", **top}
    if results:
        body["results"] = list(results)
    if next_url is not None:
        body["next_url"] = next_url
    return httpx.Response(200, json=body)


def split_json(day: str, split_from: Any = 1, split_to: Any = 4, ticker: str = "AAPL",
               **extra: Any) -> Json:
    return {"execution_date": day, "id": f"E{day}", "split_from": split_from,
            "split_to": split_to, "ticker": ticker, **extra}


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


def test_split_orders_by_date_and_knows_its_ratio() -> None:
    forward, reverse = Split(date(2020, 8, 31), 1, 4), Split(date(2011, 3, 1), 10, 1)
    assert sorted([forward, reverse]) == [reverse, forward]
    assert (forward.ratio, reverse.ratio) == (4.0, 0.1)
    assert Split(date(2020, 8, 31), 1.0, 4.0) == forward
    for bad in (0, -1, float("nan"), float("inf"), True, "4"):
        with pytest.raises(ValueError, match="split_to"):
            Split(date(2020, 8, 31), 1, bad)


# --------------------------------------------------------------------------------------
# The sandbox's splits endpoint
# --------------------------------------------------------------------------------------


async def test_splits_are_listed_in_polygons_shape(sandbox: SandboxFactory) -> None:
    server = await sandbox()
    server.add_split("AAPL", date(2020, 8, 31), 1, 4)
    server.add_split("AAPL", date(2014, 6, 9), 1, 7)
    server.add_split("MSFT", date(2003, 2, 18), 1, 2)
    server.add_split("SIRI", date(2024, 9, 10), 10, 1)

    body = (await get(server, SPLITS, ticker="AAPL")).json()
    assert body["status"] == "OK"
    assert body["request_id"]
    assert "next_url" not in body
    assert [{key: value for key, value in row.items() if key != "id"}
            for row in body["results"]] == [
        {"execution_date": "2014-06-09", "split_from": 1, "split_to": 7, "ticker": "AAPL"},
        {"execution_date": "2020-08-31", "split_from": 1, "split_to": 4, "ticker": "AAPL"},
    ]
    ids = [row["id"] for row in body["results"]]
    assert len(set(ids)) == 2
    assert [row["id"] for row in (await get(server, SPLITS, ticker="AAPL")).json()["results"]] \
        == ids  # stable

    newest_first = (await get(server, SPLITS, ticker="AAPL", order="desc")).json()
    assert [row["execution_date"] for row in newest_first["results"]] == [
        "2020-08-31", "2014-06-09"]
    everyone = (await get(server, SPLITS, limit="1000")).json()["results"]
    assert [row["ticker"] for row in everyone] == ["MSFT", "AAPL", "AAPL", "SIRI"]
    by_ticker = (await get(server, SPLITS, sort="ticker", limit="1000")).json()["results"]
    assert [row["ticker"] for row in by_ticker] == ["AAPL", "AAPL", "MSFT", "SIRI"]
    recent = (await get(server, SPLITS, **{"execution_date.gte": "2014-06-09",
                                           "execution_date.lt": "2024-01-01"})).json()
    assert [row["execution_date"] for row in recent["results"]] == ["2014-06-09", "2020-08-31"]
    on_day = (await get(server, SPLITS, execution_date="2003-02-18")).json()["results"]
    assert [row["ticker"] for row in on_day] == ["MSFT"]
    reverse = (await get(server, SPLITS, reverse_split="true")).json()["results"]
    assert [(row["ticker"], row["split_from"]) for row in reverse] == [("SIRI", 10)]

    none = (await get(server, SPLITS, ticker="NVDA")).json()
    assert "results" not in none
    assert none["status"] == "OK"
    logged = server.requests[0]
    assert (logged.path, logged.params, logged.status, logged.results) == (
        SPLITS, {"ticker": "AAPL"}, 200, 2)
    assert logged.ticker is None  # ``ticker`` names aggregates requests only
    assert server.splits("AAPL") == [Split(date(2014, 6, 9), 1, 7),
                                      Split(date(2020, 8, 31), 1, 4)]


async def test_splits_page_over_next_url_with_a_small_limit(sandbox: SandboxFactory) -> None:
    server = await sandbox()
    days = [date(2000 + year, 1, 3) for year in range(7)]
    for day in days:
        server.add_split("AAPL", day, 1, 2)
    server.add_split("MSFT", date(2001, 6, 1), 1, 3)

    seen: list[str] = []
    url: str | None = f"{SPLITS}?ticker=AAPL&limit=3"
    pages = 0
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        while url is not None:
            body = (await client.get(url)).json()
            pages += 1
            seen += [row["execution_date"] for row in body["results"]]
            assert all(row["ticker"] == "AAPL" for row in body["results"])
            url = body.get("next_url")
            if url is not None:
                assert url.startswith(f"{server.base_url}{SPLITS}?cursor=")
            assert pages < 10
    assert pages == 3
    assert seen == [day.isoformat() for day in days]
    assert [record.results for record in server.requests] == [3, 3, 1]


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"order": "sideways"},
    {"sort": "split_to"}, {"execution_date": "2020-13-01"}, {"execution_date.gte": "20200831"},
    {"ticker": "A/B"}, {"reverse_split": "maybe"}, {"cursor": "b2Zmc2V0PWFiYw"},  # offset=abc
])
async def test_nonsense_splits_requests_are_refused(sandbox: SandboxFactory,
                                                    params: dict[str, str]) -> None:
    server = await sandbox()
    response = await get(server, SPLITS, **params)
    assert response.status_code == 400
    assert response.json()["status"] == "ERROR"


async def test_splits_go_through_auth_rate_limit_and_faults(sandbox: SandboxFactory) -> None:
    """Only fault rules naming neither a ticker nor a timespan hit a splits request: a rule
    aimed at a ticker's bars is never spent on its split check."""
    server = await sandbox(
        FaultRule(FaultKind.SERVER_ERROR, timespan="day"),
        FaultRule(FaultKind.NOT_AUTHORIZED, ticker="AAPL"),
        FaultRule(FaultKind.UNAVAILABLE, times=1),
        api_key=KEY, rate_limit=3, rate_period_s=60.0, monotonic=lambda: 0.0)
    server.add_split("AAPL", date(2020, 8, 31), 1, 4)
    auth = {"Authorization": f"Bearer {KEY}"}
    aggs = "/v2/aggs/ticker/AAPL/range/1/minute/2020-08-31/2020-08-31"
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        assert (await client.get(SPLITS, params={"ticker": "AAPL"})).status_code == 401
        assert (await client.get(SPLITS, params={"ticker": "AAPL"},
                                 headers=auth)).status_code == 503
        assert (await client.get(SPLITS, params={"ticker": "AAPL"},
                                 headers=auth)).status_code == 200
        assert (await client.get(aggs, headers=auth)).status_code == 403
        assert (await client.get(SPLITS, params={"ticker": "MSFT"},
                                 headers=auth)).status_code == 429
    assert [(record.path, record.status, record.fault) for record in server.requests] == [
        (SPLITS, 401, None), (SPLITS, 503, "503"), (SPLITS, 200, None), (aggs, 403, "403"),
        (SPLITS, 429, None)]
    assert server.faults_injected == {"503": 1, "403": 1}
    assert server.rate_limited_count == 1


# --------------------------------------------------------------------------------------
# Adjusted aggregates
# --------------------------------------------------------------------------------------


async def test_csv_day_bars_before_the_execution_date_are_adjusted(
        sandbox: SandboxFactory, real_dir: Path) -> None:
    """AAPL 7-for-1 on Monday 2014-06-09: the sessions before are scaled, the rest and
    ``adjusted=false`` are the file's values exactly."""
    server = await sandbox(data_dir=real_dir, synthetic=False)
    raw_before = await bars(server, "AAPL", "1/day", "2014-05-01", "2014-06-30")
    server.add_split("AAPL", date(2014, 6, 9), 1, 7)
    adjusted = await bars(server, "AAPL", "1/day", "2014-05-01", "2014-06-30")
    explicit = await bars(server, "AAPL", "1/day", "2014-05-01", "2014-06-30", adjusted=True)
    raw = await bars(server, "AAPL", "1/day", "2014-05-01", "2014-06-30", adjusted=False)

    rows = {int(row["t"]): row for row in read_csv(real_dir / "AAPL.day.csv")}
    assert raw == raw_before
    assert [bar["t"] for bar in raw] == [t for t in sorted(rows) if raw[0]["t"] <= t
                                         <= raw[-1]["t"]]
    assert all(bar["o"] == float(rows[bar["t"]]["o"]) and bar["v"] == float(rows[bar["t"]]["v"])
               for bar in raw)
    assert explicit == adjusted
    split_day = date(2014, 6, 9)
    before = [bar for bar in raw if session_date("AAPL", bar["t"]) < split_day]
    after = [bar for bar in raw if session_date("AAPL", bar["t"]) >= split_day]
    assert before
    assert after
    assert adjusted == [scaled(bar, 1 / 7, 7.0) for bar in before] + after
    assert adjusted[len(before) - 1]["c"] == pytest.approx(raw[len(before) - 1]["c"] / 7)


async def test_csv_coarser_bars_are_aggregated_from_adjusted_rows(
        sandbox: SandboxFactory, real_dir: Path) -> None:
    server = await sandbox(data_dir=real_dir, synthetic=False)
    server.add_split("AAPL", date(2014, 6, 9), 1, 7)
    days = await bars(server, "AAPL", "1/day", "2014-05-25", "2014-06-14")
    weeks = await bars(server, "AAPL", "1/week", "2014-05-25", "2014-06-14")
    raw_weeks = await bars(server, "AAPL", "1/week", "2014-05-25", "2014-06-14",
                           adjusted=False)
    assert len(weeks) == len(raw_weeks) == 3

    def week_of(bar: Json) -> date:
        day = session_date("AAPL", bar["t"])
        return day - timedelta(days=day.isoweekday() % 7)

    for week, raw_week in zip(weeks, raw_weeks, strict=True):
        members = [bar for bar in days if week_of(bar) == session_date("AAPL", week["t"])]
        assert week["o"] == members[0]["o"]
        assert week["c"] == members[-1]["c"]
        assert week["h"] == max(bar["h"] for bar in members)
        assert week["l"] == min(bar["l"] for bar in members)
        assert week["v"] == sum(bar["v"] for bar in members)
        assert week["t"] == raw_week["t"]
    assert weeks[0]["o"] == raw_weeks[0]["o"] / 7  # the weeks before the split are scaled
    assert weeks[2] == raw_weeks[2]  # the split's own week starts after it: as it is


async def test_a_correction_is_adjusted_like_any_row(sandbox: SandboxFactory,
                                                      real_dir: Path) -> None:
    server = await sandbox(data_dir=real_dir, synthetic=False)
    server.add_split("AAPL", date(2014, 6, 9), 1, 7)
    friday = (await bars(server, "AAPL", "1/day", "2014-06-06", "2014-06-06", adjusted=False))[0]
    server.override_bar("AAPL", "day", friday["t"], c=700.0, v=1000.0)
    adjusted = (await bars(server, "AAPL", "1/day", "2014-06-06", "2014-06-06"))[0]
    raw = (await bars(server, "AAPL", "1/day", "2014-06-06", "2014-06-06", adjusted=False))[0]
    assert (raw["c"], raw["v"]) == (700.0, 1000.0)
    assert (adjusted["c"], adjusted["v"]) == (700.0 * (1 / 7), 1000.0 * 7.0)


async def test_synthetic_bars_are_adjusted_and_their_cache_follows_the_split_list(
        sandbox: SandboxFactory) -> None:
    """A synthetic ticker served before its split was added (cached) is adjusted after."""
    server = await sandbox()
    first = await bars(server, "SYNT", "1/day", "2020-08-24", "2020-09-04")
    cached_minutes = await bars(server, "SYNT", "5/minute", "2020-08-28", "2020-08-31")
    server.add_split("SYNT", date(2020, 8, 31), 1, 4)
    days = await bars(server, "SYNT", "1/day", "2020-08-24", "2020-09-04")
    raw_days = await bars(server, "SYNT", "1/day", "2020-08-24", "2020-09-04", adjusted=False)
    assert raw_days == first
    split_day = date(2020, 8, 31)
    before = [bar for bar in raw_days if session_date("SYNT", bar["t"]) < split_day]
    after = [bar for bar in raw_days if session_date("SYNT", bar["t"]) >= split_day]
    assert len(before) == 5
    assert len(after) == 5
    assert days == [scaled(bar, 1 / 4, 4.0) for bar in before] + after
    assert all(bar["n"] == raw["n"] for bar, raw in zip(days, raw_days, strict=True))

    minutes = await bars(server, "SYNT", "5/minute", "2020-08-28", "2020-08-31")
    raw_minutes = await bars(server, "SYNT", "5/minute", "2020-08-28", "2020-08-31",
                             adjusted=False)
    assert raw_minutes == cached_minutes
    boundary = int(session_start("SYNT", split_day).timestamp() * 1000)
    assert minutes == [scaled(bar, 1 / 4, 4.0) if bar["t"] < boundary else bar
                       for bar in raw_minutes]
    assert any(bar["t"] >= boundary for bar in minutes)

    server.add_split("SYNT", date(2020, 8, 27), 2, 3)  # a second split: both apply before it
    twice = await bars(server, "SYNT", "1/day", "2020-08-24", "2020-09-04")
    factor = 2 / 3 * (1 / 4 * 1.0)
    volume = 3 / 2 * (4 / 1 * 1.0)
    assert twice == ([scaled(bar, factor, volume) for bar in before[:3]]
                     + [scaled(bar, 1 / 4, 4.0) for bar in before[3:]] + after)


async def test_client_fetches_adjusted_or_raw_bars_as_configured(
        sandbox: SandboxFactory, sleep: RecordingSleep) -> None:
    server = await sandbox()
    server.add_split("SYNT", date(2020, 8, 31), 1, 4)
    start, end = session_start("SYNT", date(2020, 8, 27)), session_start("SYNT", date(2020, 9, 2))
    async with PolygonClient(KEY, server.base_url, sleep=sleep) as client:
        adjusted = await client.fetch_range("SYNT", DAY, start, end)
    async with PolygonClient(KEY, server.base_url, sleep=sleep, adjusted=False) as client:
        raw = await client.fetch_range("SYNT", DAY, start, end)
    assert [bar.t for bar in adjusted] == [bar.t for bar in raw]
    assert len(raw) == 4
    for got, plain in zip(adjusted, raw, strict=True):
        factor = 0.25 if session_date("SYNT", got.t) < date(2020, 8, 31) else 1.0
        assert (got.open, got.close, got.vwap) == (plain.open * factor, plain.close * factor,
                                                   plain.vwap * factor)  # type: ignore[operator]
        assert got.volume == plain.volume / factor  # type: ignore[operator]
        assert got.trades == plain.trades


async def test_grouped_daily_honours_adjusted(sandbox: SandboxFactory, real_dir: Path) -> None:
    server = await sandbox(data_dir=real_dir, synthetic=False)
    raw_before = (await get(server, f"{GROUPED}2014-06-06")).json()
    server.add_split("AAPL", date(2014, 6, 9), 1, 7)
    adjusted = (await get(server, f"{GROUPED}2014-06-06")).json()
    raw = (await get(server, f"{GROUPED}2014-06-06", adjusted="false")).json()
    after = (await get(server, f"{GROUPED}2014-06-09")).json()
    raw_after = (await get(server, f"{GROUPED}2014-06-09", adjusted="false")).json()

    assert (adjusted["adjusted"], raw["adjusted"]) == (True, False)
    assert raw["results"] == raw_before["results"]
    by_ticker = {bar["T"]: bar for bar in adjusted["results"]}
    raw_by_ticker = {bar["T"]: bar for bar in raw["results"]}
    assert set(by_ticker) == {"AAPL", "SPY"}
    assert by_ticker["SPY"] == raw_by_ticker["SPY"]
    assert by_ticker["AAPL"] == scaled(raw_by_ticker["AAPL"], 1 / 7, 7.0)
    assert by_ticker["AAPL"]["t"] == int(datetime(2014, 6, 6, 16, tzinfo=NEW_YORK)
                                         .timestamp() * 1000)
    assert after["results"] == raw_after["results"]
    assert (await get(server, f"{GROUPED}2014-06-06", adjusted="maybe")).status_code == 400


# --------------------------------------------------------------------------------------
# PolygonClient.fetch_splits through the sandbox
# --------------------------------------------------------------------------------------


async def test_fetch_splits_pages_over_the_sandbox_and_sorts(
        sandbox: SandboxFactory, sleep: RecordingSleep) -> None:
    server = await sandbox(api_key=KEY)
    days = [date(2010 + year, 3, 1) for year in (4, 0, 2, 1, 3)]
    for day in days:
        server.add_split("AAPL", day, 1, 2)
    server.add_split("MSFT", date(2011, 6, 1), 1, 3)
    async with PolygonClient(KEY, server.base_url, sleep=sleep, page_limit=2) as client:
        found = await client.fetch_splits("AAPL")
    assert found == [Split(day, 1.0, 2.0) for day in sorted(days)]
    assert [record.status for record in server.requests] == [200, 200, 200]
    first, *rest = server.requests
    assert first.params == {"ticker": "AAPL", "limit": "2", "order": "asc",
                            "sort": "execution_date"}
    assert all(list(record.params) == ["cursor"] for record in rest)
    assert all("apiKey" not in record.params for record in server.requests)

    async with PolygonClient(KEY, server.base_url, sleep=sleep) as client:
        assert await client.fetch_splits("MSFT") == [Split(date(2011, 6, 1), 1, 3)]
        assert await client.fetch_splits("NVDA") == []
    assert server.requests[-2].params["limit"] == "1000"
    assert sleep.waits == []


async def test_fetch_splits_retries_a_sandbox_fault(sandbox: SandboxFactory,
                                                    sleep: RecordingSleep) -> None:
    server = await sandbox(FaultRule(FaultKind.SERVER_ERROR, times=1),
                           FaultRule(FaultKind.TRUNCATED_JSON, times=1),
                           FaultRule(FaultKind.NULL_RESULTS, times=1))
    server.add_split("AAPL", date(2020, 8, 31), 1, 4)
    async with PolygonClient(KEY, server.base_url, sleep=sleep) as client:
        assert await client.fetch_splits("AAPL") == [Split(date(2020, 8, 31), 1, 4)]
    assert [record.fault for record in server.requests] == ["500", "truncated",
                                                            "null_results", None]
    assert sleep.waits == [1.0, 2.0, 4.0]


async def test_fetch_splits_with_a_rejected_key_is_an_authentication_error(
        sandbox: SandboxFactory, sleep: RecordingSleep) -> None:
    server = await sandbox(api_key="another key")
    async with PolygonClient(KEY, server.base_url, sleep=sleep) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.fetch_splits("AAPL")
    assert KEY not in str(caught.value)
    assert len(server.requests) == 1


# --------------------------------------------------------------------------------------
# PolygonClient.fetch_splits against canned answers
# --------------------------------------------------------------------------------------


@respx.mock
async def test_fetch_splits_asks_once_with_header_auth_and_reads_polygons_answer(
        sleep: RecordingSleep) -> None:
    route = respx.get(f"{BASE_URL}{SPLITS}").mock(return_value=splits_body(
        split_json("2020-08-31", 1, 4, cik="0000320193"), split_json("2014-06-09", 1, 7),
        split_json("2005-02-28", 1.0, 2.0), split_json("2014-06-09", 1, 7)))
    async with PolygonClient(KEY, BASE_URL, sleep=sleep) as client:
        found = await client.fetch_splits("AAPL")
    assert found == [Split(date(2005, 2, 28), 1, 2), Split(date(2014, 6, 9), 1, 7),
                     Split(date(2020, 8, 31), 1, 4)]
    request = route.calls.last.request
    assert dict(request.url.params) == {"ticker": "AAPL", "limit": "1000", "order": "asc",
                                        "sort": "execution_date"}
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in str(request.url)


@respx.mock
async def test_fetch_splits_follows_next_url_on_its_own_host_without_the_key(
        sleep: RecordingSleep) -> None:
    respx.get(f"{BASE_URL}{SPLITS}", params={"ticker": "AAPL"}).mock(return_value=splits_body(
        split_json("2014-06-09", 1, 7),
        next_url=f"https://evil.example.com{SPLITS}?cursor=abc&apiKey={KEY}"))
    second = respx.get(f"{BASE_URL}{SPLITS}", params={"cursor": "abc"}).mock(
        return_value=splits_body(split_json("2020-08-31")))
    evil = respx.route(host="evil.example.com").mock(return_value=splits_body())
    async with PolygonClient(KEY, BASE_URL, sleep=sleep) as client:
        found = await client.fetch_splits("AAPL")
    assert found == [Split(date(2014, 6, 9), 1, 7), Split(date(2020, 8, 31), 1, 4)]
    assert not evil.called
    assert second.calls.last.request.url.query == b"cursor=abc"
    assert all(KEY not in str(call.request.url) for call in respx.calls)


@pytest.mark.parametrize(("next_url", "reason"), [
    (f"{BASE_URL}{SPLITS}?ticker=AAPL&limit=1000&order=asc&sort=execution_date",
     "repeats a page"),
    (f"{BASE_URL}{SPLITS}?sort=execution_date&order=asc&ticker=AAPL&limit=1000",
     "repeats a page"),
    (f"{BASE_URL}{SPLITS}?ticker=MSFT&cursor=x", "leaves the ticker"),
    (f"{BASE_URL}/v3/reference/dividends?cursor=x", "not a /v3/reference/splits URL"),
    (f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2020-01-01/2020-12-31", "not a /v3"),
])
@respx.mock
async def test_unsafe_next_urls_are_pagination_errors(sleep: RecordingSleep, next_url: str,
                                                      reason: str) -> None:
    respx.get(f"{BASE_URL}{SPLITS}").mock(return_value=splits_body(
        split_json("2014-06-09", 1, 7), next_url=next_url))
    async with PolygonClient(KEY, BASE_URL, sleep=sleep) as client:
        with pytest.raises(PaginationError, match=reason):
            await client.fetch_splits("AAPL")
    assert len(respx.calls) == 1


@respx.mock
async def test_a_cursor_that_comes_back_is_a_loop_and_the_page_cap_holds(
        sleep: RecordingSleep) -> None:
    cursors = iter(["a", "b", "a"])

    def answer(request: httpx.Request) -> httpx.Response:
        return splits_body(split_json("2014-06-09", 1, 7),
                           next_url=f"{BASE_URL}{SPLITS}?cursor={next(cursors)}")

    respx.get(f"{BASE_URL}{SPLITS}").mock(side_effect=answer)
    async with PolygonClient(KEY, BASE_URL, sleep=sleep) as client:
        with pytest.raises(PaginationError, match="repeats a page"):
            await client.fetch_splits("AAPL")
    assert len(respx.calls) == 3

    respx.get(f"{BASE_URL}{SPLITS}").mock(side_effect=lambda request: splits_body(
        split_json("2014-06-09", 1, 7), next_url=f"{BASE_URL}{SPLITS}?cursor={len(respx.calls)}"))
    async with PolygonClient(KEY, BASE_URL, sleep=sleep, max_pages=4) as client:
        with pytest.raises(PaginationError, match="page cap of 4"):
            await client.fetch_splits("AAPL")


@pytest.mark.parametrize(("body", "reason"), [
    ('{"status":"OK","results":{"execution_date":"2020-08-31"}}', "results"),
    ('{"status":"OK","results":["2020-08-31"]}', "results.0: not an object"),
    ('{"results":[]}', "missing 'status'"),
    ('[{"execution_date":"2020-08-31","split_from":1,"split_to":4}]', "JSON object"),
    ('{"status":"OK","results":[{"split_from":1,"split_to":4}]}', "execution_date"),
    ('{"status":"OK","results":[{"execution_date":"2020/08/31","split_from":1,"split_to":4}]}',
     "not an ISO date"),
    ('{"status":"OK","results":[{"execution_date":"2020-02-30","split_from":1,"split_to":4}]}',
     "not a date"),
    ('{"status":"OK","results":[{"execution_date":"2020-08-31","split_from":0,"split_to":4}]}',
     "split_from: not a positive number"),
    ('{"status":"OK","results":[{"execution_date":"2020-08-31","split_from":1,"split_to":-4}]}',
     "split_to: not a positive number"),
    ('{"status":"OK","results":[{"execution_date":"2020-08-31","split_from":1,"split_to":"4"}]}',
     "split_to: not a number"),
    ('{"status":"OK","results":[{"execution_date":"2020-08-31","split_from":1}]}',
     "split_to: not a number"),
    ('{"status":"OK","results":[{"execution_date":"2020-08-31","split_from":1,"split_to":NaN}]}',
     "split_to: not a positive number"),
    ('{"status":"OK","results":[{"execution_date":"2020-08-31","split_from":true,'
     '"split_to":4}]}', "split_from: not a number"),
    ('{"status":"OK","results":[{"execution_date":"2020-08-31","split_from":1,"split_to":4,'
     '"ticker":"MSFT"}]}', "'MSFT', not the 'AAPL' asked for"),
    ('{"status":"OK","next_url":42}', "next_url"),
    ('{"status":"ERROR","error":"Internal processing error"}', "status ERROR"),
    ('{"status":"OK","results":[{"execution_', "not valid JSON"),
])
@respx.mock
async def test_a_malformed_splits_body_is_retried_then_an_error_never_an_empty_list(
        sleep: RecordingSleep, body: str, reason: str) -> None:
    route = respx.get(f"{BASE_URL}{SPLITS}").mock(return_value=httpx.Response(200, text=body))
    async with PolygonClient(KEY, BASE_URL, sleep=sleep, max_attempts=3) as client:
        with pytest.raises(MalformedResponseError, match=reason) as caught:
            await client.fetch_splits("AAPL")
    assert route.call_count == 3
    assert sleep.waits == [1.0, 2.0]
    assert "[AAPL splits]" in str(caught.value)


@respx.mock
async def test_null_results_are_doubted_but_missing_results_mean_no_splits(
        sleep: RecordingSleep) -> None:
    route = respx.get(f"{BASE_URL}{SPLITS}").mock(side_effect=[
        httpx.Response(200, json={"status": "OK", "results": None}),
        httpx.Response(200, json={"status": "OK", "results": None}),
    ])
    async with PolygonClient(KEY, BASE_URL, sleep=sleep, max_attempts=2) as client:
        with pytest.raises(SuspectEmptyError, match="results: null"):
            await client.fetch_splits("AAPL")
        assert route.call_count == 2
        route.side_effect = [httpx.Response(200, json={"status": "OK", "results": None}),
                             splits_body(split_json("2020-08-31"))]
        assert await client.fetch_splits("AAPL") == [Split(date(2020, 8, 31), 1, 4)]
        route.side_effect = [splits_body(), splits_body(count=0, results=[]),
                             httpx.Response(200, json={"status": "DELAYED", "results": []})]
        for _ in range(3):
            assert await client.fetch_splits("AAPL") == []


@respx.mock
async def test_fetch_splits_retries_429_and_500_then_succeeds(sleep: RecordingSleep) -> None:
    route = respx.get(f"{BASE_URL}{SPLITS}").mock(side_effect=[
        httpx.Response(429, json={"status": "ERROR", "error": "slow down"},
                       headers={"Retry-After": "7"}),
        httpx.Response(500, json={"status": "ERROR", "error": "Internal server error"}),
        httpx.Response(502, text="<html>502 Bad Gateway</html>"),
        splits_body(split_json("2020-08-31")),
    ])
    async with PolygonClient(KEY, BASE_URL, sleep=sleep) as client:
        with capture_logs() as logs:
            assert await client.fetch_splits("AAPL") == [Split(date(2020, 8, 31), 1, 4)]
        assert (client.total_requests, client.rate_limited_count) == (4, 1)
    assert route.call_count == 4
    assert sleep.waits == [7.0, 2.0, 4.0]
    events = [entry["event"] for entry in logs]
    assert events.count("polygon.rate_limited") == 1
    assert events.count("polygon.retrying") == 2
    assert all(entry.get("ticker") == "AAPL splits" for entry in logs
               if entry["event"] != "polygon.splits_fetched")


@respx.mock
async def test_fetch_splits_gives_up_after_its_attempts(sleep: RecordingSleep) -> None:
    respx.get(f"{BASE_URL}{SPLITS}").mock(return_value=httpx.Response(
        429, json={"status": "ERROR", "error": "slow down"}))
    async with PolygonClient(KEY, BASE_URL, sleep=sleep, max_attempts=3) as client:
        with pytest.raises(RateLimitedError):
            await client.fetch_splits("AAPL")
    assert len(sleep.waits) == 2


@respx.mock
async def test_splits_outage_opens_the_shared_circuit(sleep: RecordingSleep) -> None:
    route = respx.get(f"{BASE_URL}{SPLITS}").mock(return_value=httpx.Response(
        500, json={"status": "ERROR", "error": "down"}))
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=60.0)
    async with PolygonClient(KEY, BASE_URL, sleep=sleep, circuit_breaker=breaker) as client:
        with pytest.raises(CircuitOpenError):
            await client.fetch_splits("AAPL")
    assert route.call_count == 2
    assert breaker.state == "open"


@respx.mock
async def test_the_key_never_reaches_errors_or_logs(sleep: RecordingSleep) -> None:
    respx.get(f"{BASE_URL}{SPLITS}").mock(side_effect=[
        httpx.Response(500, json={"status": "ERROR", "error": f"bad key {KEY}"}),
        httpx.Response(200, text=json.dumps({"status": "OK", "results": [
            {"execution_date": KEY, "split_from": 1, "split_to": 4}]})),
        httpx.Response(200, json={"status": "OK", "results": [
            {"execution_date": "2020-08-31", "split_from": 1, "split_to": 4,
             "ticker": KEY}]}),
    ])
    async with PolygonClient(KEY, BASE_URL, sleep=sleep, max_attempts=3) as client:
        with capture_logs() as logs, pytest.raises(MalformedResponseError) as caught:
            await client.fetch_splits("AAPL")
    assert "***" in str(caught.value)
    assert KEY not in str(caught.value)
    assert logs
    assert all(KEY not in str(entry) for entry in logs)


@pytest.mark.parametrize("ticker", ["A/B", "../v2", "AAPL?apiKey=x", "", "AA PL"])
@respx.mock
async def test_an_unsafe_ticker_is_refused_before_any_request(
        sleep: RecordingSleep, ticker: str) -> None:
    async with PolygonClient(KEY, BASE_URL, sleep=sleep) as client:
        with pytest.raises(ValueError, match="invalid ticker"):
            await client.fetch_splits(ticker)
    assert not respx.calls
