"""Pure helpers between a half-open time range and Polygon's URLs, kept apart to test alone."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import parse_qsl, unquote, urlsplit

from polygon_backfill.models import (
    Timeframe,
    datetime_to_ms,
    home_zone,
    session_date,
    session_start,
    validate_ticker,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_AGGS_PREFIX = "/v2/aggs/"
_FROM_SEGMENT = re.compile(r"/range/\d+/[a-z]+/([^/]+)/[^/]+$")


def exact_datetime(ms: int) -> datetime:
    """Unix ms to aware UTC without float rounding (coverage bounds must be exact)."""
    return _EPOCH + timedelta(milliseconds=ms)


def series_path(ticker: str, timeframe: Timeframe) -> str:
    """The aggregates path up to ``from``; the ticker goes in raw (``X:BTCUSD``, ``BRK.B``)
    once validated."""
    validate_ticker(ticker)
    return f"/v2/aggs/ticker/{ticker}/range/{timeframe.multiplier}/{timeframe.timespan.value}/"


def aggs_path(ticker: str, timeframe: Timeframe, from_: str, to: str) -> str:
    """The aggregates path of one range."""
    return f"{series_path(ticker, timeframe)}{from_}/{to}"


def range_bounds(ticker: str, timeframe: Timeframe, start: datetime,
                 end: datetime) -> tuple[str, str]:
    """Polygon's inclusive ``from``/``to`` for the half-open ``[start, end)``.

    Intraday: Unix ms, ``to`` = end - 1 ms. Daily and weekly: dates in the ticker's home
    zone, because Polygon anchors those bars to New York (or UTC) midnight.
    """
    last = end - timedelta(milliseconds=1)
    if timeframe.is_daily:
        zone = home_zone(ticker)
        return (start.astimezone(zone).date().isoformat(),
                last.astimezone(zone).date().isoformat())
    return str(datetime_to_ms(start)), str(datetime_to_ms(last))


def range_filter(ticker: str, timeframe: Timeframe, start: datetime,
                 end: datetime) -> Callable[[int], bool]:
    """A predicate on a bar's ``t``: is it inside the range as Polygon was asked for it?"""
    if timeframe.is_daily:
        first, last = (date.fromisoformat(text)
                       for text in range_bounds(ticker, timeframe, start, end))
        return lambda t: first <= session_date(ticker, t) <= last
    start_ms, end_ms = datetime_to_ms(start), datetime_to_ms(end)
    return lambda t: start_ms <= t < end_ms


def local_next_url(next_url: str, series_path: str) -> str:
    """``next_url`` cut down to its aggregates path and query, for our own base URL.

    Its scheme, host and port are dropped (never follow a foreign host), and so is any
    ``apiKey`` parameter (auth travels in the header). Raises ValueError if it is not an
    aggregates URL of the same series (``series_path``: ``/v2/aggs/ticker/T/range/M/S/``):
    another ticker's or timespan's bars must never be stored under this one.
    """
    parts = urlsplit(next_url.strip())
    at = parts.path.find(_AGGS_PREFIX)
    if at < 0 or ".." in parts.path:
        raise ValueError("next_url is not an aggregates URL")
    if not parts.path[at:].startswith(series_path):
        raise ValueError("next_url leaves the series being fetched")
    kept = [piece for piece in parts.query.split("&")
            if piece and unquote(piece.split("=", 1)[0]).lower() != "apikey"]
    path = parts.path[at:]
    return f"{path}?{'&'.join(kept)}" if kept else path


def local_reference_url(next_url: str, path: str, ticker: str) -> str:
    """A reference list's ``next_url`` (``path``: ``/v3/reference/splits``) cut down to its
    path and query, for our own base URL: scheme, host, port and ``apiKey`` dropped, as
    :func:`local_next_url` does. Raises ValueError if it names another endpoint, or a
    ``ticker`` other than ``ticker`` (its cursor is opaque; a ticker in the clear is not).
    """
    parts = urlsplit(next_url.strip())
    at = parts.path.find(path)
    if at < 0 or ".." in parts.path or parts.path[at:] != path:
        raise ValueError(f"next_url is not a {path} URL")
    kept = [piece for piece in parts.query.split("&")
            if piece and unquote(piece.split("=", 1)[0]).lower() != "apikey"]
    named = {value for key, value in parse_qsl(parts.query) if key == "ticker"}
    if named and named != {ticker}:
        raise ValueError("next_url leaves the ticker being fetched")
    return f"{path}?{'&'.join(kept)}" if kept else path


def url_key(url: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A relative URL's path and sorted query pairs: equal for the same page however its
    parameters are ordered or escaped."""
    parts = urlsplit(url)
    return parts.path, tuple(sorted(parse_qsl(parts.query, keep_blank_values=True)))


def from_of(url: str, ticker: str) -> datetime | None:
    """The moment a page URL starts at (its ``from`` segment), or None if unreadable."""
    match = _FROM_SEGMENT.search(urlsplit(url).path)
    if match is None:
        return None
    segment = match.group(1)
    if segment.isdigit():
        return exact_datetime(int(segment))
    try:
        return session_start(ticker, date.fromisoformat(segment))
    except ValueError:
        return None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None
