"""Pydantic models for Polygon's aggregates answers, and the checks that decide what to keep.

Two kinds of trouble are told apart on purpose (pitfall 3):

- a *malformed* body (not an object, no ``status``, ``results`` not a list, a bar missing
  ``o``/``h``/``l``/``c``/``t``) raises :class:`PayloadError`; the client retries it and
  never takes it for "no data";
- an *invalid bar* in a well-formed body (high below low, a non-finite number, a negative
  volume) is dropped and counted; the rest are kept. An open or close outside [low, high]
  is kept: real vendor series contain such bars (two in SPY's daily history), and a
  backfill must store the source as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polygon_backfill.errors import MalformedResponseError
from polygon_backfill.models import Bar

SUCCESS_STATUSES = frozenset({"OK", "DELAYED"})
NOT_AUTHORIZED = "NOT_AUTHORIZED"


class PayloadError(ValueError):
    """The body is not a well-formed aggregates answer; the text says where it broke."""


class RawBar(BaseModel):
    """One bar as Polygon writes it; unknown fields (``T``, ``otc``...) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    t: int
    open: float = Field(alias="o")
    high: float = Field(alias="h")
    low: float = Field(alias="l")
    close: float = Field(alias="c")
    volume: float | None = Field(default=None, alias="v")
    vwap: float | None = Field(default=None, alias="vw")
    # A float so that 82132.0 is accepted; turned into an int once checked.
    trades: float | None = Field(default=None, alias="n")


class GroupedBar(RawBar):
    """A grouped-daily bar: the same fields plus ``T``, the ticker."""

    ticker: str = Field(alias="T")


class AggregatesResponse(BaseModel):
    """The top level of ``/v2/aggs/ticker/...``. Counts are optional (indices lack some)."""

    model_config = ConfigDict(extra="ignore")

    status: str
    ticker: str | None = None
    query_count: int | None = Field(default=None, alias="queryCount")
    results_count: int | None = Field(default=None, alias="resultsCount")
    adjusted: bool | None = None
    request_id: str | None = None
    results: list[RawBar] | None = None
    next_url: str | None = None

    @property
    def results_null(self) -> bool:
        """``"results": null`` written out, as opposed to the key being absent."""
        return self.results is None and "results" in self.model_fields_set


class GroupedDailyResponse(BaseModel):
    """The top level of ``/v2/aggs/grouped/locale/us/market/stocks/{date}``."""

    model_config = ConfigDict(extra="ignore")

    status: str
    results: list[GroupedBar] | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """The bars kept from one page, and how many were dropped and why (first reason)."""

    bars: list[Bar]
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


def parse_aggregates(payload: object) -> AggregatesResponse:
    """Validate a successful aggregates body; missing or null ``results`` is an empty page."""
    try:
        return AggregatesResponse.model_validate(payload)
    except ValidationError as exc:
        raise PayloadError(_describe(exc)) from None


def bar_problem(bar: RawBar) -> str | None:
    """Why this bar cannot be stored, or None when it is sound."""
    numbers = (bar.open, bar.high, bar.low, bar.close, bar.volume, bar.vwap, bar.trades)
    if not all(math.isfinite(value) for value in numbers if value is not None):
        return "non-finite value"
    if bar.high < bar.low:
        return f"high {bar.high} < low {bar.low}"
    if bar.volume is not None and bar.volume < 0:
        return f"negative volume {bar.volume}"
    if bar.trades is not None and bar.trades < 0:
        return f"negative trade count {bar.trades}"
    return None


def to_bar(raw: RawBar) -> Bar:
    """Map Polygon's short field names onto the domain Bar."""
    return Bar(
        t=raw.t,
        open=raw.open,
        high=raw.high,
        low=raw.low,
        close=raw.close,
        volume=raw.volume,
        vwap=raw.vwap,
        trades=None if raw.trades is None else round(raw.trades),
    )


def select_bars(raws: Iterable[RawBar], in_range: Callable[[int], bool]) -> Selection:
    """Keep sound in-range bars, one per ``t`` (the last one wins), sorted by ``t``."""
    kept: dict[int, Bar] = {}
    rejected = 0
    first_reason: str | None = None
    unsound: list[int] = []
    for raw in raws:
        if not in_range(raw.t):
            reason: str | None = f"t={raw.t} outside the requested range"
        elif (reason := bar_problem(raw)) is not None:
            unsound.append(raw.t)
        if reason is not None:
            rejected += 1
            first_reason = first_reason or reason
            continue
        kept[raw.t] = to_bar(raw)
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
    except PayloadError as exc:
        raise MalformedResponseError(f"grouped daily answer is malformed: {exc}") from None
    except ValidationError as exc:
        raise MalformedResponseError(
            f"grouped daily answer is malformed: {_describe(exc)}") from None
    return {raw.ticker: to_bar(raw) for raw in parsed.results or [] if bar_problem(raw) is None}
