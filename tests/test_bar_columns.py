"""Columns of bars read and write exactly as Bar objects do: the same bars one by one, the
same order and deduplication, and byte for byte the same COPY rows."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from polygon_backfill.bar_columns import BarColumns, bar_times, in_time_order, is_in_time_order
from polygon_backfill.errors import StorageError
from polygon_backfill.models import Bar, Timeframe
from polygon_backfill.storage.bar_store import encode_page

M5 = Timeframe.parse("5m")
D1 = Timeframe.parse("1d")


def walk(count: int, *, with_volume: bool = True, seed: int = 3) -> list[Bar]:
    rng = random.Random(seed)
    bars, price = [], 100.0
    for i in range(count):
        price += rng.gauss(0, 0.5)
        low, high = price - rng.random(), price + rng.random()
        bars.append(Bar(1_700_000_000_000 + i * 300_000, round(price, 2), high, low,
                        round(price + 0.1, 2),
                        *((float(rng.randint(0, 10**6)), price, rng.randint(0, 5000))
                          if with_volume else ())))
    return bars


def test_columns_hand_back_the_same_bars() -> None:
    bars = walk(50)
    columns = BarColumns.from_bars(bars)
    assert columns is not None
    assert len(columns) == 50
    assert list(columns) == bars
    assert columns == bars
    assert columns[7] == bars[7]
    assert columns[-1] == bars[-1]
    assert columns[10:12] == bars[10:12]
    assert type(columns[0].t) is int
    assert type(columns[0].trades) is int
    assert type(columns[0].volume) is float


def test_a_value_some_bars_lack_keeps_the_page_as_bars() -> None:
    bars = walk(3)
    mixed = [bars[0], Bar(bars[1].t, 1.0, 2.0, 0.5, 1.5), bars[2]]
    assert BarColumns.from_bars(mixed) is None
    index = BarColumns.from_bars(walk(3, with_volume=False))
    assert index is not None
    assert index.volume is None
    assert index.trades is None


@pytest.mark.parametrize("with_volume", [True, False])
def test_column_rows_are_byte_for_byte_the_rows_of_bars(with_volume: bool) -> None:
    bars = walk(500, with_volume=with_volume)
    columns = BarColumns.from_bars(bars)
    assert columns is not None
    fast, careful = encode_page("X:BTCUSD", M5, columns), encode_page("X:BTCUSD", M5, bars)
    assert bytes(fast.payload) == bytes(careful.payload)
    assert (fast.count, fast.first, fast.last, fast.duplicates) == (
        careful.count, careful.first, careful.last, careful.duplicates) == (
        500, careful.first, careful.last, 0)
    assert careful.first.timestamp() * 1000 == bars[0].t


def test_daily_columns_are_keyed_by_session_like_bars() -> None:
    # New York midnights, one a day (weekends included: they key to their own date)
    daily = [replace(bar, t=1_704_085_200_000 + i * 86_400_000)
             for i, bar in enumerate(walk(40))]
    columns = BarColumns.from_bars(daily)
    assert columns is not None
    assert bytes(encode_page("AAPL", D1, columns).payload) == bytes(
        encode_page("AAPL", D1, daily).payload)


def test_out_of_order_and_duplicate_columns_are_sorted_last_one_wins() -> None:
    bars = walk(5)
    shuffled = [bars[3], bars[0], Bar(bars[3].t, 1.0, 2.0, 0.5, 1.5, 1.0, 1.0, 1), bars[1]]
    columns = BarColumns.from_bars(shuffled)
    assert columns is not None
    assert not is_in_time_order(columns)
    assert [bar.t for bar in in_time_order(columns)] == [bars[0].t, bars[1].t, bars[3].t]
    assert list(bar_times(columns)) == [bars[0].t, bars[1].t, bars[3].t]
    page = encode_page("AAPL", M5, columns)
    assert (page.count, page.duplicates) == (3, 1)
    assert bytes(page.payload) == bytes(encode_page("AAPL", M5, shuffled).payload)
    assert is_in_time_order(BarColumns.from_bars(bars))  # type: ignore[arg-type]


def test_a_time_no_column_can_hold_is_a_storage_error() -> None:
    columns = BarColumns.from_bars(walk(2))
    assert columns is not None
    far = BarColumns(np.array([0, 2**60], dtype=np.int64), columns.open, columns.high,
                     columns.low, columns.close)
    with pytest.raises(StorageError, match="cannot store"):
        encode_page("AAPL", M5, far)


def test_an_empty_page_encodes_to_no_rows() -> None:
    empty = BarColumns.from_bars([])
    assert empty is not None
    assert len(empty) == 0
    assert empty == []
    page = encode_page("AAPL", M5, empty)
    assert page.count == 0
    assert bytes(page.payload) == bytes(encode_page("AAPL", M5, []).payload)
