"""Real recorded Polygon answers go through PolygonClient and come out as exact bars."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from polygon_backfill.clients import PolygonClient, parse_grouped_daily
from polygon_backfill.models import Bar, Timeframe, ms_to_datetime, session_date

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "polygon"
BASE_URL = "http://sandbox.test:8080"
DAY = Timeframe.parse("1d")

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"no fixtures at {FIXTURES}")


def load(name: str) -> dict[str, Any]:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {name} absent")
    return json.loads(path.read_text())


def serve(path: str, name: str) -> respx.Route:
    """Answer GET base_url + path with the fixture's bytes as recorded."""
    body = (FIXTURES / name).read_bytes() if (FIXTURES / name).is_file() else b""
    if not body:
        pytest.skip(f"fixture {name} absent")
    return respx.get(f"{BASE_URL}{path}").mock(return_value=httpx.Response(200, content=body))


@pytest.fixture
async def client() -> AsyncIterator[PolygonClient]:
    async with PolygonClient("fixture-key", BASE_URL) as polygon:
        yield polygon


def test_every_fixture_is_an_aggregates_answer() -> None:
    """Each recorded file is a successful answer whose bars all carry o, h, l, c, t."""
    names = sorted(path.name for path in FIXTURES.glob("*.json"))
    assert names, "fixtures directory is empty"
    for name in names:
        payload = load(name)
        assert payload["status"] in {"OK", "DELAYED"}, name
        assert all({"o", "h", "l", "c", "t"} <= bar.keys() for bar in payload["results"]), name


@respx.mock
async def test_aapl_daily_across_the_2005_dst_change(client: PolygonClient) -> None:
    """NY midnight is 05:00 UTC before the DST change and 04:00 UTC after it."""
    serve("/v2/aggs/ticker/AAPL/range/1/day/2005-04-01/2005-04-04",
          "aggs_AAPL_1_day_2005-04-01_2005-04-04.json")
    bars = await client.fetch_range("AAPL", DAY, datetime(2005, 4, 1, 5, tzinfo=UTC),
                                    datetime(2005, 4, 5, 4, tzinfo=UTC))
    assert bars == [
        Bar(1112331600000, 1.5032, 1.5064, 1.4489, 1.4604, 642646396.0, 1.469, 82132),
        Bar(1112587200000, 1.4639, 1.4754, 1.4343, 1.4675, 578172308.0, 1.4589, 65543),
    ]
    assert [ms_to_datetime(b.t) for b in bars] == [datetime(2005, 4, 1, 5, tzinfo=UTC),
                                                   datetime(2005, 4, 4, 4, tzinfo=UTC)]
    assert [session_date("AAPL", b.t) for b in bars] == [date(2005, 4, 1), date(2005, 4, 4)]


@respx.mock
async def test_aapl_daily_over_new_year_holiday(client: PolygonClient) -> None:
    """No bar for the 2023-01-02 holiday; the first session is 2023-01-03, six in all."""
    serve("/v2/aggs/ticker/AAPL/range/1/day/2023-01-01/2023-01-10",
          "aggs_AAPL_1_day_2023-01-01_2023-01-10.json")
    bars = await client.fetch_range("AAPL", DAY, datetime(2023, 1, 1, 5, tzinfo=UTC),
                                    datetime(2023, 1, 11, 5, tzinfo=UTC))
    days = [session_date("AAPL", b.t) for b in bars]
    assert days == [date(2023, 1, d) for d in (3, 4, 5, 6, 9, 10)]
    assert date(2023, 1, 2) not in days
    assert bars[0] == Bar(1672722000000, 130.28, 130.9, 124.17, 125.07, 112117471.0, 125.725,
                          1021065)
    assert ms_to_datetime(bars[0].t) == datetime(2023, 1, 3, 5, tzinfo=UTC)


@respx.mock
async def test_btcusd_daily_has_weekends_at_utc_midnight(client: PolygonClient) -> None:
    """Crypto trades every day: ten UTC-midnight bars from Sunday 2023-01-01."""
    serve("/v2/aggs/ticker/X:BTCUSD/range/1/day/2023-01-01/2023-01-10",
          "aggs_X-BTCUSD_1_day_2023-01-01_2023-01-10.json")
    bars = await client.fetch_range("X:BTCUSD", DAY, datetime(2023, 1, 1, tzinfo=UTC),
                                    datetime(2023, 1, 11, tzinfo=UTC))
    assert len(bars) == 10
    assert date(2023, 1, 1).weekday() == 6
    assert ms_to_datetime(bars[0].t) == datetime(2023, 1, 1, tzinfo=UTC)
    assert [session_date("X:BTCUSD", b.t) for b in bars] == [date(2023, 1, d)
                                                             for d in range(1, 11)]
    assert bars[0] == Bar(1672531200000, 16532.0, 16644.0, 16490.0, 16611.58,
                          12300.315533316923, 16549.5494, 292354)


@respx.mock
async def test_aapl_minute_page_follows_next_url_on_our_base(client: PolygonClient) -> None:
    """The recorded next_url (api.polygon.io) is followed on the configured base URL."""
    start, end = datetime(2023, 7, 31, 8, tzinfo=UTC), datetime(2023, 7, 31, 9, tzinfo=UTC)
    first = serve("/v2/aggs/ticker/AAPL/range/1/minute/1690790400000/1690793999999",
                  "aggs_AAPL_1_minute_2023-07-31_page1.json")
    real_host = respx.route(host="api.polygon.io").mock(return_value=httpx.Response(500))
    second = respx.get(f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/minute/1690791480000/"
                       "2023-07-31", params={"cursor": "bGltaXQ9MTAmc29ydD1hc2M"}).mock(
        return_value=httpx.Response(200, json={
            "ticker": "AAPL", "status": "OK", "queryCount": 1, "resultsCount": 1,
            "results": [{"v": 300, "vw": 195.6, "o": 195.6, "c": 195.62, "h": 195.65,
                         "l": 195.58, "t": 1690791480000, "n": 9}]}))
    pages = [page async for page in client.iter_pages("AAPL", Timeframe.parse("1m"),
                                                      start, end)]
    assert (first.call_count, second.call_count, real_host.call_count) == (1, 1, 0)
    assert [len(page.bars) for page in pages] == [10, 1]
    assert pages[0].bars[0] == Bar(1690790400000, 195.89, 195.9, 195.53, 195.53, 4428.0,
                                   195.7709, 121)
    assert ms_to_datetime(pages[0].bars[0].t) == datetime(2023, 7, 31, 8, tzinfo=UTC)
    assert pages[0].covered.end == ms_to_datetime(1690791480000) == pages[1].covered.start
    assert pages[1].covered.end == end


def test_grouped_daily_is_keyed_by_ticker() -> None:
    """Grouped-daily bars come back keyed by T, their t at 16:00 New York."""
    bars = parse_grouped_daily(load("grouped_us_stocks_2005-04-04.json"))
    assert bars == {"GIK": Bar(1602705600000, 9.99, 10.02, 9.9, 10.02, 895345.0, 9.9979, 96)}
    stamp = ms_to_datetime(bars["GIK"].t)
    assert stamp == datetime(2020, 10, 14, 20, tzinfo=UTC)  # 16:00 EDT
    assert session_date("GIK", bars["GIK"].t) == date(2020, 10, 14)
