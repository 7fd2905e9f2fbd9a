"""The fast reading of aggregates answers agrees with the careful one, and steps aside
(returns None) for every body the careful one must judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic_core import from_json

from polygon_backfill.clients.responses import parse_aggregates, parse_aggregates_fast
from tests.support import FIXTURES

BAR = {"t": 1_600_000_000_000, "o": 10.0, "h": 11.0, "l": 9.5, "c": 10.5, "v": 1.029145e06,
       "vw": 10.2, "n": 812}


def body(*bars: dict[str, object], **top: object) -> bytes:
    return json.dumps({"status": "OK", "resultsCount": len(bars), "results": list(bars),
                       **top}).encode()


@pytest.mark.parametrize("name", sorted(path.name for path in FIXTURES.glob("*aggs*.json"))
                         if FIXTURES.is_dir() else [])
def test_recorded_answers_read_the_same_both_ways(name: str) -> None:
    content = (FIXTURES / name).read_bytes()
    fast = parse_aggregates_fast(content)
    careful = parse_aggregates(from_json(content, allow_inf_nan=True))
    assert fast is not None
    assert fast[1].bars == careful[1].bars
    assert fast[1].bars  # the fixture holds bars
    assert (fast[0].next_url, fast[0].results_count, fast[0].query_count) == (
        careful[0].next_url, careful[0].results_count, careful[0].query_count)


def test_index_bars_without_volume_and_whole_float_counts() -> None:
    index_bar = {key: BAR[key] for key in "tohlc"}
    read = parse_aggregates_fast(body(index_bar, {**index_bar, "t": 1.6000000003e12}))
    assert read is not None
    first, second = read[1].bars
    assert (first.volume, first.vwap, first.trades) == (None, None, None)
    assert second.t == 1_600_000_000_300
    read = parse_aggregates_fast(body({**BAR, "n": 812.0, "t": 1.6000000003e12}))
    assert read is not None
    (only,) = read[1].bars
    assert (only.t, only.trades) == (1_600_000_000_300, 812)
    assert [type(only.t), type(only.trades), type(only.open)] == [int, int, float]


@pytest.mark.parametrize(("content", "why"), [
    (body({**BAR, "h": 9.0}), "high below low"),
    (body({**BAR, "v": -1}), "negative volume"),
    (body({**BAR, "n": 812.5}), "fractional trade count"),
    (body({**BAR, "o": "10"}), "price as a string"),
    (body({**BAR, "n": "812"}), "count as a string"),
    (body({**BAR, "t": "1600000000000"}), "time as a string"),
    (body({k: v for k, v in BAR.items() if k != "c"}), "missing close"),
    (b'{"status":"OK","results":[{"t":1,"o":NaN,"h":1,"l":1,"c":1}]}', "NaN"),
    (body(BAR, status="ERROR"), "failure status"),
    (body(BAR, {key: BAR[key] for key in "tohlc"}), "volume in one bar, not the other"),
    (body({**BAR, "t": 1.6e12 + 0.5}), "fractional time"),
    (body({**BAR, "o": True}), "price as a boolean"),
    (body({**BAR, "v": 1e400}), "infinite volume"),
    (body({**BAR, "t": 2**60}), "time beyond exact floats"),
    (b'{"status":"OK","results":null}', "results null"),
    (b'{"status":"OK","result\\u0073":null}', "results null, the key escaped"),
    (body(BAR, request_id=1), "a request id that is not a string"),
    (b'{"status":"OK","results":[', "truncated"),
])
def test_anything_unusual_is_left_to_the_careful_reading(content: bytes, why: str) -> None:
    assert parse_aggregates_fast(content) is None, why


def test_no_results_key_is_an_empty_page() -> None:
    read = parse_aggregates_fast(b'{"status":"DELAYED","queryCount":0,"resultsCount":0}')
    assert read is not None
    assert read[1].bars == []
    assert not read[0].results_null


def test_fixture_directory_is_present_or_skipped() -> None:
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is absent")
    assert list(Path(FIXTURES).glob("*.json"))
