"""Domain values shared by every step: tickers, timeframes, bars and time ranges.

Times are always timezone-aware UTC ``datetime`` objects or Unix milliseconds; a daily or
longer bar is identified by its *session date* in the ticker's home zone (New York for
stocks and indices, UTC for crypto and forex), never by its raw timestamp.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

NEW_YORK = ZoneInfo("America/New_York")

_TICKER_RE = re.compile(r"^(?:[XCI]:)?[A-Za-z0-9][A-Za-z0-9.\-]{0,31}$")


class AssetClass(StrEnum):
    """What a ticker trades as; decides its calendar and its daily-bar time zone."""

    STOCK = "stock"
    CRYPTO = "crypto"
    FOREX = "forex"
    INDEX = "index"


def validate_ticker(ticker: str) -> str:
    """Return ``ticker`` unchanged if it is safe to put into a URL path, else raise ValueError.

    Dots (``BRK.B``) and the ``X:``/``C:``/``I:`` prefixes are kept as they are; slashes,
    ``?``, ``..``, whitespace and empty strings are refused.
    """
    if not isinstance(ticker, str) or not _TICKER_RE.fullmatch(ticker) or ".." in ticker:
        raise ValueError(f"invalid ticker {ticker!r}")
    return ticker


def asset_class(ticker: str) -> AssetClass:
    """Classify a ticker by its Polygon prefix."""
    if ticker.startswith("X:"):
        return AssetClass.CRYPTO
    if ticker.startswith("C:"):
        return AssetClass.FOREX
    if ticker.startswith("I:"):
        return AssetClass.INDEX
    return AssetClass.STOCK


def home_zone(ticker: str) -> ZoneInfo:
    """The zone Polygon anchors this ticker's daily bars to (pitfall 7)."""
    if asset_class(ticker) in (AssetClass.CRYPTO, AssetClass.FOREX):
        return ZoneInfo("UTC")
    return NEW_YORK


class Timespan(StrEnum):
    """Polygon's aggregate timespans that this daemon stores."""

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"


_TIMESPAN_BY_SUFFIX = {"m": Timespan.MINUTE, "h": Timespan.HOUR, "d": Timespan.DAY,
                       "w": Timespan.WEEK}
_SPAN_MS = {Timespan.MINUTE: 60_000, Timespan.HOUR: 3_600_000, Timespan.DAY: 86_400_000,
            Timespan.WEEK: 7 * 86_400_000}


@dataclass(frozen=True, slots=True)
class Timeframe:
    """A bar size such as ``5m`` or ``1d``: Polygon's ``multiplier`` and ``timespan``."""

    multiplier: int
    timespan: Timespan

    @classmethod
    def parse(cls, text: str) -> Timeframe:
        """Parse ``1m``, ``5m``, ``1h``, ``4h``, ``1d``, ``1w`` and the like."""
        match = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text or "")
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"invalid timeframe {text!r} (expected e.g. 1m, 5m, 1h, 1d, 1w)")
        multiplier, timespan = int(match.group(1)), _TIMESPAN_BY_SUFFIX[match.group(2)]
        if timespan in (Timespan.DAY, Timespan.WEEK) and multiplier != 1:
            # Where Polygon starts a 2-day or 2-week bucket is not documented; a guess would
            # key bars on the wrong sessions. Minutes and hours of any size are fine.
            raise ValueError(f"invalid timeframe {text!r}: days and weeks only as 1d and 1w")
        return cls(multiplier, timespan)

    @property
    def name(self) -> str:
        return f"{self.multiplier}{self.timespan.value[0]}"

    @property
    def is_daily(self) -> bool:
        """Daily and longer bars are keyed by session date, not by raw timestamp."""
        return self.timespan in (Timespan.DAY, Timespan.WEEK)

    @property
    def duration(self) -> timedelta:
        """Nominal length of one bar."""
        return timedelta(milliseconds=_SPAN_MS[self.timespan] * self.multiplier)

    def __str__(self) -> str:
        return self.name


def ms_to_datetime(ms: int) -> datetime:
    """Unix milliseconds to an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def datetime_to_ms(moment: datetime) -> int:
    """Aware datetime to Unix milliseconds (exact, no float rounding)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def session_date(ticker: str, ms: int) -> date:
    """The trading session a daily bar belongs to, from any timestamp inside that day.

    Polygon stamps a per-ticker daily bar at local midnight and a grouped-daily bar at 16:00
    New York; both map to the same session date here.
    """
    return ms_to_datetime(ms).astimezone(home_zone(ticker)).date()


def session_start(ticker: str, day: date) -> datetime:
    """Midnight of ``day`` in the ticker's home zone, as UTC: the canonical daily bar time."""
    local = datetime(day.year, day.month, day.day, tzinfo=home_zone(ticker))
    return local.astimezone(UTC)


def canonical_bar_time(ticker: str, timeframe: Timeframe, ms: int) -> datetime:
    """The time a bar is stored under: its start for intraday bars, its session's midnight
    in the home zone for daily and weekly bars."""
    if timeframe.is_daily:
        return session_start(ticker, session_date(ticker, ms))
    return ms_to_datetime(ms)


@dataclass(frozen=True, slots=True)
class Bar:
    """One validated OHLCV bar. ``t`` is Polygon's window start in Unix ms UTC; ``volume``,
    ``vwap`` and ``trades`` are None where Polygon leaves them out (indices, some bars)."""

    t: int
    open: float
    high: float
    low: float
    close: float
    volume: float | None = None
    vwap: float | None = None
    trades: int | None = None


@dataclass(frozen=True, slots=True, order=True)
class Split:
    """One stock split as Polygon's splits reference lists it: from the session of
    ``execution_date`` on, ``split_from`` old shares are ``split_to`` new ones (AAPL on
    2020-08-31: 1 -> 4; a reverse split has ``split_from > split_to``).

    Adjusted bars of the sessions before ``execution_date`` carry prices times
    ``split_from / split_to`` and volumes times ``ratio``. Orders by date first.
    """

    execution_date: date
    split_from: float
    split_to: float

    def __post_init__(self) -> None:
        for name in ("split_from", "split_to"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"split {name} must be a positive finite number, got {value!r}")

    @property
    def ratio(self) -> float:
        """New shares per old share: 4.0 for a 4-for-1 split, 0.1 for a 1-for-10 reverse."""
        return self.split_to / self.split_from


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A half-open interval ``[start, end)`` of aware UTC datetimes."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("TimeRange needs timezone-aware datetimes")
        if self.end < self.start:
            raise ValueError(f"TimeRange end {self.end} is before start {self.start}")

    @property
    def empty(self) -> bool:
        return self.end <= self.start


def merge_ranges(ranges: Iterable[TimeRange]) -> list[TimeRange]:
    """Sorted, merged intervals: overlapping or touching ranges join, empty ones vanish."""
    merged: list[TimeRange] = []
    for current in sorted((r for r in ranges if not r.empty), key=lambda r: (r.start, r.end)):
        if merged and current.start <= merged[-1].end:
            if current.end > merged[-1].end:
                merged[-1] = TimeRange(merged[-1].start, current.end)
        else:
            merged.append(current)
    return merged
