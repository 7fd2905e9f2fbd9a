"""Bar buckets shared by the CSV and synthetic sources, so both cut time the same way.

Intraday buckets are aligned to Unix-epoch multiples of their duration; daily buckets are
session dates in the ticker's home zone (``multiplier`` days grouped by date ordinal);
weekly buckets start on Sunday at local midnight.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from polygon_backfill.models import Timespan, datetime_to_ms

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
