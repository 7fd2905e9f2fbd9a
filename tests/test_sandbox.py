"""The Polygon sandbox: exact CSV passthrough, paging by base aggregates, aggregation,
grouped daily, deterministic synthetic bars and the failure knobs (429, 401, 400)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from itertools import groupby
from pathlib import Path
from typing import Any

import httpx
import pytest

from polygon_backfill.models import NEW_YORK, datetime_to_ms, session_date
from polygon_backfill.sandbox import RequestRecord, SandboxServer
from tests.support import SandboxFactory

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
NOW = datetime(2024, 6, 1, tzinfo=UTC)

Factory = SandboxFactory
Json = dict[str, Any]






async def get(server: SandboxServer, url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        return await client.get(url, **kwargs)


async def pages(server: SandboxServer, url: str) -> list[Json]:
    """Every page of a request, following ``next_url``."""
    bodies: list[Json] = []
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        next_url: str | None = url
        while next_url is not None:
            response = await client.get(next_url)
            assert response.status_code == 200, response.text
            bodies.append(response.json())
            next_url = bodies[-1].get("next_url")
            assert len(bodies) < 1000
    return bodies


def bars_of(bodies: list[Json]) -> list[Json]:
    return [bar for body in bodies for bar in body.get("results", [])]


def read_csv(name: str) -> list[dict[str, str]]:
    with (REAL_DIR / name).open(newline="") as handle:
        return list(csv.DictReader(handle))


def ms(moment: datetime) -> int:
    return datetime_to_ms(moment)


# -- CSV data ---------------------------------------------------------------------------


async def test_day_bars_pass_through_with_the_exact_csv_values(
        sandbox: Factory, real_dir: Path) -> None:
    """Stored values must equal the file value by value: no rounding, no re-stamping."""
    server = await sandbox(data_dir=real_dir, synthetic=False)
    body = (await get(server, "/v2/aggs/ticker/AAPL/range/1/day/2004-01-01/2018-12-31",
                      params={"limit": "50000"})).json()
    rows = read_csv("AAPL.day.csv")
    assert body["status"] == "OK"
    assert body["ticker"] == "AAPL"
    assert body["resultsCount"] == body["count"] == body["queryCount"] == len(rows)
    assert "next_url" not in body
    expected = [{"v": float(row["v"]), "o": float(row["o"]), "c": float(row["c"]),
                 "h": float(row["h"]), "l": float(row["l"]), "t": int(row["t"])}
                for row in rows]
    assert body["results"] == expected


async def test_minute_limit_counts_base_aggregates_and_pages_chain_without_gaps(
        sandbox: Factory, real_dir: Path) -> None:
    """limit=100: 100 one-minute bars or 20 five-minute bars a page; the chain is whole."""
    server = await sandbox(data_dir=real_dir, synthetic=False)
    expected_t = [int(row["t"]) for row in read_csv("I-SPX.minute.csv")]
    minute_pages = await pages(
        server, "/v2/aggs/ticker/I:SPX/range/1/minute/2019-11-05/2019-11-08?limit=100")
    assert [body["count"] for body in minute_pages[:-1]] == [100] * (len(minute_pages) - 1)
    assert [bar["t"] for bar in bars_of(minute_pages)] == expected_t
    assert all(set(bar) == {"o", "c", "h", "l", "t"} for bar in bars_of(minute_pages))

    url = "/v2/aggs/ticker/I:SPX/range/5/minute/2019-11-05/2019-11-08"
    five_pages = await pages(server, url + "?limit=100")
    whole = (await get(server, url, params={"limit": "50000"})).json()["results"]
    assert five_pages[0]["count"] == 20
    assert five_pages[0]["queryCount"] == 100
    assert all(body["queryCount"] <= 100 for body in five_pages)
    assert bars_of(five_pages) == whole
    assert len({bar["t"] for bar in whole}) == len(whole)
    first_next = five_pages[0]["next_url"]
    assert first_next.startswith(f"{server.base_url}/v2/aggs/ticker/I:SPX/range/5/minute/"
                                 f"{five_pages[1]['results'][0]['t']}/2019-11-08?cursor=")


async def test_descending_pages_chain_back_to_the_start(
        sandbox: Factory, real_dir: Path) -> None:
    server = await sandbox(data_dir=real_dir, synthetic=False)
    bodies = await pages(
        server, "/v2/aggs/ticker/I:SPX/range/1/minute/2019-11-05/2019-11-08?limit=500&sort=desc")
    expected_t = [int(row["t"]) for row in read_csv("I-SPX.minute.csv")]
    assert len(bodies) == 4
    assert [bar["t"] for bar in bars_of(bodies)] == expected_t[::-1]


async def test_a_cursor_alone_carries_the_options(sandbox: Factory, real_dir: Path) -> None:
    """Polygon's next_url may carry only the cursor; the options must survive in it."""
    server = await sandbox(data_dir=real_dir, synthetic=False)
    first = (await get(server, "/v2/aggs/ticker/I:SPX/range/1/minute/2019-11-05/2019-11-08",
                       params={"limit": "10", "sort": "desc", "adjusted": "false"})).json()
    bare = httpx.URL(first["next_url"]).copy_with(
        params={"cursor": httpx.URL(first["next_url"]).params["cursor"]})
    second = (await get(server, str(bare))).json()
    assert second["count"] == 10
    assert second["adjusted"] is False
    assert second["results"][0]["t"] == first["results"][-1]["t"] - 60_000


def manual_aggregate(rows: list[dict[str, str]], key: Callable[[int], object]) -> list[Json]:
    out = []
    for _, group in groupby(rows, key=lambda row: key(int(row["t"]))):
        members = list(group)
        out.append({"o": float(members[0]["o"]), "c": float(members[-1]["c"]),
                    "h": max(float(row["h"]) for row in members),
                    "l": min(float(row["l"]) for row in members)})
    return out


async def test_minute_file_builds_hour_and_day_bars(sandbox: Factory, real_dir: Path) -> None:
    server = await sandbox(data_dir=real_dir, synthetic=False)
    rows = read_csv("I-SPX.minute.csv")
    hours = (await get(server, "/v2/aggs/ticker/I:SPX/range/1/hour/2019-11-05/2019-11-08"))
    hour_bars = hours.json()["results"]
    assert [{k: bar[k] for k in "ochl"} for bar in hour_bars] == manual_aggregate(
        rows, lambda t: t // 3_600_000)
    assert all(bar["t"] % 3_600_000 == 0 for bar in hour_bars)
    assert hours.json()["queryCount"] == len(rows)

    days = (await get(server, "/v2/aggs/ticker/I:SPX/range/1/day/2019-11-05/2019-11-08")).json()
    assert [{k: bar[k] for k in "ochl"} for bar in days["results"]] == manual_aggregate(
        rows, lambda t: session_date("I:SPX", t))
    assert [bar["t"] for bar in days["results"]] == [
        ms(datetime(2019, 11, day, tzinfo=NEW_YORK)) for day in (5, 6, 7, 8)]
    assert days["queryCount"] == 4
    assert all("v" not in bar for bar in days["results"])


async def test_grouped_daily_is_stamped_at_the_close_and_matches_the_day_bars(
        sandbox: Factory, real_dir: Path) -> None:
    server = await sandbox(data_dir=real_dir, synthetic=False)
    grouped = (await get(server, "/v2/aggs/grouped/locale/us/market/stocks/2015-03-02")).json()
    assert [bar["T"] for bar in grouped["results"]] == ["AAPL", "SPY"]
    close = ms(datetime(2015, 3, 2, 16, tzinfo=NEW_YORK))
    for bar in grouped["results"]:
        assert bar["t"] == close
        day = (await get(server, f"/v2/aggs/ticker/{bar['T']}/range/1/day/2015-03-02/2015-03-02"
                         )).json()["results"]
        assert day[0]["t"] == ms(datetime(2015, 3, 2, tzinfo=NEW_YORK))
        assert {**day[0], "t": close, "T": bar["T"]} == bar
    weekend = (await get(server, "/v2/aggs/grouped/locale/us/market/stocks/2015-03-01")).json()
    assert weekend["resultsCount"] == 0
    assert "results" not in weekend


async def test_an_empty_range_has_no_results_key(sandbox: Factory, real_dir: Path) -> None:
    server = await sandbox(data_dir=real_dir, synthetic=False)
    for path in ("/v2/aggs/ticker/AAPL/range/1/day/1990-01-01/1990-01-05",
                 "/v2/aggs/ticker/MSFT/range/1/day/2015-01-01/2015-01-05",
                 "/v2/aggs/ticker/AAPL/range/1/minute/2015-01-05/2015-01-05"):
        body = (await get(server, path)).json()
        assert body["status"] == "OK"
        assert body["resultsCount"] == body["count"] == body["queryCount"] == 0
        assert "results" not in body
        assert "next_url" not in body


# -- synthetic bars ---------------------------------------------------------------------


async def test_synthetic_bars_are_deterministic_across_servers(sandbox: Factory) -> None:
    first, second = await sandbox(), await sandbox()
    for path in ("/v2/aggs/ticker/AAPL/range/5/minute/2024-01-02/2024-01-05",
                 "/v2/aggs/ticker/X:BTCUSD/range/1/hour/2024-01-01/2024-01-10",
                 "/v2/aggs/ticker/C:EURUSD/range/1/day/2023-01-01/2024-01-01",
                 "/v2/aggs/ticker/I:SPX/range/1/week/2020-01-01/2024-01-01"):
        one, two = (await get(first, path)).json(), (await get(second, path)).json()
        assert one["resultsCount"] > 0
        assert one.pop("request_id") != two.pop("request_id")
        assert one.pop("next_url", "").split("/v2/")[1:] == two.pop("next_url", "").split(
            "/v2/")[1:]
        assert one == two


def test_synthetic_bars_do_not_depend_on_the_process() -> None:
    """Another interpreter with another hash seed computes the same bars."""
    code = ("from datetime import date; from polygon_backfill.models import Timespan; "
            "from polygon_backfill.sandbox.synthetic import SyntheticSource; "
            "print(list(SyntheticSource(date(2000, 1, 1)).select("
            "'X:ETHUSD', 1, Timespan.MINUTE, 1704067200000, 1704067500000, False)))")
    outputs = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert len(outputs) == 1
    assert outputs.pop().count("'t':") == 6


async def test_synthetic_bars_are_well_formed(sandbox: Factory) -> None:
    server = await sandbox()
    for path in ("/v2/aggs/ticker/AAPL/range/1/minute/2024-01-02/2024-01-02",
                 "/v2/aggs/ticker/X:BTCUSD/range/15/minute/2024-01-01/2024-01-03",
                 "/v2/aggs/ticker/C:EURUSD/range/4/hour/2024-01-01/2024-02-01",
                 "/v2/aggs/ticker/MSFT/range/1/day/2023-01-01/2024-01-01"):
        for bar in (await get(server, path)).json()["results"]:
            assert bar["l"] <= min(bar["o"], bar["c"]) <= max(bar["o"], bar["c"]) <= bar["h"]
            assert bar["l"] > 0
            assert bar["l"] <= bar["vw"] <= bar["h"]
            assert bar["v"] > 0
            assert isinstance(bar["n"], int)


async def test_crypto_trades_on_weekends_and_stocks_do_not(sandbox: Factory) -> None:
    server = await sandbox()
    saturday = "2024-01-06/2024-01-06"
    crypto = (await get(server, f"/v2/aggs/ticker/X:BTCUSD/range/1/minute/{saturday}",
                        params={"limit": "50000"})).json()
    assert crypto["resultsCount"] == 1440
    assert isinstance(crypto["results"][0]["v"], float)
    stock = (await get(server, f"/v2/aggs/ticker/AAPL/range/1/minute/{saturday}")).json()
    assert "results" not in stock
    monday = (await get(server, "/v2/aggs/ticker/AAPL/range/1/minute/2024-01-08/2024-01-08",
                        params={"limit": "50000"})).json()["results"]
    assert 0.9 * 960 < len(monday) < 960
    local = [datetime.fromtimestamp(bar["t"] / 1000, NEW_YORK) for bar in monday]
    assert min(local).hour >= 4
    assert max(local).hour < 20
    days = (await get(server, "/v2/aggs/ticker/AAPL/range/1/day/2024-01-01/2024-01-14")).json()
    assert [datetime.fromtimestamp(bar["t"] / 1000, NEW_YORK).date().weekday()
            for bar in days["results"]] == [1, 2, 3, 4, 0, 1, 2, 3, 4]
    index = (await get(server, "/v2/aggs/ticker/I:SPX/range/1/minute/2024-01-08/2024-01-08",
                       params={"limit": "50000"})).json()["results"]
    assert len(index) == 390
    assert set(index[0]) == {"o", "c", "h", "l", "t"}


async def test_no_bar_starts_at_or_after_now(sandbox: Factory) -> None:
    now = datetime(2024, 1, 3, 15, 0, tzinfo=UTC)
    server = await sandbox(now=lambda: now)
    minutes = (await get(server, "/v2/aggs/ticker/X:BTCUSD/range/1/minute/2024-01-03/2024-01-04",
                         params={"limit": "50000"})).json()["results"]
    assert minutes[-1]["t"] == ms(now) - 60_000
    days = (await get(server, "/v2/aggs/ticker/X:BTCUSD/range/1/day/2024-01-01/2024-01-10"
                      )).json()["results"]
    assert [bar["t"] for bar in days][-1] == ms(datetime(2024, 1, 3, tzinfo=UTC))
    future = (await get(server, "/v2/aggs/ticker/AAPL/range/1/day/2024-02-01/2024-02-10")).json()
    assert "results" not in future


async def test_synthetic_pages_are_fast_and_chain(sandbox: Factory) -> None:
    """10,000 five-minute crypto bars in one page; paging by 100 base minutes gives 20."""
    server = await sandbox()
    url = "/v2/aggs/ticker/X:BTCUSD/range/5/minute/2024-01-01/2024-02-10"
    started = time.perf_counter()
    body = (await get(server, url, params={"limit": "50000"})).json()
    assert time.perf_counter() - started < 2.0
    assert body["count"] == 10_000
    assert body["queryCount"] == 50_000
    assert body["next_url"].split("?")[0].endswith(
        f"/{body['results'][-1]['t'] + 300_000}/2024-02-10")
    small = await pages(server, "/v2/aggs/ticker/AAPL/range/5/minute/2024-01-08/2024-01-09"
                                "?limit=100")
    assert all(page["count"] == 20 for page in small[:-1])
    whole = (await get(server, "/v2/aggs/ticker/AAPL/range/5/minute/2024-01-08/2024-01-09"
                       )).json()["results"]
    assert bars_of(small) == whole


async def test_synthetic_data_starts_at_its_start_date(sandbox: Factory) -> None:
    server = await sandbox(synthetic_start=date(2020, 1, 1))
    body = (await get(server, "/v2/aggs/ticker/X:BTCUSD/range/1/day/2019-12-25/2020-01-03"
                      )).json()
    assert body["results"][0]["t"] == ms(datetime(2020, 1, 1, tzinfo=UTC))


# -- failure knobs ----------------------------------------------------------------------


async def test_rate_limit_answers_429_until_the_window_slides(sandbox: Factory) -> None:
    clock = [100.0]
    server = await sandbox(rate_limit=3, rate_period_s=60.0, monotonic=lambda: clock[0])
    path = "/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05"
    statuses = [(await get(server, path)).status_code for _ in range(3)]
    refused = await get(server, path)
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.json()["status"] == "ERROR"
    assert refused.json()["error"].startswith("You've exceeded the maximum requests per minute")
    assert server.rate_limited_count == 1
    clock[0] += 60.0
    assert (await get(server, path)).status_code == 200
    assert [record.status for record in server.requests] == [200, 200, 200, 429, 200]


async def test_api_key_is_required_by_header_or_query(sandbox: Factory) -> None:
    server = await sandbox(api_key="secret")
    path = "/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05"
    missing = await get(server, path)
    wrong = await get(server, path, headers={"Authorization": "Bearer nope"})
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["error"] == "Unknown API Key"
    assert (await get(server, path, headers={"Authorization": "Bearer secret"})).status_code \
        == 200
    assert (await get(server, path, params={"apiKey": "secret"})).status_code == 200


@pytest.mark.parametrize(("path", "params"), [
    ("/v2/aggs/ticker/AAPL/range/1/day/2024-01-05/2024-01-02", {}),
    ("/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05", {"limit": "50001"}),
    ("/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05", {"sort": "sideways"}),
    ("/v2/aggs/ticker/AAPL/range/1/month/2024-01-02/2024-01-05", {}),
    ("/v2/aggs/ticker/AAPL/range/0/day/2024-01-02/2024-01-05", {}),
    ("/v2/aggs/ticker/AA PL/range/1/day/2024-01-02/2024-01-05", {}),
    ("/v2/aggs/ticker/AAPL/range/1/day/2024-13-02/2024-01-05", {}),
])
async def test_bad_requests_are_400_errors(sandbox: Factory, path: str,
                                           params: dict[str, str]) -> None:
    server = await sandbox()
    response = await get(server, path, params=params)
    assert response.status_code == 400
    assert response.json()["status"] == "ERROR"
    assert response.json()["error"]


async def test_requests_are_logged_in_order(sandbox: Factory) -> None:
    server = await sandbox()
    await get(server, "/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05",
              params={"limit": "7"})
    await get(server, "/v2/aggs/grouped/locale/us/market/stocks/2024-01-02")
    await get(server, "/nowhere")
    assert server.requests == [
        RequestRecord("/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05", {"limit": "7"},
                      200, "AAPL", 4),
        RequestRecord("/v2/aggs/grouped/locale/us/market/stocks/2024-01-02", {}, 200, None, 0),
        RequestRecord("/nowhere", {}, 404, None, 0),
    ]


async def test_base_url_names_the_bound_port(sandbox: Factory) -> None:
    server = await sandbox()
    assert server.base_url.startswith("http://127.0.0.1:")
    assert not server.base_url.endswith(":0")
