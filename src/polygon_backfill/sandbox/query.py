"""Parsing and checking aggregates and splits requests the way Polygon answers them (400 on
nonsense)."""

from __future__ import annotations

import base64
import binascii
import operator
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


def parse_flag(value: str, name: str) -> bool:
    """``true``/``1`` or ``false``/``0`` (any case), else BadRequestError."""
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
                     parse_flag(options.get("adjusted", "true"), "adjusted"), sort == "desc",
                     int(limit_text))


SPLITS_MAX_LIMIT = 1000
SPLITS_DEFAULT_LIMIT = 10
_SPLITS_SORTS = ("execution_date", "ticker")
_COMPARISONS = ("", ".gt", ".gte", ".lt", ".lte")


@dataclass(frozen=True, slots=True)
class SplitsQuery:
    """One validated ``/v3/reference/splits`` request.

    ``tickers`` and ``dates`` are ``(comparison, value)`` filters (comparison ``""`` is
    equality); ``offset`` comes only from a cursor. ``options`` are what a cursor carries.
    """

    tickers: tuple[tuple[str, str], ...]
    dates: tuple[tuple[str, date], ...]
    reverse_split: bool | None
    sort: str
    descending: bool
    limit: int
    offset: int
    options: tuple[tuple[str, str], ...]


def parse_splits(query: Mapping[str, str]) -> SplitsQuery:
    """Validate a splits request (its cursor's options first, then the query's own);
    raise BadRequestError like Polygon does. Unknown parameters are ignored."""
    options = dict(decode_cursor(query["cursor"])) if query.get("cursor") else {}
    offset_text = options.pop("offset", "0")
    options.update({key: value for key, value in query.items()
                    if key not in ("cursor", "offset", "apiKey")})
    if not offset_text.isdigit():
        raise BadRequestError("Invalid cursor.")
    tickers: list[tuple[str, str]] = []
    dates: list[tuple[str, date]] = []
    for op in _COMPARISONS:
        if f"ticker{op}" in options:
            text = options[f"ticker{op}"]
            try:
                tickers.append((op, validate_ticker(text)))
            except ValueError as exc:
                raise BadRequestError(f"Invalid ticker: {text!r}.") from exc
        if f"execution_date{op}" in options:
            text = options[f"execution_date{op}"]
            if not _DATE_RE.fullmatch(text):
                raise BadRequestError(f"Invalid execution_date: {text!r}.")
            try:
                dates.append((op, date.fromisoformat(text)))
            except ValueError as exc:
                raise BadRequestError(f"Invalid execution_date: {text!r}.") from exc
    reverse = (parse_flag(options["reverse_split"], "reverse_split")
               if "reverse_split" in options else None)
    limit_text = options.get("limit", str(SPLITS_DEFAULT_LIMIT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= SPLITS_MAX_LIMIT:
        raise BadRequestError(f"Limit must be an integer between 1 and {SPLITS_MAX_LIMIT}.")
    sort = options.get("sort", "execution_date")
    if sort not in _SPLITS_SORTS:
        raise BadRequestError(f"Sort must be one of {', '.join(_SPLITS_SORTS)}.")
    order = options.get("order", "asc")
    if order not in ("asc", "desc"):
        raise BadRequestError("Order must be 'asc' or 'desc'.")
    return SplitsQuery(tuple(tickers), tuple(dates), reverse, sort, order == "desc",
                       int(limit_text), int(offset_text), tuple(sorted(options.items())))


def matches(op: str, value: date | str, bound: date | str) -> bool:
    """``value op bound`` for a filter's comparison suffix (``""`` is equality)."""
    return bool(_OPERATORS[op](value, bound))


_OPERATORS = {"": operator.eq, ".gt": operator.gt, ".gte": operator.ge, ".lt": operator.lt,
              ".lte": operator.le}
