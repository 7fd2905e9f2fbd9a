"""Deterministic synthetic bars for any ticker, computed one bar at a time in O(1).

Prices follow a smooth function of time (a few sines around a per-ticker base price) with
small noise; every random-looking number comes from blake2b of (ticker, ms), so the same
bar comes back from any process, run or machine. A bar never needs the minute bars
inside it, so a page of 10,000 five-minute bars costs about as much as 10,000 minute bars.

The series is one smooth path with no jump at a split: the unadjusted bars ignore splits,
and an :class:`Adjustment` scales each bar as a whole by the splits after the last
session of its bucket (a bucket straddling an execution date is served unscaled).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from polygon_backfill.models import AssetClass, Timespan, asset_class, home_zone
from polygon_backfill.sandbox.buckets import (
    INTRADAY_MS,
    MINUTE_MS,
    Adjustment,
    Bar,
    bucket_days,
    bucket_last_ms,
    daily_bucket,
    local_midnight_ms,
)
from polygon_backfill.sandbox.sessions import overlap, sessions_after, sessions_before

_DAY_MS = 86_400_000
_TAU = 2 * math.pi
_ABSENT_MINUTE = 0.03  # share of stock minutes without a trade
_UNPACK = struct.Struct(">8H").unpack


@dataclass(frozen=True, slots=True)
class _Profile:
    """Per-ticker constants drawn once from the ticker's hash."""

    key: bytes
    kind: AssetClass
    base: float
    phases: tuple[float, float, float, float]
    decimals: int
    volume_per_minute: float
    trade_size: float


@lru_cache(maxsize=4096)
def _profile(ticker: str) -> _Profile:
    key = ticker.encode()
    draws = [value / 65535 for value in _UNPACK(hashlib.blake2b(key, digest_size=16).digest())]
    kind = asset_class(ticker)
    if kind is AssetClass.CRYPTO:
        base, decimals, volume, trade = 10 ** (-1 + 5 * draws[0]), 6, 50.0, 0.05
    elif kind is AssetClass.FOREX:
        base, decimals, volume, trade = 0.5 + 1.5 * draws[0], 5, 300.0, 1.0
    elif kind is AssetClass.INDEX:
        base, decimals, volume, trade = 1000 + 4000 * draws[0], 2, 0.0, 1.0
    else:
        base, decimals, volume, trade = 10 ** (1 + 1.7 * draws[0]), 4, 2000.0, 80.0
    if base < 1 and decimals < 6:
        decimals = 6
    phases = (draws[1] * _TAU, draws[2] * _TAU, draws[3] * _TAU, draws[4] * _TAU)
    volume *= 0.2 + 1.6 * draws[5]
    return _Profile(key, kind, base, phases, decimals, volume, trade)


class SyntheticSource:
    """Bars for tickers without files; nothing before ``start``."""

    def __init__(self, start: date) -> None:
        self.start_ms = local_midnight_ms(start, ZoneInfo("UTC"))

    def select(self, ticker: str, multiplier: int, timespan: Timespan, lo: int, hi: int,
               descending: bool, adjustment: Adjustment | None = None,
               ) -> Iterator[tuple[Bar, int]]:
        """Bars with ``lo <= t <= hi`` in order, each with the base aggregates it consumes;
        split-adjusted by ``adjustment`` when given."""
        keys = _INDEX_KEYS if asset_class(ticker) is AssetClass.INDEX else _KEYS
        found = self._values(ticker, multiplier, timespan, lo, hi, descending)
        if adjustment is not None:
            found = _adjusted(found, ticker, multiplier, timespan, adjustment)
        for values, count in found:
            yield dict(zip(keys, values, strict=True)), count

    def select_json(self, ticker: str, multiplier: int, timespan: Timespan, lo: int,
                    hi: int, adjustment: Adjustment | None = None,
                    ) -> tuple[list[int], list[int], list[str]]:
        """The same bars ascending as ``t``, counts and compact JSON text (what
        ``json.dumps`` makes of the bar: ``%r`` of a float is its repr, as there)."""
        index = asset_class(ticker) is AssetClass.INDEX
        template, at = (_INDEX_JSON, -1) if index else (_JSON, -2)
        ts: list[int] = []
        counts: list[int] = []
        texts: list[str] = []
        found = self._values(ticker, multiplier, timespan, lo, hi, False)
        if adjustment is not None:
            found = _adjusted(found, ticker, multiplier, timespan, adjustment)
        for values, count in found:
            ts.append(int(values[at]))
            counts.append(count)
            texts.append(template % values)
        return ts, counts, texts

    def _values(self, ticker: str, multiplier: int, timespan: Timespan, lo: int, hi: int,
                descending: bool) -> Iterator[tuple[Values, int]]:
        profile = _profile(ticker)
        lo = max(lo, self.start_ms)
        if timespan in INTRADAY_MS:
            width = INTRADAY_MS[timespan] * multiplier
            return self._intraday(profile, width, lo, hi, descending)
        return self._daily(profile, ticker, multiplier, timespan, lo, hi, descending)

    def _intraday(self, profile: _Profile, width: int, lo: int, hi: int,
                  descending: bool) -> Iterator[tuple[Values, int]]:
        minute_bars = width == MINUTE_MS and profile.kind is AssetClass.STOCK
        paint = _Painter(profile).values
        full_minutes = width // MINUTE_MS
        for start, session in _bucket_starts(profile.kind, width, lo, hi, descending):
            a, b = session
            if a <= start and start + width <= b:
                values = paint(start, start, start + width, full_minutes, minute_bars)
                if values is not None:
                    yield values, full_minutes
                continue
            traded = overlap(profile.kind, start, start + width)
            if traded is None:
                continue
            first, last, minutes = traded
            values = paint(start, first, last, minutes, minute_bars)
            if values is not None:
                yield values, minutes

    def _daily(self, profile: _Profile, ticker: str, multiplier: int, timespan: Timespan,
               lo: int, hi: int, descending: bool) -> Iterator[tuple[Values, int]]:
        zone = home_zone(ticker)
        painter = _Painter(profile)
        edge = _ms_date(hi if descending else lo, zone)
        first_day = daily_bucket(edge, multiplier, timespan)
        step = timedelta(days=bucket_days(first_day, multiplier, timespan))
        while True:
            t = local_midnight_ms(first_day, zone)
            if (t < lo) if descending else (t > hi):
                return
            if lo <= t <= hi:
                found = _daily_bar(painter, first_day, step.days, zone)
                if found is not None:
                    yield found
            try:
                first_day = first_day - step if descending else first_day + step
            except OverflowError:  # walked off the calendar (year 1 or 9999)
                return


def _adjusted(found: Iterator[tuple[Values, int]], ticker: str, multiplier: int,
              timespan: Timespan, adjustment: Adjustment) -> Iterator[tuple[Values, int]]:
    """Each bar scaled by the splits after its bucket: prices (and vw) by the price
    factor, volume by the volume factor; ``t`` and ``n`` kept."""
    index = asset_class(ticker) is AssetClass.INDEX
    last = len(adjustment.bounds)
    for values, count in found:
        t = int(values[-1] if index else values[-2])
        k = adjustment.index(bucket_last_ms(ticker, multiplier, timespan, t))
        if k == last:
            yield values, count
            continue
        p = adjustment.prices[k]
        if index:
            o, c, h, lo, t_ = values
            yield (o * p, c * p, h * p, lo * p, t_), count
        else:
            v, vw, o, c, h, lo, t_, n = values
            yield (v * adjustment.volumes[k], vw * p, o * p, c * p, h * p, lo * p, t_, n), count


def _ms_date(ms: int, zone: ZoneInfo) -> date:
    return datetime.fromtimestamp(ms / 1000, tz=zone).date()


def _daily_bar(painter: _Painter, first_day: date, days: int,
               zone: ZoneInfo) -> tuple[Values, int] | None:
    """One day or week bar: opens at the bucket's first trade, closes at its last."""
    first = last = None
    minutes = traded_days = 0
    for offset in range(days):
        day = first_day + timedelta(days=offset)
        start = local_midnight_ms(day, zone)
        end = local_midnight_ms(day + timedelta(days=1), zone)
        traded = overlap(painter.profile.kind, start, end)
        if traded is None:
            continue
        first = traded[0] if first is None else first
        last = traded[1]
        minutes += traded[2]
        traded_days += 1
    if first is None or last is None:
        return None
    t = local_midnight_ms(first_day, zone)
    values = painter.values(t, first, last, minutes, False)
    return (values, traded_days) if values is not None else None


def _bucket_starts(kind: AssetClass, width: int, lo: int, hi: int,
                   descending: bool) -> Iterator[tuple[int, tuple[int, int]]]:
    """Epoch-aligned bucket starts in [lo, hi] overlapping a session, with that session."""
    last: int | None = None
    if not descending:
        for a, b in sessions_after(kind, lo):
            if a - width >= hi:
                return
            start = max(-(-(a - width + 1) // width) * width, -(-lo // width) * width)
            if last is not None and start <= last:
                start = last + width
            while start < b and start <= hi:
                yield start, (a, b)
                last = start
                start += width
        return
    for a, b in sessions_before(kind, hi + width):
        if b <= lo:
            return
        start = min((b - 1) // width * width, hi // width * width)
        if last is not None and start >= last:
            start = last - width
        while start > a - width and start >= lo:
            yield start, (a, b)
            last = start
            start -= width


_SCALE = 1 / 65535

# A bar's values in Polygon's key order; ``t`` is second to last (last for indices).
Values = tuple[float | int, ...]
_KEYS = ("v", "vw", "o", "c", "h", "l", "t", "n")
_INDEX_KEYS = ("o", "c", "h", "l", "t")
_JSON = '{"v":%r,"vw":%r,"o":%r,"c":%r,"h":%r,"l":%r,"t":%r,"n":%r}'
_INDEX_JSON = '{"o":%r,"c":%r,"h":%r,"l":%r,"t":%r}'


class _Painter:
    """Turns (t, first, last, minutes) into a bar's values; remembers the last few points
    so a run of adjacent bars costs one blake2b per bar (a bar's close is the next one's
    open)."""

    __slots__ = ("_hasher", "_points", "profile")

    def __init__(self, profile: _Profile) -> None:
        self.profile = profile
        self._hasher = hashlib.blake2b(profile.key, digest_size=16)
        self._points: dict[int, tuple[tuple[int, ...], float]] = {}

    def point(self, ms: int) -> tuple[tuple[int, ...], float]:
        """Eight deterministic numbers in 0..65535 for (ticker, ms), and the price at ms:
        the smooth path (a few sines) with a little noise from the first number."""
        found = self._points.get(ms)
        if found is None:
            if len(self._points) > 8:
                self._points.clear()
            hasher = self._hasher.copy()
            hasher.update(ms.to_bytes(8, "big", signed=True))
            draws = _UNPACK(hasher.digest())
            turns = _TAU * (ms / _DAY_MS)
            p1, p2, p3, p4 = self.profile.phases
            wave = (0.12 * math.sin(turns / 365.25 + p1) + 0.04 * math.sin(turns / 23.3 + p2)
                    + 0.008 * math.sin(turns + p3) + 0.002 * math.sin(turns * 37.1 + p4))
            noise = draws[0] * _SCALE - 0.5
            price = self.profile.base * (1 + wave) * (1 + 0.0006 * noise)
            found = self._points[ms] = (draws, price)
        return found

    def values(self, t: int, first: int, last: int, minutes: int,
               skip_absent: bool) -> Values | None:
        """The bar starting at ``t`` that trades from ``first`` to ``last`` (ms)."""
        draws, open_ = self.point(t)
        if skip_absent and draws[1] * _SCALE < _ABSENT_MINUTE:
            return None
        if first != t:
            open_ = self.point(first)[1]
        close = self.point(last)[1]
        profile = self.profile
        spread = open_ * 0.0009 * math.sqrt(minutes) * _SCALE
        digits = profile.decimals
        o, c = round(open_, digits), round(close, digits)
        high = round(max(open_, close) + spread * draws[2], digits)
        low = round(max(min(open_, close) - spread * draws[3], min(open_, close) * 0.5), digits)
        h = high if high > o and high > c else max(o, c)
        lo = low if low < o and low < c else min(o, c)
        if profile.kind is AssetClass.INDEX:
            return o, c, h, lo, t
        volume = profile.volume_per_minute * minutes * (0.5 + draws[4] * _SCALE)
        v: float = round(volume, 8) if profile.kind is AssetClass.CRYPTO else max(1, int(volume))
        vw = round(lo + (h - lo) * (0.3 + 0.4 * _SCALE * draws[5]), digits)
        n = max(1, int(v / profile.trade_size * (0.8 + 0.4 * _SCALE * draws[6])))
        return v, min(h, max(lo, vw)), o, c, h, lo, t, n
