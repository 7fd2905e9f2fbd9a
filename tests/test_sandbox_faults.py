"""Sandbox fault injection, on the wire: what each fault sends, when rules fire, the
scaled rate-limit window and bar overrides. Clients' resilience tests build on these."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from polygon_backfill.models import datetime_to_ms
from polygon_backfill.sandbox import RequestRecord, SandboxConfig, SandboxServer
from polygon_backfill.sandbox.faults import FaultKind, FaultRule, parse_faults
from tests.support import SandboxFactory

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
NOW = datetime(2024, 6, 1, tzinfo=UTC)
DAYS = "/v2/aggs/ticker/AAPL/range/1/day/2024-01-02/2024-01-05"
MINUTES = "/v2/aggs/ticker/AAPL/range/1/minute/2024-01-02/2024-01-02"
LO = datetime_to_ms(datetime(2024, 1, 2, 5, tzinfo=UTC))  # New York midnight
HI = datetime_to_ms(datetime(2024, 1, 6, 5, tzinfo=UTC)) - 1

Factory = SandboxFactory
Json = dict[str, Any]
Http = httpx.AsyncClient




@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """One client for the whole test: a client per request costs ~30 ms of TLS setup."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        yield client


async def get(http: httpx.AsyncClient, server: SandboxServer, url: str,
              **kwargs: Any) -> httpx.Response:
    return await http.get(server.base_url + url, **kwargs)


async def healthy_and_faulty(http: httpx.AsyncClient, kind: FaultKind, url: str = DAYS,
                             **params: str) -> tuple[httpx.Response, httpx.Response]:
    """The same request from a clean server and from one that always injects ``kind``."""
    async with SandboxServer(SandboxConfig(now=lambda: NOW)) as clean, SandboxServer(
            SandboxConfig(now=lambda: NOW, faults=[FaultRule(kind)])) as faulty:
        healthy = await get(http, clean, url, params=params)
        broken = await get(http, faulty, url, params=params)
        assert faulty.faults_injected == {kind.value: 1}
        assert faulty.requests[0].fault == kind.value
    assert healthy.status_code == 200
    return healthy, broken


# -- error answers ------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "status", "state", "key", "message"), [
    (FaultKind.RATE_LIMIT, 429, "ERROR", "error",
     "You've exceeded the maximum requests per minute"),
    (FaultKind.SERVER_ERROR, 500, "ERROR", "error", "Internal server error"),
    (FaultKind.UNAVAILABLE, 503, "ERROR", "error", "Service temporarily unavailable"),
    (FaultKind.STATUS_ERROR, 200, "ERROR", "error", "Internal processing error"),
    (FaultKind.UNKNOWN_TICKER, 404, "NOT_FOUND", "message", "Ticker not found"),
    (FaultKind.NOT_AUTHORIZED, 403, "NOT_AUTHORIZED", "message",
     "You are not entitled to this data. Please upgrade your plan"),
    (FaultKind.UNAUTHORIZED, 401, "ERROR", "error", "Unknown API Key"),
])
async def test_error_faults_answer_polygon_error_json(
        sandbox: Factory, kind: FaultKind, status: int, state: str, key: str,
        message: str, http: Http) -> None:
    server = await sandbox(FaultRule(kind))
    response = await get(http, server, DAYS)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert "retry-after" not in response.headers
    body = response.json()
    assert body["status"] == state
    assert body[key].startswith(message)
    assert len(body["request_id"]) == 32
    assert "results" not in body
    assert server.requests[0].status == status
    assert server.rate_limited_count == 0


@pytest.mark.parametrize(("kind", "seconds", "header"), [
    (FaultKind.RATE_LIMIT, 2.0, "2"), (FaultKind.RATE_LIMIT, 0.05, "0.05"),
    (FaultKind.UNAVAILABLE, 7, "7"),
])
async def test_retry_after_header_when_asked(sandbox: Factory, kind: FaultKind,
                                             seconds: float, header: str, http: Http) -> None:
    server = await sandbox(FaultRule(kind, retry_after_s=seconds))
    assert (await get(http, server, DAYS)).headers["retry-after"] == header


async def test_bad_gateway_is_an_html_page(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.BAD_GATEWAY_HTML))
    response = await get(http, server, DAYS)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    assert "<h1>502 Bad Gateway</h1>" in response.text
    with pytest.raises(json.JSONDecodeError):
        response.json()


# -- broken 200 bodies ----------------------------------------------------------------------


async def test_truncated_json_is_the_real_body_cut_in_half(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.TRUNCATED_JSON)
    assert broken.status_code == 200
    assert broken.headers["content-type"].startswith("application/json")
    assert broken.text == healthy.text[: len(healthy.text) // 2]
    with pytest.raises(json.JSONDecodeError):
        broken.json()


async def test_malformed_body_is_not_json(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.MALFORMED))
    response = await get(http, server, DAYS)
    assert response.status_code == 200
    assert response.text == "<html>oops"
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_null_results_look_like_no_data(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.NULL_RESULTS, MINUTES, limit="10")
    assert "next_url" in healthy.json()
    assert '"results":null' in broken.text
    body = broken.json()
    assert body["status"] == "OK"
    assert body["resultsCount"] == body["count"] == body["queryCount"] == 0
    assert "next_url" not in body


async def test_duplicates_put_the_wrong_copy_first_so_last_wins(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.DUPLICATES)
    bars, doubled = healthy.json()["results"], broken.json()["results"]
    assert broken.json()["resultsCount"] == broken.json()["count"] == len(doubled) == 8
    assert doubled[1::2] == bars
    for wrong, right in zip(doubled[::2], bars, strict=True):
        assert wrong["t"] == right["t"]
        assert all(wrong[key] == right[key] + 1 for key in "ohlc")
        assert wrong["h"] >= wrong["l"]
    assert list({bar["t"]: bar for bar in doubled}.values()) == bars


async def test_out_of_range_adds_one_bar_before_and_one_after(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.OUT_OF_RANGE)
    bars, served = healthy.json()["results"], broken.json()["results"]
    assert len(served) == broken.json()["resultsCount"] == 6
    assert served[1:-1] == bars
    assert served[0]["t"] == bars[0]["t"] - 86_400_000 < LO
    assert served[-1]["t"] == bars[-1]["t"] + 86_400_000 > HI
    assert all(bar["l"] <= bar["h"] for bar in served)


async def test_out_of_range_spares_followed_pages(sandbox: Factory, http: Http) -> None:
    """Page 2's ``from`` is a cursor position, not the client's range: a bar before it
    could be inside the range the client asked for."""
    server = await sandbox(FaultRule(FaultKind.OUT_OF_RANGE, after=1))
    first = await get(http, server, MINUTES, params={"limit": "10"})
    second = await http.get(first.json()["next_url"])
    assert second.json()["resultsCount"] == 10
    assert server.faults_injected == {}


async def test_invalid_bars_sit_inside_the_range_off_the_bar_grid(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.INVALID_BARS)
    assert "NaN" in broken.text
    real = {bar["t"] for bar in healthy.json()["results"]}
    served = broken.json()["results"]
    assert [bar["t"] for bar in served] == sorted(bar["t"] for bar in served)
    extra = [bar for bar in served if bar["t"] not in real]
    assert len(extra) == 3
    assert len(served) == broken.json()["resultsCount"] == 7
    assert all(LO <= bar["t"] <= HI and min(abs(bar["t"] - t) for t in real) <= 3
               for bar in extra)
    assert sum(bar["h"] < bar["l"] for bar in extra) == 1
    assert sum(math.isnan(bar["c"]) for bar in extra) == 1
    assert sum(bar["v"] < 0 for bar in extra) == 1


async def test_extra_fields_appear_at_both_levels(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.EXTRA_FIELDS)
    body = broken.json()
    assert body["otc"] is False
    assert body["foo"] == {"x": 1}
    assert all(bar["otc"] is False and bar["foo"] == {"x": 1} for bar in body["results"])
    assert [{key: bar[key] for key in "tohlcv"} for bar in body["results"]] == [
        {key: bar[key] for key in "tohlcv"} for bar in healthy.json()["results"]]


async def test_next_url_loop_names_the_page_itself(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.NEXT_URL_LOOP))
    response = await get(http, server, MINUTES, params={"limit": "10", "sort": "asc"})
    assert response.json()["next_url"] == f"{server.base_url}{MINUTES}?limit=10&sort=asc"
    assert response.json()["next_url"] == str(response.request.url)


async def test_foreign_next_url_keeps_path_and_query_on_another_host(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.FOREIGN_NEXT_URL, MINUTES,
                                               limit="10")
    real, foreign = httpx.URL(healthy.json()["next_url"]), httpx.URL(broken.json()["next_url"])
    assert broken.json()["next_url"].startswith("https://evil.example.com/v2/aggs/")
    assert (foreign.raw_path, foreign.params) == (real.raw_path, real.params)


async def test_full_page_without_next_url_looks_truncated(http: Http) -> None:
    healthy, broken = await healthy_and_faulty(http, FaultKind.FULL_PAGE_NO_NEXT, MINUTES,
                                               limit="10")
    body = broken.json()
    assert "next_url" in healthy.json()
    assert "next_url" not in body
    assert body["resultsCount"] == body["queryCount"] == 10
    assert body["results"] == healthy.json()["results"]


async def test_full_page_fault_skips_pages_without_next_url(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.FULL_PAGE_NO_NEXT, times=1))
    last_page = await get(http, server, DAYS)
    assert "next_url" not in last_page.json()
    assert last_page.json()["resultsCount"] == 4
    assert "next_url" not in (await get(http, server, MINUTES, params={"limit": "10"})).json()
    assert [record.fault for record in server.requests] == [None, "full_no_next"]


async def test_faulty_bodies_never_leak_into_later_answers(sandbox: Factory, http: Http) -> None:
    server = await sandbox(*(FaultRule(kind, times=1) for kind in (
        FaultKind.DUPLICATES, FaultKind.INVALID_BARS, FaultKind.OUT_OF_RANGE,
        FaultKind.EXTRA_FIELDS)))
    clean = await sandbox()
    for _ in range(4):
        await get(http, server, DAYS)
    assert sum(server.faults_injected.values()) == 4
    assert (await get(http, server, DAYS)).json()["results"] == (
        await get(http, clean, DAYS)).json()["results"]


# -- connection-level faults -----------------------------------------------------------------


async def test_connection_reset_mid_body(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.CONNECTION_RESET, times=1))
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await get(http, server, DAYS)
    assert (await get(http, server, DAYS)).status_code == 200
    assert [record.fault for record in server.requests] == ["reset", None]


async def test_timeout_never_answers_and_stop_is_still_prompt(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.TIMEOUT))
    with pytest.raises(httpx.ReadTimeout):
        await get(http, server, DAYS, timeout=0.2)
    assert server.requests[0] == RequestRecord(DAYS, {}, 0, "AAPL", 0, "timeout")
    waiting = asyncio.create_task(get(http, server, DAYS))
    await asyncio.wait({waiting}, timeout=0.1)  # let it arrive and hang
    assert len(server.requests) == 2
    started = time.perf_counter()
    await server.stop()
    assert time.perf_counter() - started < 1.0
    with pytest.raises(httpx.TransportError):
        await waiting


async def test_timeout_with_short_hang_answers_late(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.TIMEOUT, hang_s=0.05))
    started = time.perf_counter()
    response = await get(http, server, DAYS)
    assert time.perf_counter() - started >= 0.05
    assert response.status_code == 200
    assert response.json()["resultsCount"] == 4


# -- when rules fire --------------------------------------------------------------------


async def test_after_and_times_count_matching_requests_only(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.SERVER_ERROR, ticker="AAPL", timespan="day",
                                     after=2, times=2))
    other = "/v2/aggs/ticker/MSFT/range/1/day/2024-01-02/2024-01-05"
    statuses = []
    for url in (DAYS, other, MINUTES, DAYS, DAYS, other, DAYS, DAYS):
        statuses.append((await get(http, server, url)).status_code)
    assert statuses == [200, 200, 200, 200, 500, 200, 500, 200]
    assert server.faults_injected == {"500": 2}


async def test_first_firing_rule_wins_in_order(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.SERVER_ERROR, times=1),
                           FaultRule(FaultKind.RATE_LIMIT, times=1),
                           FaultRule(FaultKind.UNAVAILABLE, probability=0.0))
    statuses = [(await get(http, server, DAYS)).status_code for _ in range(3)]
    assert statuses == [500, 429, 200]
    assert [record.fault for record in server.requests] == ["500", "429", None]


async def test_probability_is_deterministic_for_a_seed(sandbox: Factory, http: Http) -> None:
    rule = FaultRule(FaultKind.SERVER_ERROR, probability=0.5)

    async def pattern(seed: int) -> list[int]:
        server = await sandbox(rule, fault_seed=seed)
        return [(await get(http, server, DAYS)).status_code for _ in range(24)]

    first, again, other = await pattern(7), await pattern(7), await pattern(8)
    assert first == again
    assert first != other
    assert 3 <= first.count(500) <= 21


async def test_grouped_daily_takes_only_the_faults_that_fit(sandbox: Factory, http: Http) -> None:
    grouped = "/v2/aggs/grouped/locale/us/market/stocks/2024-01-02"
    server = await sandbox(FaultRule(FaultKind.SERVER_ERROR, ticker="AAPL"),
                           FaultRule(FaultKind.OUT_OF_RANGE),
                           FaultRule(FaultKind.NEXT_URL_LOOP),
                           FaultRule(FaultKind.BAD_GATEWAY_HTML, timespan="day"))
    assert (await get(http, server, grouped)).status_code == 502
    assert server.requests[-1].fault == "502"


async def test_real_auth_and_rate_limit_come_before_faults(sandbox: Factory, http: Http) -> None:
    server = await sandbox(FaultRule(FaultKind.SERVER_ERROR), api_key="k", rate_limit=1,
                           monotonic=lambda: 0.0)
    assert (await get(http, server, DAYS)).status_code == 401
    auth = {"Authorization": "Bearer k"}
    assert (await get(http, server, DAYS, headers=auth)).status_code == 500
    assert (await get(http, server, DAYS, headers=auth)).status_code == 429
    assert server.faults_injected == {"500": 1}
    assert server.rate_limited_count == 1


def test_parse_faults() -> None:
    rules = parse_faults(" 429:0.05, 500:0.05,timeout:0.02,truncated:0.05,full_no_next ,")
    assert [(rule.kind, rule.probability) for rule in rules] == [
        (FaultKind.RATE_LIMIT, 0.05), (FaultKind.SERVER_ERROR, 0.05),
        (FaultKind.TIMEOUT, 0.02), (FaultKind.TRUNCATED_JSON, 0.05),
        (FaultKind.FULL_PAGE_NO_NEXT, 1.0)]
    assert parse_faults("") == []
    with pytest.raises(ValueError, match=r"unknown fault kind 'teapot'.*known kinds: 429"):
        parse_faults("429:0.1,teapot:0.1")
    with pytest.raises(ValueError, match=r"must be a number in '500:often'"):
        parse_faults("500:often")
    for bad in ("500:1.5", "500:-0.1", "500:nan"):
        with pytest.raises(ValueError, match=r"within \[0, 1\]"):
            parse_faults(bad)


# -- scaled rate limit ------------------------------------------------------------------


async def test_rate_window_scaled_to_0_6_s_is_exact(sandbox: Factory, http: Http) -> None:
    """Five per "minute" of 0.6 s: refused requests do not count; exactly 0.6 s after the
    oldest admitted request a new one is allowed."""
    clock = [100.0]
    server = await sandbox(rate_limit=5, rate_period_s=0.6, monotonic=lambda: clock[0])

    async def status_at(moment: float) -> int:
        clock[0] = moment
        return (await get(http, server, DAYS)).status_code

    assert [await status_at(100.0 + 0.1 * i) for i in range(5)] == [200] * 5
    assert await status_at(100.5) == 429
    assert await status_at(100.599) == 429
    assert await status_at(100.6) == 200  # the one from 100.0 left the window
    assert await status_at(100.6) == 429
    assert await status_at(100.7) == 200
    assert server.rate_limited_count == 3


# -- bar overrides ---------------------------------------------------------------------


def write_minutes(directory: Path) -> list[int]:
    start = datetime_to_ms(datetime(2024, 1, 2, 14, 30, tzinfo=UTC))
    times = [start + 60_000 * i for i in range(5)]
    rows = [f"{t},{10 + i},{11 + i},{9 + i},{10.5 + i},{100 * (i + 1)}"
            for i, t in enumerate(times)]
    (directory / "ZZZ.minute.csv").write_text("t,o,h,l,c,v\n" + "\n".join(rows) + "\n")
    return times


async def test_override_bar_changes_passthrough_and_aggregates(
        sandbox: Factory, tmp_path: Path, http: Http) -> None:
    times = write_minutes(tmp_path)
    server = await sandbox(data_dir=tmp_path, synthetic=False)
    minute_url = "/v2/aggs/ticker/ZZZ/range/1/minute/2024-01-02/2024-01-02"
    hour_url = "/v2/aggs/ticker/ZZZ/range/1/hour/2024-01-02/2024-01-02"
    before = (await get(http, server, minute_url)).json()["results"]
    assert (await get(http, server, hour_url)).json()["results"][0]["h"] == 15.0

    server.override_bar("ZZZ", "minute", times[2], h=99, c=50.5, v=7)
    after = (await get(http, server, minute_url)).json()["results"]
    assert after[2] == {**before[2], "h": 99.0, "c": 50.5, "v": 7.0}
    assert after[:2] + after[3:] == before[:2] + before[3:]
    hour = (await get(http, server, hour_url)).json()["results"][0]
    assert (hour["h"], hour["v"]) == (99.0, 1500 - 300 + 7)
    assert before[2]["h"] == 13.0  # an answer already served keeps its values

    with pytest.raises(LookupError, match="no minute bar"):
        server.override_bar("ZZZ", "minute", times[0] + 1, c=1)
    with pytest.raises(LookupError, match="no day file"):
        server.override_bar("ZZZ", "day", times[0], c=1)
    with pytest.raises(ValueError, match="cannot override"):
        server.override_bar("ZZZ", "minute", times[0], vx=1)
    with pytest.raises(ValueError, match="dataset"):
        server.override_bar("AAPL", "day", times[0], c=1)


async def test_override_bar_on_real_day_bars_reaches_grouped_daily(
        sandbox: Factory, http: Http) -> None:
    if not REAL_DIR.is_dir():
        pytest.skip("../shared/data/real is absent")
    server = await sandbox(data_dir=REAL_DIR, synthetic=False)
    url = "/v2/aggs/ticker/AAPL/range/1/day/2015-03-02/2015-03-02"
    bar = (await get(http, server, url)).json()["results"][0]
    server.override_bar("AAPL", "day", bar["t"], c=bar["c"] + 1)
    assert (await get(http, server, url)).json()["results"][0]["c"] == bar["c"] + 1
    grouped_url = "/v2/aggs/grouped/locale/us/market/stocks/2015-03-02"
    grouped = (await get(http, server, grouped_url)).json()
    assert grouped["results"][0]["T"] == "AAPL"
    assert grouped["results"][0]["c"] == bar["c"] + 1
