"""Parsing and checking an aggregates request the way Polygon answers it (400 on nonsense)."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from urllib.parse import parse_qsl, urlencode

from polygon_backfill.models import Timespan, home_zone, validate_ticker
from polygon_backfill.sandbox.buckets import local_midnight_ms

MAX_LIMIT = 50_000
DEFAULT_LIMIT = 5_000
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


class BadRequestError(ValueError):
    """A request Polygon would refuse with 400 and ``status: ERROR``."""


@dataclass(frozen=True, slots=True)
class AggsQuery:
    """One validated ``/v2/aggs/ticker/...`` request; ``lo``/``hi`` are inclusive ms."""

    ticker: str
    multiplier: int
    timespan: Timespan
    lo: int
    hi: int
    adjusted: bool
    descending: bool
    limit: int

    def options(self) -> dict[str, str]:
        """The query options a ``next_url`` must carry forward."""
        return {"adjusted": str(self.adjusted).lower(), "limit": str(self.limit),
                "sort": "desc" if self.descending else "asc"}


def encode_cursor(options: Mapping[str, str]) -> str:
    """Opaque cursor: unpadded URL-safe base64 of the options, like Polygon's."""
    return base64.urlsafe_b64encode(urlencode(options).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequestError("Invalid cursor.") from exc
    return dict(parse_qsl(raw))


def parse_bound(text: str, ticker: str, end: bool) -> int:
    """``YYYY-MM-DD`` (a date in the ticker's home zone) or Unix ms, as inclusive ms."""
    if text.isdigit():
        return int(text)
    if not _DATE_RE.fullmatch(text):
        raise BadRequestError(f"Could not parse the time parameter: '{text}'.")
    try:
        day = date.fromisoformat(text)
    except ValueError as exc:
        raise BadRequestError(f"Could not parse the time parameter: '{text}'.") from exc
    if end:
        if day == date.max:
            return local_midnight_ms(day, home_zone(ticker)) + 86_400_000 - 1
        return local_midnight_ms(day + timedelta(days=1), home_zone(ticker)) - 1
    return local_midnight_ms(day, home_zone(ticker))


def _flag(value: str, name: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise BadRequestError(f"Invalid value for '{name}': {value!r}.")


def parse_aggs(match: Mapping[str, str], query: Mapping[str, str]) -> AggsQuery:
    """Validate path segments and query options; raise BadRequestError like Polygon does."""
    try:
        ticker = validate_ticker(match["ticker"])
    except ValueError as exc:
        raise BadRequestError(f"Invalid ticker: {match['ticker']!r}.") from exc
    if not match["multiplier"].isdigit() or int(match["multiplier"]) < 1:
        raise BadRequestError("Multiplier must be a positive integer.")
    try:
        timespan = Timespan(match["timespan"])
    except ValueError as exc:
        raise BadRequestError(f"Unsupported timespan: '{match['timespan']}'.") from exc
    options = dict(decode_cursor(query["cursor"])) if query.get("cursor") else {}
    options.update({key: value for key, value in query.items() if key != "cursor"})
    limit_text = options.get("limit", str(DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
        raise BadRequestError(f"Limit must be an integer between 1 and {MAX_LIMIT}.")
    sort = options.get("sort", "asc")
    if sort not in ("asc", "desc"):
        raise BadRequestError("Sort must be 'asc' or 'desc'.")
    lo = parse_bound(match["from"], ticker, end=False)
    hi = parse_bound(match["to"], ticker, end=True)
    if hi < lo:
        raise BadRequestError("The 'to' date must be after the 'from' date.")
    return AggsQuery(ticker, int(match["multiplier"]), timespan, lo, hi,
                     _flag(options.get("adjusted", "true"), "adjusted"), sort == "desc",
                     int(limit_text))
