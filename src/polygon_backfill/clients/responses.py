"""Pydantic models for Polygon's aggregates answers, and the checks that decide what to keep.

Two kinds of trouble are told apart on purpose (pitfall 3):

- a *malformed* body (not an object, no ``status``, ``results`` not a list, a bar missing
  ``o``/``h``/``l``/``c``/``t``) raises :class:`PayloadError`; the client retries it and
  never takes it for "no data";
- an *invalid bar* in a well-formed body (high below low, a non-finite number, a negative
  volume) is dropped and counted; the rest are kept. An open or close outside [low, high]
  is kept: real vendor series contain such bars (two in SPY's daily history), and a
  backfill must store the source as it is.

The splits reference (``/v3/reference/splits``) is held to the same rule: a result without
a valid ISO ``execution_date`` or with a ratio that is not a positive number makes the
whole body malformed, since a split list is only worth comparing when it is whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Final

import msgspec
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polygon_backfill.bar_columns import (
    SAFE_INTEGER,
    BarColumns,
    MixedPresenceError,
    is_in_time_order,
    optional_column,
)
from polygon_backfill.errors import MalformedResponseError
from polygon_backfill.models import Bar, Split

SUCCESS_STATUSES = frozenset({"OK", "DELAYED"})
NOT_AUTHORIZED = "NOT_AUTHORIZED"


class PayloadError(ValueError):
    """The body is not a well-formed aggregates answer; the text says where it broke."""


class AggregatesResponse(BaseModel):
    """The top level of ``/v2/aggs/ticker/...``. Counts are optional (indices lack some).

    ``results`` stays a plain list here: its bars are read by :func:`read_bars`, a loop
    about five times faster than a pydantic model per bar, which matters at 50,000 bars a
    page (the daemon's CPU is what the best mode spends most on).
    """

    model_config = ConfigDict(extra="ignore")

    status: str
    ticker: str | None = None
    query_count: int | None = Field(default=None, alias="queryCount")
    results_count: int | None = Field(default=None, alias="resultsCount")
    adjusted: bool | None = None
    request_id: str | None = None
    results: list[Any] | None = None
    next_url: str | None = None

    @property
    def results_null(self) -> bool:
        """``"results": null`` written out, as opposed to the key being absent."""
        return self.results is None and "results" in self.model_fields_set


class GroupedDailyResponse(BaseModel):
    """The top level of ``/v2/aggs/grouped/locale/us/market/stocks/{date}``."""

    model_config = ConfigDict(extra="ignore")

    status: str
    results: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class ReadBars:
    """A page's bars: the sound ones in answer order, and ``(t, reason)`` of the others."""

    bars: Sequence[Bar]
    unsound: list[tuple[int, str]]


_NUMBERS = (int, float)


def _number(raw: dict[str, Any], key: str, index: int) -> float:
    value = raw[key]
    if type(value) not in _NUMBERS:
        raise PayloadError(f"results.{index}.{key}: not a number ({type(value).__name__})")
    return float(value)


def _optional(raw: dict[str, Any], key: str, index: int) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if type(value) not in _NUMBERS:
        raise PayloadError(f"results.{index}.{key}: not a number ({type(value).__name__})")
    return float(value)


def read_bars(results: list[Any]) -> ReadBars:
    """Every bar of a page, checked: a missing or non-numeric o/h/l/c/t is a malformed
    body (raises PayloadError, retried); an unsound bar (high below low, non-finite value,
    negative volume or trade count) is set aside with its reason. Unknown fields are
    ignored; ``v``, ``vw`` and ``n`` may be absent (indices); ``n`` may be written 82132.0."""
    bars: list[Bar] = []
    unsound: list[tuple[int, str]] = []
    for index, raw in enumerate(results):
        try:
            t = raw["t"]
            if type(t) is not int:
                if type(t) is not float or not t.is_integer():
                    raise PayloadError(f"results.{index}.t: not an integer timestamp")
                t = int(t)
            bar = Bar(t, _number(raw, "o", index), _number(raw, "h", index),
                      _number(raw, "l", index), _number(raw, "c", index),
                      _optional(raw, "v", index), _optional(raw, "vw", index),
                      _optional(raw, "n", index))  # type: ignore[arg-type]
        except KeyError as exc:
            raise PayloadError(f"results.{index}: missing field {exc.args[0]!r}") from None
        except TypeError:
            raise PayloadError(f"results.{index}: not an object") from None
        reason = bar_problem(bar)
        if reason is not None:
            unsound.append((t, reason))
        elif bar.trades is not None:
            bars.append(Bar(t, bar.open, bar.high, bar.low, bar.close, bar.volume, bar.vwap,
                            round(bar.trades)))
        else:
            bars.append(bar)
    return ReadBars(bars, unsound)


@dataclass(frozen=True, slots=True)
class Selection:
    """The bars kept from one page, and how many were dropped and why (first reason)."""

    bars: Sequence[Bar]
    rejected: int
    first_reason: str | None
    first_unsound_t: int | None = None  # earliest in-range bar dropped as invalid


def server_text(payload: object) -> str | None:
    """The server's own words about a failure: its ``error`` or ``message`` field."""
    if isinstance(payload, dict):
        for key in ("error", "message"):
            value = payload.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def read_status(payload: object) -> str:
    """The ``status`` of a decoded body; a body without one is malformed."""
    if not isinstance(payload, dict):
        raise PayloadError(f"expected a JSON object, got {type(payload).__name__}")
    status = payload.get("status")
    if not isinstance(status, str) or not status:
        raise PayloadError("missing 'status'")
    return status.upper()


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_aggregates(payload: object) -> tuple[AggregatesResponse, ReadBars]:
    """Validate a successful aggregates body and read its bars; missing or null
    ``results`` is an empty page."""
    try:
        answer = AggregatesResponse.model_validate(payload)
    except ValidationError as exc:
        raise PayloadError(_describe(exc)) from None
    return answer, read_bars(answer.results or [])


class _FastBar(msgspec.Struct):
    """A bar as the fast reader takes it: every value a JSON number (an integer is taken as
    a float, a string or a boolean fails the read), ``v``, ``vw`` and ``n`` optional."""

    t: float
    o: float
    h: float
    l: float  # noqa: E741  (Polygon's name)
    c: float
    v: float | None = None
    vw: float | None = None
    n: float | None = None


class _FastAnswer(msgspec.Struct):
    """The top level as :class:`AggregatesResponse` reads it, every field as strict: a
    ``results`` left out is UNSET, one written ``null`` is None (pitfall 4)."""

    status: str
    results: list[_FastBar] | msgspec.UnsetType | None = msgspec.UNSET
    next_url: str | None = None
    queryCount: int | None = None  # noqa: N815  (Polygon's names)
    resultsCount: int | None = None  # noqa: N815
    ticker: str | None = None
    adjusted: bool | None = None
    request_id: str | None = None


_FAST_DECODER: Final = msgspec.json.Decoder(_FastAnswer)
def _fast_columns(results: list[_FastBar]) -> BarColumns | None:
    """The bars as columns when every one is sound and ``t`` and ``n`` are whole numbers,
    else None. Checked as arrays: finite, high not below low, volume and trades not
    negative."""
    t = np.array([bar.t for bar in results], dtype=np.float64)
    prices = [np.array([bar.o for bar in results], dtype=np.float64),
              np.array([bar.h for bar in results], dtype=np.float64),
              np.array([bar.l for bar in results], dtype=np.float64),
              np.array([bar.c for bar in results], dtype=np.float64)]
    try:
        volume = optional_column([bar.v for bar in results], np.float64)
        vwap = optional_column([bar.vw for bar in results], np.float64)
        trades = optional_column([bar.n for bar in results], np.float64)
    except MixedPresenceError:
        return None
    floats = [t, *prices, *(column for column in (volume, vwap, trades) if column is not None)]
    if not all(np.isfinite(column).all() for column in floats):
        return None
    whole = [t] if trades is None else [t, trades]
    if not all((np.floor(column) == column).all() and (np.abs(column) < SAFE_INTEGER).all()
               for column in whole):
        return None
    if (prices[1] < prices[2]).any() or any(
            column is not None and (column < 0).any() for column in (volume, trades)):
        return None
    return BarColumns(t.astype(np.int64), *prices, volume, vwap,
                      None if trades is None else trades.astype(np.int64))


def parse_aggregates_fast(content: bytes) -> tuple[AggregatesResponse, ReadBars] | None:
    """The common case of :func:`parse_aggregates`, several times faster, straight from
    the body's bytes into columns: a successful answer whose bars are all sound. None for
    anything else (a failure status, ``results: null``, a malformed body or bar, a value
    some bars lack and others have), which the caller then reads with
    :func:`parse_aggregates` to tell those cases apart."""
    try:
        body = _FAST_DECODER.decode(content)
    except (msgspec.DecodeError, ValueError):
        return None
    if body.status not in SUCCESS_STATUSES or body.results is None:  # a failure, or null
        return None
    bars = _fast_columns([] if body.results is msgspec.UNSET else body.results)
    if bars is None:
        return None
    # The bars travel in ReadBars; ``results`` is set (not null) but left empty.
    answer = AggregatesResponse.model_construct(
        status=body.status, results=[], next_url=body.next_url,
        query_count=body.queryCount, results_count=body.resultsCount)
    return answer, ReadBars(bars, [])


def bar_problem(bar: Bar) -> str | None:
    """Why this bar cannot be stored, or None when it is sound. ``x - x == 0`` is false
    exactly for NaN and infinities, and cheaper than ``math.isfinite`` on each value."""
    for value in (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.vwap, bar.trades):
        if value is not None and value - value != 0:
            return "non-finite value"
    if bar.high < bar.low:
        return f"high {bar.high} < low {bar.low}"
    if bar.volume is not None and bar.volume < 0:
        return f"negative volume {bar.volume}"
    if bar.trades is not None and bar.trades < 0:
        return f"negative trade count {bar.trades}"
    return None


def select_bars(read: ReadBars, in_range: Callable[[int], bool]) -> Selection:
    """Keep sound in-range bars, one per ``t`` (the last one wins), sorted by ``t``."""
    bars = read.bars
    if (not read.unsound and bars and in_range(bars[0].t) and in_range(bars[-1].t)
            and is_in_time_order(bars)):  # the usual page: nothing to drop or sort
        return Selection(bars, 0, None)
    kept: dict[int, Bar] = {}
    rejected = 0
    first_reason: str | None = None
    for bar in read.bars:
        if in_range(bar.t):
            kept[bar.t] = bar
        else:
            rejected += 1
            first_reason = first_reason or f"t={bar.t} outside the requested range"
    unsound = [t for t, _ in read.unsound if in_range(t)]
    for t, reason in read.unsound:
        rejected += 1
        first_reason = first_reason or (reason if in_range(t)
                                        else f"t={t} outside the requested range")
    return Selection([kept[t] for t in sorted(kept)], rejected, first_reason,
                     min(unsound, default=None))


def parse_grouped_daily(payload: Any) -> dict[str, Bar]:
    """Every sound bar of a grouped-daily answer, keyed by ticker (``T``).

    Its ``t`` is 16:00 New York, not midnight: key it by ``models.session_date`` before
    mixing it with per-ticker daily bars.
    """
    try:
        status = read_status(payload)
        if status not in SUCCESS_STATUSES:
            raise PayloadError(f"status {status}: {server_text(payload) or 'no message'}")
        parsed = GroupedDailyResponse.model_validate(payload)
        found: dict[str, Bar] = {}
        for raw in parsed.results or []:
            ticker = raw.get("T") if isinstance(raw, dict) else None
            read = read_bars([raw])
            if isinstance(ticker, str) and read.bars:
                found[ticker] = read.bars[0]
    except PayloadError as exc:
        raise MalformedResponseError(f"grouped daily answer is malformed: {exc}") from None
    except ValidationError as exc:
        raise MalformedResponseError(
            f"grouped daily answer is malformed: {_describe(exc)}") from None
    return found


class SplitsResponse(BaseModel):
    """The top level of ``/v3/reference/splits``; ``results`` is read by :func:`read_split`."""

    model_config = ConfigDict(extra="ignore")

    status: str
    results: list[Any] | None = None
    next_url: str | None = None

    @property
    def results_null(self) -> bool:
        """``"results": null`` written out, as opposed to the key being absent."""
        return self.results is None and "results" in self.model_fields_set


@dataclass(frozen=True, slots=True)
class SplitsPage:
    """One page of a ticker's splits, its ``next_url``, and whether ``results`` was null."""

    splits: list[Split]
    next_url: str | None
    results_null: bool


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _shown(value: object) -> str:
    """A server's value as quoted in an error: its repr whole (so the client's redaction
    still finds a key echoed in it), or only its size when long."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__} of {len(text)} characters"


def _ratio_part(raw: dict[str, Any], key: str, index: int) -> float:
    value = raw.get(key)
    if type(value) not in _NUMBERS:
        raise PayloadError(f"results.{index}.{key}: not a number ({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise PayloadError(f"results.{index}.{key}: not a positive number ({_shown(value)})")
    return float(value)


def read_split(raw: object, index: int, ticker: str | None = None) -> Split:
    """One result as a :class:`Split`; PayloadError when it is not a sound one (or names
    another ticker than ``ticker``). Unknown fields (``id``...) are ignored."""
    if not isinstance(raw, dict):
        raise PayloadError(f"results.{index}: not an object")
    text = raw.get("execution_date")
    if not isinstance(text, str) or not _ISO_DATE.fullmatch(text):
        raise PayloadError(f"results.{index}.execution_date: not an ISO date ({_shown(text)})")
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise PayloadError(f"results.{index}.execution_date: not a date ({_shown(text)})") from None
    named = raw.get("ticker")
    if ticker is not None and named is not None and named != ticker:
        raise PayloadError(f"results.{index}.ticker: {_shown(named)}, not the {ticker!r} asked for")
    return Split(day, _ratio_part(raw, "split_from", index), _ratio_part(raw, "split_to", index))


def parse_splits(payload: object, ticker: str | None = None) -> SplitsPage:
    """Validate a successful splits body (status checked by the caller) and read every
    result; a missing ``results`` is "no splits", ``results: null`` is flagged."""
    try:
        answer = SplitsResponse.model_validate(payload)
    except ValidationError as exc:
        raise PayloadError(_describe(exc)) from None
    splits = [read_split(raw, index, ticker) for index, raw in enumerate(answer.results or [])]
    return SplitsPage(splits, answer.next_url or None, answer.results_null)
