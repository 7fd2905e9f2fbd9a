"""Bar buckets shared by the CSV and synthetic sources, so both cut time the same way.

Intraday buckets are aligned to Unix-epoch multiples of their duration; daily buckets are
session dates in the ticker's home zone (``multiplier`` days grouped by date ordinal);
weekly buckets start on Sunday at local midnight.

Split adjustment is decided per bucket too (:class:`Adjustment`): a bar is scaled by the
splits executed after the last session its bucket reaches.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from polygon_backfill.models import Split, Timespan, datetime_to_ms, home_zone, session_date

Bar = dict[str, float | int]
"""A bar in Polygon's JSON shape (``v, vw, o, c, h, l, t, n``), ready to serialise."""

MINUTE_MS = 60_000
INTRADAY_MS = {Timespan.MINUTE: MINUTE_MS, Timespan.HOUR: 3_600_000}
ORDER = (Timespan.MINUTE, Timespan.HOUR, Timespan.DAY, Timespan.WEEK)


def is_intraday(timespan: Timespan) -> bool:
    return timespan in INTRADAY_MS


def local_midnight_ms(day: date, zone: ZoneInfo) -> int:
    """Unix ms of ``day``'s midnight in ``zone``."""
    return datetime_to_ms(datetime(day.year, day.month, day.day, tzinfo=zone))


def daily_bucket(day: date, multiplier: int, timespan: Timespan) -> date:
    """First date of the day or week bucket that holds ``day``."""
    if timespan is Timespan.WEEK:
        sunday = day - timedelta(days=day.isoweekday() % 7)
        week = sunday.toordinal() // 7
        return date.fromordinal((week - week % multiplier) * 7)
    ordinal = day.toordinal()
    return date.fromordinal(ordinal - ordinal % multiplier) if multiplier > 1 else day


def bucket_days(start: date, multiplier: int, timespan: Timespan) -> int:
    """Number of calendar days a daily bucket starting at ``start`` spans."""
    return multiplier * (7 if timespan is Timespan.WEEK else 1)


def aggregate(rows: list[Bar], t: int, with_volume: bool) -> Bar:
    """Merge consecutive bars into one: o first, c last, h max, l min, v sum, vw weighted.

    A row without ``vw`` contributes its typical price (h+l+c)/3 to the weighted average.
    """
    bar: Bar = {}
    if with_volume:
        volume = sum(row.get("v", 0.0) for row in rows)
        bar["v"] = volume
        if volume > 0:
            weighted = sum(
                row.get("v", 0.0) * row.get("vw", (row["h"] + row["l"] + row["c"]) / 3)
                for row in rows
            )
            bar["vw"] = round(weighted / volume, 4)
    bar["o"] = rows[0]["o"]
    bar["c"] = rows[-1]["c"]
    bar["h"] = max(row["h"] for row in rows)
    bar["l"] = min(row["l"] for row in rows)
    bar["t"] = t
    trades = [row["n"] for row in rows if "n" in row]
    if with_volume and trades:
        bar["n"] = int(sum(trades))
    return bar


def bucket_last_ms(ticker: str, multiplier: int, timespan: Timespan, t: int) -> int:
    """A moment inside the last local day the bucket starting at ``t`` reaches: its last
    millisecond when intraday, midnight of its last day when daily or weekly (DST-safe)."""
    if timespan in INTRADAY_MS:
        return t + INTRADAY_MS[timespan] * multiplier - 1
    first = session_date(ticker, t)
    last = first + timedelta(days=bucket_days(first, multiplier, timespan) - 1)
    return local_midnight_ms(last, home_zone(ticker))


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One ticker's splits as cumulative factors, hashable so caches can key by it.

    ``bounds`` are the local midnights (Unix ms) of the execution dates, ascending. A bar
    whose bucket ends before ``bounds[k]`` but not before ``bounds[k - 1]`` is adjusted by
    ``prices[k]`` (o, h, l, c, vw) and ``volumes[k]`` (v): the products of
    ``split_from / split_to`` and ``split_to / split_from`` over every later split. The
    last entries are 1.0: bars after every split are served as they are.
    """

    bounds: tuple[int, ...]
    prices: tuple[float, ...]
    volumes: tuple[float, ...]

    @classmethod
    def of(cls, ticker: str, splits: Iterable[Split]) -> Adjustment | None:
        """The adjustment of ``ticker``'s splits, or None when it has none."""
        ordered = sorted(splits)
        if not ordered:
            return None
        zone = home_zone(ticker)
        prices, volumes = [1.0], [1.0]
        for split in reversed(ordered):
            prices.append(split.split_from / split.split_to * prices[-1])
            volumes.append(split.split_to / split.split_from * volumes[-1])
        return cls(tuple(local_midnight_ms(split.execution_date, zone) for split in ordered),
                   tuple(reversed(prices)), tuple(reversed(volumes)))

    @property
    def last_bound(self) -> int:
        """From this moment on nothing is adjusted."""
        return self.bounds[-1]

    def index(self, last_ms: int) -> int:
        """Which factors apply to a bucket whose last day holds ``last_ms``."""
        return bisect_right(self.bounds, last_ms)

    def bar(self, bar: Bar, last_ms: int) -> Bar:
        """``bar`` adjusted (a new dict in the same key order), or ``bar`` itself when no
        split follows it."""
        k = bisect_right(self.bounds, last_ms)
        if k == len(self.bounds):
            return bar
        price, volume = self.prices[k], self.volumes[k]
        out: Bar = {}
        for key, value in bar.items():
            if key in _PRICE_KEYS:
                out[key] = value * price
            elif key == "v":
                out[key] = value * volume
            else:
                out[key] = value
        return out


_PRICE_KEYS = frozenset({"o", "h", "l", "c", "vw"})
