"""A page of bars as columns: what the fast reader makes of an ordinary answer.

The best mode spends most of its own CPU on bars: reading them out of JSON, checking them
and encoding them for COPY. One Python object per bar (and one float object per value)
costs microseconds a bar; numpy columns let the checks and the COPY rows run as array
operations, at a fraction of that and of the memory. :class:`BarColumns` is still a
``Sequence[Bar]``, so any code that reads a page bar by bar (the careful paths, tests)
works on it unchanged; the hot paths ask :func:`is_in_time_order` and :func:`bar_times`,
which answer from the columns without building a Bar.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from polygon_backfill.models import Bar

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

SAFE_INTEGER = 2**53
"""Whole numbers below this hold exactly in a float, and as Unix ms their microseconds fit
in int64 (which wraps from 9.2e15 ms)."""


class MixedPresenceError(ValueError):
    """An optional value present in some bars of a page and absent from others."""


def optional_column(values: list[float | None], dtype: type[np.generic]) -> npt.NDArray[Any] | None:
    """An optional value of every bar as a column: None when no bar has it. A page where
    some bars have it and others not raises :class:`MixedPresenceError`: it stays Bars."""
    if None not in values:
        return np.array(values, dtype=dtype)
    if any(value is not None for value in values):
        raise MixedPresenceError("a value present in some bars only")
    return None


@dataclass(frozen=True, slots=True, eq=False)
class BarColumns(Sequence[Bar]):
    """Bars as equal-length columns: ``t`` in Unix ms, prices, and each of ``volume``,
    ``vwap`` and ``trades`` either a whole column or None (absent from every bar, as for
    indices). A page where some bars lack a value and others have it stays a list of Bars."""

    t: Ints
    open: Floats
    high: Floats
    low: Floats
    close: Floats
    volume: Floats | None = None
    vwap: Floats | None = None
    trades: Ints | None = None

    @classmethod
    def from_bars(cls, bars: Sequence[Bar]) -> BarColumns | None:
        """``bars`` as columns, or None when an optional value is present in some bars only."""
        try:
            volume = optional_column([bar.volume for bar in bars], np.float64)
            vwap = optional_column([bar.vwap for bar in bars], np.float64)
            trades = optional_column([bar.trades for bar in bars], np.int64)
        except MixedPresenceError:
            return None
        return cls(np.array([bar.t for bar in bars], dtype=np.int64),
                   np.array([bar.open for bar in bars], dtype=np.float64),
                   np.array([bar.high for bar in bars], dtype=np.float64),
                   np.array([bar.low for bar in bars], dtype=np.float64),
                   np.array([bar.close for bar in bars], dtype=np.float64),
                   volume, vwap, trades)

    def __len__(self) -> int:
        return len(self.t)

    @overload
    def __getitem__(self, index: int) -> Bar: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Bar]: ...

    def __getitem__(self, index: int | slice) -> Bar | Sequence[Bar]:
        if isinstance(index, slice):
            return list(self)[index]
        return Bar(int(self.t[index]), float(self.open[index]), float(self.high[index]),
                   float(self.low[index]), float(self.close[index]),
                   None if self.volume is None else float(self.volume[index]),
                   None if self.vwap is None else float(self.vwap[index]),
                   None if self.trades is None else int(self.trades[index]))

    def __iter__(self) -> Iterator[Bar]:
        count = len(self.t)
        absent = [None] * count
        columns = (self.t, self.open, self.high, self.low, self.close, self.volume,
                   self.vwap, self.trades)
        lists = [absent if column is None else column.tolist() for column in columns]
        return (Bar(*values) for values in zip(*lists, strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other,
                                                                       strict=True))

    __hash__ = None  # type: ignore[assignment]  # equal to lists, so not hashable


def is_in_time_order(bars: Sequence[Bar]) -> bool:
    """Whether ``t`` strictly increases along ``bars`` (sorted, no duplicates)."""
    if isinstance(bars, BarColumns):
        return bool(np.all(bars.t[1:] > bars.t[:-1]))
    return all(a.t < b.t for a, b in pairwise(bars))


def in_time_order(bars: Sequence[Bar]) -> Sequence[Bar]:
    """``bars`` by ``t``, one per ``t`` (the last one wins). An answer is nearly always in
    order already: then it is returned as it is, after one cheap pass to make sure."""
    if is_in_time_order(bars):
        return bars
    by_t = {bar.t: bar for bar in bars}
    return [by_t[t] for t in sorted(by_t)]


def bar_times(bars: Sequence[Bar]) -> Sequence[int]:
    """The ``t`` of each bar of :func:`in_time_order` ``(bars)``, ascending, for bisecting."""
    ordered = in_time_order(bars)
    if isinstance(ordered, BarColumns):
        return ordered.t  # type: ignore[return-value]
    return [bar.t for bar in ordered]
