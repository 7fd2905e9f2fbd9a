"""PolygonClient against respx: auth, pagination, validation, error mapping, range formats."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from polygon_backfill.clients import (
    AdaptiveRateLimiter,
    Page,
    PolygonClient,
    RateLimit,
    ServerError,
)
from polygon_backfill.clients import polygon_client as client_module
from polygon_backfill.clients.rate_limiter import Slot
from polygon_backfill.errors import (
    AuthenticationError,
    MalformedResponseError,
    NotAuthorizedError,
    PaginationError,
    PolygonClientError,
    SuspectEmptyError,
    TransientPolygonError,
)
from polygon_backfill.models import Bar, Timeframe, TimeRange, ms_to_datetime
from tests.support import FakeClock, RecordingSleep, SandboxFactory

BASE_URL = "https://api.test.polygon"
KEY = "sk-SECRET-0123456789"
MINUTE = Timeframe.parse("1m")
FIVE = Timeframe.parse("5m")
DAY = Timeframe.parse("1d")
T0 = 1690790400000  # 2023-07-31 08:00 UTC
START = datetime(2023, 7, 31, 8, tzinfo=UTC)
END = START + timedelta(hours=1)
LAST = T0 + 3_599_999
MIN_PATH = "/v2/aggs/ticker/AAPL/range/1/minute"


def bar(t: int, price: float = 100.0, **extra: Any) -> dict[str, Any]:
    return {"o": price, "h": price + 1, "l": price - 1, "c": price, "v": 500.0, "vw": price,
            "n": 7, "t": t, **extra}


def ok(*bars: dict[str, Any], next_url: str | None = None, **top: Any) -> httpx.Response:
    body: dict[str, Any] = {"ticker": "AAPL", "status": "OK", "queryCount": len(bars),
                            "resultsCount": len(bars), "adjusted": True,
                            "results": list(bars), "request_id": "r1", **top}
    if next_url is not None:
        body["next_url"] = next_url
    return httpx.Response(200, json=body)


def raw_page(status: str, bars: list[str]) -> str:
    """A body written by hand, for numbers json.dumps would not write as Polygon does."""
    return f'{{"status":"{status}","results":[{",".join(bars)}]}}'


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
async def client(sleep: RecordingSleep) -> AsyncIterator[PolygonClient]:
    async with PolygonClient(KEY, BASE_URL, sleep=sleep) as polygon:
        yield polygon


async def pages_of(client: PolygonClient, ticker: str, timeframe: Timeframe,
                   start: datetime, end: datetime) -> list[Page]:
    return [page async for page in client.iter_pages(ticker, timeframe, start, end)]


# --- requests: auth, formats, tickers -------------------------------------------------------


@respx.mock
async def test_auth_is_a_bearer_header_never_a_query_parameter(client: PolygonClient) -> None:
    """The key travels only in Authorization: Bearer; the URL carries adjusted/sort/limit."""
    route = respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(bar(T0)))
    await client.fetch_range("AAPL", MINUTE, START, END)
    request = route.calls.last.request
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert KEY not in str(request.url)
    assert "apikey" not in str(request.url).lower()
    assert dict(request.url.params) == {"adjusted": "true", "sort": "asc", "limit": "50000"}


async def test_one_pooled_client_with_a_timeout() -> None:
    """Every request goes through one AsyncClient with the configured timeout."""
    async with PolygonClient(KEY, BASE_URL, timeout_s=12.5) as polygon:
        assert polygon._http.timeout == httpx.Timeout(12.5)
        assert str(polygon._http.base_url).startswith(BASE_URL)


@respx.mock
async def test_unadjusted_is_asked_for_explicitly(sleep: RecordingSleep) -> None:
    """adjusted=False is sent as adjusted=false, with the configured page limit."""
    route = respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok())
    async with PolygonClient(KEY, BASE_URL, adjusted=False, page_limit=1234,
                             sleep=sleep) as polygon:
        await polygon.fetch_range("AAPL", MINUTE, START, END)
    params = route.calls.last.request.url.params
    assert (params["adjusted"], params["limit"]) == ("false", "1234")


@pytest.mark.parametrize(
    ("ticker", "timeframe", "start", "end", "path"),
    [
        # Intraday: Unix ms, to = end - 1 ms.
        ("AAPL", FIVE, datetime(2005, 4, 3, 6, tzinfo=UTC), datetime(2005, 4, 3, 8, tzinfo=UTC),
         "/v2/aggs/ticker/AAPL/range/5/minute/1112508000000/1112515199999"),
        # Daily across the 2005 DST change: NY midnight is 05:00 UTC (EST), then 04:00 (EDT).
        ("AAPL", DAY, datetime(2005, 4, 1, 5, tzinfo=UTC), datetime(2005, 4, 5, 4, tzinfo=UTC),
         "/v2/aggs/ticker/AAPL/range/1/day/2005-04-01/2005-04-04"),
        # 02:00 UTC on 2 April is still 1 April in New York.
        ("AAPL", DAY, datetime(2005, 4, 2, 2, tzinfo=UTC), datetime(2005, 4, 4, 4, tzinfo=UTC),
         "/v2/aggs/ticker/AAPL/range/1/day/2005-04-01/2005-04-03"),
        # Crypto days are UTC days; the prefix goes into the path as it is.
        ("X:BTCUSD", DAY, datetime(2023, 1, 1, tzinfo=UTC), datetime(2023, 1, 3, tzinfo=UTC),
         "/v2/aggs/ticker/X:BTCUSD/range/1/day/2023-01-01/2023-01-02"),
        ("BRK.B", Timeframe.parse("1w"), datetime(2023, 1, 2, 5, tzinfo=UTC),
         datetime(2023, 1, 9, 5, tzinfo=UTC),
         "/v2/aggs/ticker/BRK.B/range/1/week/2023-01-02/2023-01-08"),
    ],
)
@respx.mock
async def test_from_to_formats(client: PolygonClient, ticker: str, timeframe: Timeframe,
                               start: datetime, end: datetime, path: str) -> None:
    """Intraday ranges go out as ms (to = end - 1 ms), daily ones as home-zone dates."""
    route = respx.get(url__startswith=BASE_URL).mock(return_value=ok())
    await client.fetch_range(ticker, timeframe, start, end)
    assert route.calls.last.request.url.raw_path.decode().split("?")[0] == path


@pytest.mark.parametrize("ticker", ["AAPL/../v1", "AA PL", "AAPL?x=1", "", "A..B"])
@respx.mock
async def test_unsafe_ticker_is_refused_before_any_request(client: PolygonClient,
                                                           ticker: str) -> None:
    """A ticker that could change the URL is a ValueError and no request is made."""
    with pytest.raises(ValueError, match="invalid ticker"):
        await client.fetch_range(ticker, MINUTE, START, END)
    assert client.total_requests == 0


async def test_injected_transport_is_used(sleep: RecordingSleep) -> None:
    """transport= replaces the network (httpx.MockTransport works without respx)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok(bar(T0))

    async with PolygonClient(KEY, BASE_URL, transport=httpx.MockTransport(handler),
                             sleep=sleep) as polygon:
        assert len(await polygon.fetch_range("AAPL", MINUTE, START, END)) == 1
    assert [request.url.path for request in seen] == [f"{MIN_PATH}/{T0}/{LAST}"]


async def test_naive_datetimes_are_refused(client: PolygonClient) -> None:
    """Ranges must be timezone-aware; a naive datetime is a ValueError."""
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.fetch_range("AAPL", MINUTE, START.replace(tzinfo=None), END)


async def test_empty_range_makes_no_request(client: PolygonClient) -> None:
    """start == end yields no page and no request."""
    assert await pages_of(client, "AAPL", MINUTE, START, START) == []
    assert client.total_requests == 0


# --- secrets ---------------------------------------------------------------------------------


@respx.mock
async def test_key_never_in_logs_or_errors(client: PolygonClient) -> None:
    """Neither log events nor the final error contain the API key, even if echoed back."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0, h=1.0), next_url=f"https://api.polygon.io{MIN_PATH}/{T0 + 1}/{LAST}"
                                 f"?cursor=c2&apiKey={KEY}"))
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 1}/{LAST}").mock(side_effect=[
        httpx.Response(429, json={"status": "ERROR", "error": f"slow down {KEY}"}),
        httpx.Response(502, text=f"bad gateway for apiKey={KEY}"),
        httpx.Response(401, json={"status": "ERROR", "error": f"Unknown API Key {KEY}"}),
    ])
    with capture_logs() as events, pytest.raises(AuthenticationError) as caught:
        await client.fetch_range("AAPL", MINUTE, START, END)
    assert {event["event"] for event in events} >= {
        "polygon.rate_limited", "polygon.retrying", "polygon.bars_rejected"}
    assert all(KEY not in str(call.request.url) for call in respx.calls)
    assert all(KEY not in repr(event) for event in events)
    assert KEY not in str(caught.value)
    assert "Unknown API Key ***" in str(caught.value)


# --- pagination --------------------------------------------------------------------------------


@respx.mock
async def test_next_url_on_a_foreign_host_is_sent_to_base_url(client: PolygonClient) -> None:
    """A next_url naming another host keeps only its path and query; auth goes to base_url."""
    evil = respx.route(host="evil.example.com").mock(return_value=ok())
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0), next_url=f"https://evil.example.com:8443{MIN_PATH}/{T0 + 60_000}/{LAST}"
                          f"?cursor=abc&apiKey=stolen"))
    second = respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 60_000}/{LAST}").mock(
        return_value=ok(bar(T0 + 60_000)))
    bars = await client.fetch_range("AAPL", MINUTE, START, END)
    assert [b.t for b in bars] == [T0, T0 + 60_000]
    assert not evil.called
    request = second.calls.last.request
    assert request.url.host == "api.test.polygon"
    assert request.url.query == b"cursor=abc&adjusted=true&sort=asc&limit=50000"
    assert request.headers["Authorization"] == f"Bearer {KEY}"


@respx.mock
async def test_next_url_naming_another_series_is_refused(client: PolygonClient) -> None:
    """A next_url for another ticker (or timespan) is a PaginationError, never followed."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0), next_url=f"https://api.polygon.io/v2/aggs/ticker/MSFT/range/1/minute/"
                          f"{T0 + 60_000}/{LAST}?cursor=abc"))
    with pytest.raises(PaginationError, match="leaves the series"):
        await client.fetch_range("AAPL", MINUTE, START, END)


@respx.mock
async def test_a_stray_bar_on_a_full_page_does_not_end_the_range(sleep: RecordingSleep) -> None:
    """Full page, no next_url, one bar past the range: the continuation starts after the
    last bar kept, so the rest of the range is still asked for."""
    client = PolygonClient(KEY, BASE_URL, sleep=sleep, page_limit=3)
    first = respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0), bar(T0 + 60_000), bar(LAST + 600_000)))
    rest = respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 60_001}/{LAST}").mock(return_value=ok(
        bar(T0 + 120_000)))
    pages = [page async for page in client.iter_pages("AAPL", MINUTE, START, END)]
    await client.aclose()
    assert (first.call_count, rest.call_count) == (1, 1)
    assert [b.t for page in pages for b in page.bars] == [T0, T0 + 60_000, T0 + 120_000]


@respx.mock
async def test_an_invalid_bar_in_range_is_not_covered(client: PolygonClient) -> None:
    """A bar dropped as invalid (high < low) ends the page's coverage at its time, so the
    next run asks for it again; the sound bars before and after are kept."""
    bad = {"o": 10, "h": 9, "l": 11, "c": 10, "v": 1, "t": T0 + 60_000}
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0), bad, bar(T0 + 120_000)))
    [page] = [page async for page in client.iter_pages("AAPL", MINUTE, START, END)]
    assert [b.t for b in page.bars] == [T0, T0 + 120_000]
    assert page.covered == TimeRange(START, ms_to_datetime(T0 + 60_000))


@respx.mock
async def test_null_results_after_429s_are_still_doubted(sleep: RecordingSleep) -> None:
    """Four 429s then a null answer on a trading day: the null is not believed; with the
    attempts spent the range fails and nothing is recorded as covered."""
    client = PolygonClient(KEY, BASE_URL, sleep=sleep)
    respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2023-01-03/2023-01-04").mock(
        side_effect=[httpx.Response(429, json={"status": "ERROR", "error": "slow down"})] * 4
        + [httpx.Response(200, json={"status": "OK", "results": None})])
    with pytest.raises(SuspectEmptyError):
        await client.fetch_range("AAPL", Timeframe.parse("1d"),
                                 datetime(2023, 1, 3, 5, tzinfo=UTC),
                                 datetime(2023, 1, 5, 5, tzinfo=UTC))
    await client.aclose()


@respx.mock
async def test_pages_cover_contiguous_spans(client: PolygonClient) -> None:
    """Each page covers [its from, next page's from); the last one runs to the range end."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0), next_url=f"https://api.polygon.io{MIN_PATH}/{T0 + 300_000}/{LAST}?cursor=c2"))
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 300_000}/{LAST}").mock(
        return_value=ok(bar(T0 + 300_000)))
    pages = await pages_of(client, "AAPL", MINUTE, START, END)
    middle = START + timedelta(minutes=5)
    assert [page.covered for page in pages] == [TimeRange(START, middle), TimeRange(middle, END)]
    assert [[b.t for b in page.bars] for page in pages] == [[T0], [T0 + 300_000]]


@respx.mock
async def test_repeated_next_url_is_a_pagination_error(client: PolygonClient) -> None:
    """A next_url that leads back to a page already followed raises PaginationError: every
    page must start after the one before, so no cycle can be followed."""
    loop = f"https://api.polygon.io{MIN_PATH}/{T0 + 60_000}/{LAST}?cursor=same"
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(bar(T0), next_url=loop))
    repeat = respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 60_000}/{LAST}").mock(
        return_value=ok(bar(T0 + 60_000), next_url=loop))
    with pytest.raises(PaginationError, match="does not advance"):
        await client.fetch_range("AAPL", MINUTE, START, END)
    assert repeat.call_count == 1


@respx.mock
async def test_a_cursor_repeated_with_a_new_from_is_followed(client: PolygonClient) -> None:
    """Polygon's cursor encodes only the options and repeats; the moving from segment counts."""
    cursor = "bGltaXQ9MTAmc29ydD1hc2M"  # base64 of limit=10&sort=asc, as in the real fixture
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0), next_url=f"https://api.polygon.io{MIN_PATH}/{T0 + 60_000}/{LAST}?cursor={cursor}"))
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 60_000}/{LAST}").mock(return_value=ok(
        bar(T0 + 60_000),
        next_url=f"https://api.polygon.io{MIN_PATH}/{T0 + 120_000}/{LAST}?cursor={cursor}"))
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 120_000}/{LAST}").mock(return_value=ok(
        bar(T0 + 120_000)))
    bars = await client.fetch_range("AAPL", MINUTE, START, END)
    assert [b.t for b in bars] == [T0, T0 + 60_000, T0 + 120_000]


@respx.mock
async def test_page_cap_is_a_pagination_error(sleep: RecordingSleep) -> None:
    """A next_url chain longer than max_pages raises PaginationError after max_pages pages."""
    counter = iter(range(1, 100))

    def endless(request: httpx.Request) -> httpx.Response:
        n = next(counter)
        return ok(bar(T0 + n), next_url=f"https://api.polygon.io{MIN_PATH}/{T0 + n + 1}/{LAST}"
                                        f"?cursor=c{n}")

    route = respx.get(url__startswith=BASE_URL).mock(side_effect=endless)
    async with PolygonClient(KEY, BASE_URL, max_pages=3, sleep=sleep) as polygon:
        with pytest.raises(PaginationError, match="page cap of 3"):
            await polygon.fetch_range("AAPL", MINUTE, START, END)
    assert route.call_count == 3


@respx.mock
async def test_next_url_outside_aggregates_is_refused(client: PolygonClient) -> None:
    """A next_url that is not an aggregates URL is a PaginationError, not a request."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=ok(bar(T0), next_url="https://evil.example.com/steal?x=1"))
    with pytest.raises(PaginationError):
        await client.fetch_range("AAPL", MINUTE, START, END)
    assert client.total_requests == 1


@respx.mock
async def test_full_page_without_next_url_self_paginates(sleep: RecordingSleep) -> None:
    """resultsCount == limit with no next_url continues from last t + 1 ms (pitfall 1)."""
    first = respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=ok(bar(T0), bar(T0 + 60_000)))
    rest = respx.get(f"{BASE_URL}{MIN_PATH}/{T0 + 60_001}/{LAST}").mock(
        return_value=ok(bar(T0 + 120_000)))
    async with PolygonClient(KEY, BASE_URL, page_limit=2, sleep=sleep) as polygon:
        pages = await pages_of(polygon, "AAPL", MINUTE, START, END)
    assert first.call_count == rest.call_count == 1
    assert rest.calls.last.request.url.params["limit"] == "2"
    assert [b.t for page in pages for b in page.bars] == [T0, T0 + 60_000, T0 + 120_000]
    split = START + timedelta(minutes=1, milliseconds=1)
    assert [page.covered for page in pages] == [TimeRange(START, split), TimeRange(split, END)]


@respx.mock
async def test_query_count_at_limit_also_self_paginates(sleep: RecordingSleep) -> None:
    """queryCount >= limit (base aggregates) without next_url is suspect too."""
    respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/5/minute/{T0}/{LAST}").mock(
        return_value=ok(bar(T0), queryCount=10, resultsCount=1))
    rest = respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/5/minute/{T0 + 1}/{LAST}").mock(
        return_value=ok())
    async with PolygonClient(KEY, BASE_URL, page_limit=10, sleep=sleep) as polygon:
        await polygon.fetch_range("AAPL", FIVE, START, END)
    assert rest.call_count == 1


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("results", ["missing", None, []])
@respx.mock
async def test_missing_or_null_results_is_an_empty_page(client: PolygonClient,
                                                         results: object) -> None:
    """No results key, results: null and [] all give one empty page covering the range."""
    body: dict[str, Any] = {"ticker": "AAPL", "status": "OK", "queryCount": 0,
                            "resultsCount": 0, "request_id": "x"}
    if results != "missing":
        body["results"] = results
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=httpx.Response(200, json=body))
    pages = await pages_of(client, "AAPL", MINUTE, START, END)
    assert pages == [Page(bars=[], covered=TimeRange(START, END), rejected=0)]
    assert client.total_requests == 1


@respx.mock
async def test_out_of_range_bars_are_dropped(client: PolygonClient) -> None:
    """Intraday bars before start or at/after end are dropped and counted as rejected."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0 - 60_000), bar(T0), bar(LAST - 59_999), bar(LAST + 1)))
    [page] = await pages_of(client, "AAPL", MINUTE, START, END)
    assert [b.t for b in page.bars] == [T0, LAST - 59_999]
    assert page.rejected == 2


@respx.mock
async def test_daily_range_compares_session_dates(client: PolygonClient) -> None:
    """A daily bar is in range by its New York session date, not by its raw t."""
    # 2005-04-01 05:00 UTC and 2005-04-04 04:00 UTC are NY midnights; 2005-04-05 is outside.
    respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2005-04-01/2005-04-04").mock(
        return_value=ok(bar(1112331600000), bar(1112587200000), bar(1112673600000)))
    [page] = await pages_of(client, "AAPL", DAY, datetime(2005, 4, 1, 5, tzinfo=UTC),
                            datetime(2005, 4, 5, 4, tzinfo=UTC))
    assert [b.t for b in page.bars] == [1112331600000, 1112587200000]
    assert page.rejected == 1


@respx.mock
async def test_invalid_bars_are_dropped_counted_and_logged_once(client: PolygonClient) -> None:
    """Unsound bars are dropped and counted, logged once with the first reason; an open
    outside [low, high] is real vendor data and kept."""
    # Raw text: NaN is not expressible with json.dumps(allow_nan=False) and must survive.
    rows = ['"o":10,"h":9,"l":11,"c":10,"v":1', '"o":12,"h":11,"l":9,"c":10,"v":1',
            '"o":10,"h":11,"l":9,"c":10,"v":-1', '"o":NaN,"h":11,"l":9,"c":10,"v":1',
            '"o":10,"h":11,"l":9,"c":10,"v":1', '"o":11.000000000001,"h":11,"l":9,"c":9,"v":1']
    body = raw_page("OK", [f'{{{row},"t":{T0 + i * 60_000}}}' for i, row in enumerate(rows)])
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=httpx.Response(200, content=body.encode()))
    with capture_logs() as events:
        [page] = await pages_of(client, "AAPL", MINUTE, START, END)
    assert [b.t for b in page.bars] == [T0 + 60_000, T0 + 240_000, T0 + 300_000]
    assert page.rejected == 3
    rejected = [event for event in events if event["event"] == "polygon.bars_rejected"]
    assert len(rejected) == 1
    assert rejected[0]["rejected"] == 3
    assert "high" in rejected[0]["reason"]


@respx.mock
async def test_bar_field_variants_are_accepted(client: PolygonClient) -> None:
    """Scientific and fractional v, float n, missing v/vw/n (indices), extra fields all parse."""
    body = raw_page("DELAYED", [
        f'{{"v":1.029145e+06,"vw":1.5,"o":1,"h":2,"l":1,"c":2,"t":{T0},"n":82132.0,"otc":true}}',
        f'{{"v":0.0153,"o":1,"h":2,"l":1,"c":2,"t":{T0 + 60_000}}}',
        f'{{"o":4500.1,"h":4501,"l":4499.5,"c":4500,"t":{T0 + 120_000}}}',
    ])
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=httpx.Response(200, content=body.encode()))
    bars = await client.fetch_range("AAPL", MINUTE, START, END)
    assert bars == [
        Bar(T0, 1.0, 2.0, 1.0, 2.0, volume=1029145.0, vwap=1.5, trades=82132),
        Bar(T0 + 60_000, 1.0, 2.0, 1.0, 2.0, volume=0.0153),
        Bar(T0 + 120_000, 4500.1, 4501.0, 4499.5, 4500.0),
    ]
    assert isinstance(bars[0].trades, int)


@respx.mock
async def test_duplicate_t_keeps_the_last(client: PolygonClient) -> None:
    """Two bars with one t: the last one wins and nothing counts as rejected."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(return_value=ok(
        bar(T0 + 60_000), bar(T0, 100.0), bar(T0, 200.0)))
    [page] = await pages_of(client, "AAPL", MINUTE, START, END)
    assert [(b.t, b.close) for b in page.bars] == [(T0, 200.0), (T0 + 60_000, 100.0)]
    assert page.rejected == 0


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b'["not", "an", "object"]',
        b'{"results": []}',
        b'{"status": "OK", "results": {"o": 1}}',
        json.dumps({"status": "OK", "results": [{"o": 1, "h": 2, "l": 1, "t": T0}]}).encode(),
        json.dumps({"status": "ERROR", "error": "Internal error, try again"}).encode(),
    ],
    ids=["html", "array", "no-status", "results-not-list", "bar-missing-c", "status-error"],
)
@respx.mock
async def test_malformed_bodies_are_retried(client: PolygonClient, sleep: RecordingSleep,
                                            body: bytes) -> None:
    """A malformed 200 (or status ERROR) is retried, then MalformedResponseError is raised."""
    route = respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=httpx.Response(200, content=body))
    with pytest.raises(MalformedResponseError) as caught:
        await client.fetch_range("AAPL", MINUTE, START, END)
    assert route.call_count == 5
    assert sleep.waits == [1, 2, 4, 8]
    assert caught.value.ticker == "AAPL"
    if b"try again" in body:
        assert caught.value.server_message == "Internal error, try again"


# --- errors and retries -----------------------------------------------------------------


@respx.mock
async def test_timeouts_are_retried_then_raised(client: PolygonClient,
                                                sleep: RecordingSleep) -> None:
    """A request that keeps timing out is tried 5 times, then a TransientPolygonError."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        side_effect=httpx.ReadTimeout("read timed out"))
    with capture_logs() as events, pytest.raises(TransientPolygonError, match="timed out"):
        await client.fetch_range("AAPL", MINUTE, START, END)
    assert client.total_requests == 5
    assert sleep.waits == [1, 2, 4, 8]
    retrying = [event for event in events if event["event"] == "polygon.retrying"]
    assert [event["attempt"] for event in retrying] == [1, 2, 3, 4]
    assert "timed out" in retrying[0]["reason"]


@respx.mock
async def test_connection_reset_then_success(client: PolygonClient,
                                             sleep: RecordingSleep) -> None:
    """A dropped connection is retried and the next answer used."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(side_effect=[
        httpx.RemoteProtocolError("peer closed connection"), ok(bar(T0))])
    assert len(await client.fetch_range("AAPL", MINUTE, START, END)) == 1
    assert sleep.waits == [1]
    assert client.api_seconds >= 0.0


@respx.mock
async def test_rate_limited_log_line(client: PolygonClient) -> None:
    """Each 429 logs polygon.rate_limited with 'Rate limited', ticker, timeframe, attempt, wait."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(side_effect=[
        httpx.Response(429, json={"status": "ERROR", "error": "slow down"}), ok()])
    with capture_logs() as events:
        await client.fetch_range("AAPL", MINUTE, START, END)
    [event] = [event for event in events if event["event"] == "polygon.rate_limited"]
    assert event["log_level"] == "warning"
    assert event["message"] == "Rate limited on AAPL 1m, attempt 1/5, waiting 1.0 s"
    assert (event["ticker"], event["timeframe"], event["attempt"], event["wait_s"]) == (
        "AAPL", "1m", 1, 1.0)


@respx.mock
async def test_retry_after_http_date_on_503(client: PolygonClient,
                                            sleep: RecordingSleep) -> None:
    """A 503 with an HTTP-date Retry-After waits until then, capped at max_wait_s."""
    when = datetime.now(UTC) + timedelta(hours=2)
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(side_effect=[
        httpx.Response(503, headers={"Retry-After": format_datetime(when, usegmt=True)}),
        ok()])
    await client.fetch_range("AAPL", MINUTE, START, END)
    assert sleep.waits == [300.0]


@respx.mock
async def test_final_server_error_is_raised_as_itself(client: PolygonClient) -> None:
    """After 5 5xx answers the last ServerError is raised, not tenacity's RetryError."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=httpx.Response(500, json={"status": "ERROR", "error": "boom"}))
    with pytest.raises(ServerError) as caught:
        await client.fetch_range("AAPL", MINUTE, START, END)
    assert caught.value.status_code == 500
    assert caught.value.server_message == "boom"


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"status": "ERROR", "error": "to before from"}, PolygonClientError),
        (401, {"status": "ERROR", "error": "Unknown API Key"}, AuthenticationError),
        (403, {"status": "NOT_AUTHORIZED", "message": "upgrade your plan"}, NotAuthorizedError),
        (404, {"status": "ERROR", "message": "not found"}, PolygonClientError),
        (200, {"status": "NOT_AUTHORIZED", "message": "upgrade your plan"}, NotAuthorizedError),
    ],
)
@respx.mock
async def test_client_errors_are_not_retried(client: PolygonClient, sleep: RecordingSleep,
                                             status: int, body: dict[str, str],
                                             error: type[Exception]) -> None:
    """4xx and NOT_AUTHORIZED fail at once with the server's text."""
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(
        return_value=httpx.Response(status, json=body))
    with pytest.raises(error) as caught:
        await client.fetch_range("AAPL", MINUTE, START, END)
    assert client.total_requests == 1
    assert sleep.waits == []
    assert (body.get("error") or body["message"]) in str(caught.value)


# --- client-side rate limiter ---------------------------------------------------------------


def too_many(headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(429, headers=headers, json={"status": "ERROR", "error": "slow down"})


@pytest.mark.parametrize("retry_after", [None, "7"], ids=["no-retry-after", "retry-after"])
@respx.mock
async def test_a_429_cuts_the_limiters_rate(retry_after: str | None) -> None:
    """A 429 halves the shared limiter's rate; the retry contract stays 1 s or Retry-After."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(100, 1.0), clock=clock)
    respx.get(f"{BASE_URL}{MIN_PATH}/{T0}/{LAST}").mock(side_effect=[
        too_many(None if retry_after is None else {"Retry-After": retry_after}), ok(bar(T0))])
    async with PolygonClient(KEY, BASE_URL, sleep=clock.sleep,
                             rate_limiter=limiter) as polygon:
        assert polygon.rate_limiter is limiter
        with capture_logs() as events:
            assert len(await polygon.fetch_range("AAPL", MINUTE, START, END)) == 1
    assert limiter.current_rate == 50.0
    assert "polygon.rate_reduced" in [event["event"] for event in events]
    assert (polygon.rate_limited_count, polygon.total_requests) == (1, 2)
    # One wait, never doubled: the limiter's hold is a deadline tenacity's wait already met.
    assert clock.sleeps == [1.0 if retry_after is None else 7.0]
    assert clock.monotonic() == (1.0 if retry_after is None else 7.0)


@respx.mock
async def test_api_seconds_exclude_limiter_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Time queued in the limiter is not API time: 3 requests at 1 per 60 s wait 121.2 s
    of (virtual) time, none of it inside api_seconds."""
    clock = FakeClock()
    monkeypatch.setattr(client_module, "time", SimpleNamespace(monotonic=clock.monotonic))
    limiter = AdaptiveRateLimiter(RateLimit(1, 60.0), clock=clock)
    respx.get(url__startswith=BASE_URL).mock(return_value=ok())
    async with PolygonClient(KEY, BASE_URL, sleep=clock.sleep, rate_limiter=limiter) as polygon:
        for _ in range(3):
            await polygon.fetch_range("AAPL", MINUTE, START, END)
    assert clock.monotonic() == pytest.approx(121.2)
    assert limiter.waited_s == pytest.approx(121.2)
    assert polygon.api_seconds == 0.0


@respx.mock
async def test_null_results_on_a_trading_day_are_asked_again_before_believed(
        sleep: RecordingSleep) -> None:
    """Pitfall 4: results null for a span holding a session is retried; the bars arrive."""
    client = PolygonClient(KEY, BASE_URL, sleep=sleep)
    start, end = datetime(2023, 1, 3, 5, tzinfo=UTC), datetime(2023, 1, 5, 5, tzinfo=UTC)
    route = respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2023-01-03/2023-01-04").mock(
        side_effect=[httpx.Response(200, json={"status": "OK", "results": None}),
                     httpx.Response(200, json={"status": "OK", "results": [
                         {"o": 1, "h": 2, "l": 0.5, "c": 1.5, "v": 10, "t": 1672722000000}]})])
    bars = await client.fetch_range("AAPL", Timeframe.parse("1d"), start, end)
    await client.aclose()
    assert [bar.t for bar in bars] == [1672722000000]
    assert route.call_count == 2
    assert sleep.waits == [1]


@respx.mock
async def test_a_missing_results_key_or_a_weekend_null_is_believed_at_once(
        sleep: RecordingSleep) -> None:
    """No results key is Polygon's plain 'no data'; null over a weekend holds no session."""
    client = PolygonClient(KEY, BASE_URL, sleep=sleep)
    weekday = respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2023-01-03/2023-01-04").mock(
        return_value=httpx.Response(200, json={"status": "OK", "resultsCount": 0}))
    weekend = respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2023-01-07/2023-01-08").mock(
        return_value=httpx.Response(200, json={"status": "OK", "results": None}))
    day = Timeframe.parse("1d")
    assert await client.fetch_range("AAPL", day, datetime(2023, 1, 3, 5, tzinfo=UTC),
                                    datetime(2023, 1, 5, 5, tzinfo=UTC)) == []
    assert await client.fetch_range("AAPL", day, datetime(2023, 1, 7, 5, tzinfo=UTC),
                                    datetime(2023, 1, 9, 5, tzinfo=UTC)) == []
    await client.aclose()
    assert (weekday.call_count, weekend.call_count) == (1, 1)
    assert sleep.waits == []


async def test_the_limiter_hears_when_each_request_left(sandbox: SandboxFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Over real HTTP, every request tells its limiter slot once its headers are sent
    (httpcore's trace), so the jitter allowance counts from the wire, not the grant."""
    sent: list[Slot] = []
    monkeypatch.setattr(Slot, "sent", lambda self: sent.append(self))
    server = await sandbox()
    limiter = AdaptiveRateLimiter(RateLimit(100, 1.0))
    async with PolygonClient("k", server.base_url, page_limit=10,
                             rate_limiter=limiter) as client:
        bars = await client.fetch_range("X:BTCUSD", Timeframe.parse("1d"),
                                        datetime(2024, 5, 1, tzinfo=UTC),
                                        datetime(2024, 5, 31, tzinfo=UTC))
    assert len(bars) == 30
    assert client.total_requests >= 3  # pages of at most 10 days
    assert len(sent) == client.total_requests
    assert len(set(map(id, sent))) == len(sent)  # one slot each
