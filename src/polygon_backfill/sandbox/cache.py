"""Synthetic bars kept as JSON text, so a repeated request costs a join, not a recompute.

The speed benchmark asks one sandbox for the same bars once per mode, cut into different
``from``/``to`` splits and pages. Computing a bar (a blake2b, four sines, six rounds) and
formatting it costs several microseconds; its cached text costs a list lookup. Bars are
generated per block of whole buckets aligned to the epoch, so every split of a range hits
the same blocks, and a block's bars are a pure function of (ticker, multiplier, timespan,
t): caching them cannot change an answer. Least recently used blocks go first once the
cached text passes a byte budget (the bench's 300-day workload, ~1.8M bars, fits).

Split-adjusted blocks are keyed by the ticker's :class:`Adjustment` (its whole split list),
so a new split can never serve stale text: the old blocks just age out. A block that
starts after the last execution date is the unadjusted one, shared by both.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from polygon_backfill.models import Timespan
from polygon_backfill.sandbox.buckets import INTRADAY_MS, Adjustment
from polygon_backfill.sandbox.synthetic import SyntheticSource

DEFAULT_BUDGET_BYTES = 512 * 1024 * 1024
_DAY_MS = 86_400_000
# Buckets per block: enough that per-block overhead vanishes, few enough that the partial
# blocks at a range's edges cost little extra (a day bar costs ~3x an intraday one).
_INTRADAY_BLOCK = 64
_DAILY_BLOCK = 16
_BAR_OVERHEAD = 80  # bytes per cached bar besides its text: str header, list slot, arrays

Row = tuple[int, int, str]
"""One bar as served: ``t``, the base aggregates it consumes, its JSON text."""
_Key = tuple[str, int, Timespan, int, Adjustment | None]


@dataclass(frozen=True, slots=True)
class _Block:
    ts: array[int]
    counts: array[int]
    texts: list[str]
    size: int


def block_ms(multiplier: int, timespan: Timespan) -> int:
    """A block's length: whole buckets (day buckets nominally 24 h; any t-filter works)."""
    if timespan in INTRADAY_MS:
        return INTRADAY_MS[timespan] * multiplier * _INTRADAY_BLOCK
    days = 7 if timespan is Timespan.WEEK else 1
    return _DAY_MS * days * multiplier * _DAILY_BLOCK


class SyntheticCache:
    """``SyntheticSource`` bars as rows, computed once per block and kept within a budget."""

    def __init__(self, source: SyntheticSource,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self._source = source
        self._budget = budget_bytes
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()
        self.size = 0

    def select(self, ticker: str, multiplier: int, timespan: Timespan, lo: int, hi: int,
               descending: bool, adjustment: Adjustment | None = None) -> Iterator[Row]:
        """Rows with ``lo <= t <= hi`` in the requested order, split-adjusted by
        ``adjustment`` when given; lazy, so a short page only builds the blocks it
        reaches."""
        lo = max(lo, self._source.start_ms)
        span = block_ms(multiplier, timespan)
        numbers = range(lo // span, hi // span + 1)
        for number in reversed(numbers) if descending else numbers:
            scaled = adjustment
            if scaled is not None and number * span >= scaled.last_bound:
                scaled = None  # every bar of the block ends after the last split
            block = self._block((ticker, multiplier, timespan, number, scaled), span)
            first, stop = bisect_left(block.ts, lo), bisect_right(block.ts, hi)
            order = range(stop - 1, first - 1, -1) if descending else range(first, stop)
            ts, counts, texts = block.ts, block.counts, block.texts
            for index in order:
                yield ts[index], counts[index], texts[index]

    def _block(self, key: _Key, span: int) -> _Block:
        found = self._blocks.get(key)
        if found is not None:
            self._blocks.move_to_end(key)
            return found
        ticker, multiplier, timespan, number, adjustment = key
        ts, counts, texts = self._source.select_json(
            ticker, multiplier, timespan, number * span, (number + 1) * span - 1, adjustment)
        size = sum(map(len, texts)) + _BAR_OVERHEAD * len(texts)
        block = _Block(array("q", ts), array("q", counts), texts, size)
        self._blocks[key] = block
        self.size += size
        while self.size > self._budget and len(self._blocks) > 1:
            self.size -= self._blocks.popitem(last=False)[1].size
        return block
