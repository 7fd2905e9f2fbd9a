"""Bars from CSV files in ``data_dir``, loaded lazily per ticker and cached.

A file is ``{TICKER}.{timespan}.csv`` (``I-SPX.minute.csv`` is ``I:SPX``) with columns
``t,o,h,l,c,v[,vw,n]``. Rows served at their own timespan pass through unchanged, so an
end-to-end test can compare stored values to the file value by value; coarser bars are
aggregated once per (ticker, multiplier, timespan) and then selected with bisect.
Each bar's JSON text is kept beside it, so a page is a join of strings.

Split-adjusted series (``adjustment``) are built like Polygon builds them: every file row
is adjusted by the splits after its session, then coarser bars are aggregated from the
adjusted rows. A ticker without splits has one series for both ``adjusted`` values.
"""

from __future__ import annotations

import csv
import json
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from itertools import groupby
from pathlib import Path

from polygon_backfill.models import (
    AssetClass,
    Timespan,
    asset_class,
    home_zone,
    session_date,
    validate_ticker,
)
from polygon_backfill.sandbox.buckets import (
    INTRADAY_MS,
    ORDER,
    Adjustment,
    Bar,
    aggregate,
    bucket_last_ms,
    daily_bucket,
    is_intraday,
    local_midnight_ms,
)

_ROW_COUNT = {Timespan.MINUTE: 1, Timespan.HOUR: 60, Timespan.DAY: 1, Timespan.WEEK: 5}
_PRICE_FIELDS = frozenset("ohlc")
_VOLUME_FIELDS = frozenset({"v", "vw", "n"})


@dataclass(frozen=True, slots=True)
class Series:
    """Bars sorted by ``t`` with the base aggregates each one consumes (for ``limit``)
    and their compact JSON text (what the server sends)."""

    ts: list[int]
    bars: list[Bar]
    counts: list[int]
    texts: list[str]

    @classmethod
    def of(cls, bars: list[Bar], counts: list[int]) -> Series:
        texts = [json.dumps(bar, separators=(",", ":")) for bar in bars]
        return cls([int(bar["t"]) for bar in bars], bars, counts, texts)

    def rows(self, lo: int, hi: int, descending: bool) -> Iterator[tuple[int, int, str]]:
        """``(t, count, text)`` of the bars with ``lo <= t <= hi`` in the requested order."""
        first, stop = bisect_left(self.ts, lo), bisect_right(self.ts, hi)
        order = range(stop - 1, first - 1, -1) if descending else range(first, stop)
        ts, counts, texts = self.ts, self.counts, self.texts
        for index in order:
            yield ts[index], counts[index], texts[index]

    def select(self, lo: int, hi: int, descending: bool) -> Iterator[tuple[Bar, int]]:
        """Bars with ``lo <= t <= hi`` in the requested order; O(bars taken)."""
        first, stop = bisect_left(self.ts, lo), bisect_right(self.ts, hi)
        order = range(stop - 1, first - 1, -1) if descending else range(first, stop)
        for index in order:
            yield self.bars[index], self.counts[index]


def ticker_from_filename(name: str) -> tuple[str, Timespan] | None:
    """``I-SPX.minute.csv`` -> ``("I:SPX", Timespan.MINUTE)``; None for other files."""
    if not name.endswith(".csv") or name.count(".") < 2:
        return None
    stem, _, span = name[: -len(".csv")].rpartition(".")
    if span not in Timespan.__members__.values():
        return None
    if len(stem) > 2 and stem[0] in "XCI" and stem[1] == "-":
        stem = f"{stem[0]}:{stem[2:]}"
    try:
        return validate_ticker(stem), Timespan(span)
    except ValueError:
        return None


def _parse_file(path: Path, with_volume: bool) -> list[Bar]:
    """Rows as Polygon bars, keeping each number exactly as the CSV text parses."""
    bars: list[Bar] = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            bar: Bar = {}
            if with_volume:
                bar["v"] = float(row["v"])
                if row.get("vw"):
                    bar["vw"] = float(row["vw"])
            bar["o"] = float(row["o"])
            bar["c"] = float(row["c"])
            bar["h"] = float(row["h"])
            bar["l"] = float(row["l"])
            bar["t"] = int(row["t"])
            if with_volume and row.get("n"):
                bar["n"] = int(float(row["n"]))
            bars.append(bar)
    bars.sort(key=lambda bar: bar["t"])
    return bars


class Dataset:
    """The CSV files of one directory, indexed at start and parsed on first use."""

    def __init__(self, data_dir: Path | None) -> None:
        self._files: dict[str, dict[Timespan, Path]] = {}
        self._rows: dict[tuple[str, Timespan], list[Bar]] = {}
        self._series: dict[tuple[str, int, Timespan, Adjustment | None], Series | None] = {}
        if data_dir is not None:
            for path in sorted(Path(data_dir).glob("*.csv")):
                parsed = ticker_from_filename(path.name)
                if parsed is not None:
                    self._files.setdefault(parsed[0], {})[parsed[1]] = path

    def tickers(self) -> list[str]:
        """Every ticker that has at least one file."""
        return sorted(self._files)

    def series(self, ticker: str, multiplier: int, timespan: Timespan,
               adjustment: Adjustment | None = None) -> Series | None:
        """The bars for this request (split-adjusted by ``adjustment`` when given), or
        None when no file can build them."""
        key = (ticker, multiplier, timespan, adjustment)
        if key not in self._series:
            self._series[key] = self._build(ticker, multiplier, timespan, adjustment)
        return self._series[key]

    def forget(self, ticker: str) -> None:
        """Drop every series built for ``ticker`` (answers already sent keep theirs)."""
        self._series = {key: found for key, found in self._series.items() if key[0] != ticker}

    def override(self, ticker: str, timespan: Timespan, t: int, values: dict[str, float]) -> None:
        """Change one file row's values from now on (a correction, as Polygon publishes them).

        The row is replaced, never mutated, so answers already built keep their values;
        cached aggregates of the ticker are dropped so coarser bars reflect the change.
        """
        if timespan not in self._files.get(ticker, {}):
            raise LookupError(f"no {timespan.value} file for {ticker!r} in the dataset")
        allowed = _PRICE_FIELDS | (
            _VOLUME_FIELDS if asset_class(ticker) is not AssetClass.INDEX else frozenset())
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"cannot override {unknown} of {ticker!r}; allowed: {sorted(allowed)}")
        rows = self._rows_of(ticker, timespan)
        index = bisect_left([int(row["t"]) for row in rows], t)
        if index == len(rows) or int(rows[index]["t"]) != t:
            raise LookupError(f"{ticker!r} has no {timespan.value} bar at t={t}")
        clean = {key: int(value) if key == "n" else float(value) for key, value in values.items()}
        rows[index] = {**rows[index], **clean}
        self.forget(ticker)

    def _base(self, ticker: str, timespan: Timespan) -> Timespan | None:
        """The file to build from: the same timespan if present, else the finest that can."""
        files = self._files.get(ticker, {})
        if timespan in files:
            return timespan
        usable = [span for span in ORDER[: ORDER.index(timespan)] if span in files]
        if is_intraday(timespan):
            usable = [span for span in usable if is_intraday(span)]
        return usable[0] if usable else None

    def _rows_of(self, ticker: str, base: Timespan) -> list[Bar]:
        key = (ticker, base)
        if key not in self._rows:
            with_volume = asset_class(ticker) is not AssetClass.INDEX
            self._rows[key] = _parse_file(self._files[ticker][base], with_volume)
        return self._rows[key]

    def _build(self, ticker: str, multiplier: int, timespan: Timespan,
               adjustment: Adjustment | None) -> Series | None:
        base = self._base(ticker, timespan)
        if base is None:
            return None
        rows = self._rows_of(ticker, base)
        if adjustment is not None:
            rows = [adjustment.bar(row, bucket_last_ms(ticker, 1, base, int(row["t"])))
                    for row in rows]
        unit = _ROW_COUNT[base]
        if base is timespan and multiplier == 1:
            return Series.of(rows, [unit] * len(rows))
        with_volume = asset_class(ticker) is not AssetClass.INDEX
        zone = home_zone(ticker)
        bars: list[Bar] = []
        counts: list[int] = []
        if is_intraday(timespan):
            width = INTRADAY_MS[timespan] * multiplier
            for start, group in groupby(rows, key=lambda row: int(row["t"]) // width * width):
                members = list(group)
                bars.append(aggregate(members, start, with_volume))
                counts.append(unit * len(members))
        else:
            def bucket(row: Bar) -> date:
                return daily_bucket(session_date(ticker, int(row["t"])), multiplier, timespan)

            for first, group in groupby(rows, key=bucket):
                members = list(group)
                bars.append(aggregate(members, local_midnight_ms(first, zone), with_volume))
                if is_intraday(base):
                    days = {session_date(ticker, int(row["t"])) for row in members}
                    counts.append(len(days))
                else:
                    counts.append(unit * len(members))
        return Series.of(bars, counts)
