"""What each fault does to an answer: error bodies, and rewritten 200 bodies.

Body rewrites copy every bar they touch: the bars come from the sandbox's caches, and a
fault must never leak into the next, healthy answer.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from polygon_backfill.models import Timespan
from polygon_backfill.sandbox.buckets import INTRADAY_MS, Bar
from polygon_backfill.sandbox.faults import FaultKind, FaultRule
from polygon_backfill.sandbox.query import AggsQuery

Body = dict[str, Any]

RATE_LIMIT_ERROR = (
    "You've exceeded the maximum requests per minute, please wait or upgrade your "
    "subscription to continue. https://polygon.io/pricing"
)
NOT_ENTITLED = ("You are not entitled to this data. Please upgrade your plan at "
                "https://polygon.io/pricing")
BAD_GATEWAY_HTML = ("<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                    "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n")
MALFORMED_TEXT = "<html>oops"
FOREIGN_ORIGIN = "https://evil.example.com"
_DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Reply:
    """What goes on the wire; ``results`` is the bar count logged for tests."""

    status: int
    text: str
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    results: int = 0


def request_id() -> str:
    return uuid.uuid4().hex


def error_body(message: str, status: str = "ERROR") -> Body:
    """Polygon's error shape: ``NOT_FOUND``/``NOT_AUTHORIZED`` say ``message``, else ``error``."""
    key = "message" if status in ("NOT_FOUND", "NOT_AUTHORIZED") else "error"
    return {"status": status, "request_id": request_id(), key: message}


def json_reply(status: int, body: Body, results: int = 0) -> Reply:
    """Compact JSON; a NaN float becomes the bare ``NaN`` token, as a sloppy upstream would."""
    return Reply(status, json.dumps(body, separators=(",", ":")), results=results)


# Status code and JSON body of each fault that replaces the answer with an error.
ERRORS: dict[FaultKind, tuple[int, str, str]] = {
    FaultKind.RATE_LIMIT: (429, RATE_LIMIT_ERROR, "ERROR"),
    FaultKind.SERVER_ERROR: (500, "Internal server error", "ERROR"),
    FaultKind.UNAVAILABLE: (503, "Service temporarily unavailable", "ERROR"),
    FaultKind.STATUS_ERROR: (200, "Internal processing error", "ERROR"),
    FaultKind.UNKNOWN_TICKER: (404, "Ticker not found", "NOT_FOUND"),
    FaultKind.NOT_AUTHORIZED: (403, NOT_ENTITLED, "NOT_AUTHORIZED"),
    FaultKind.UNAUTHORIZED: (401, "Unknown API Key", "ERROR"),
}


def bar_width_ms(query: AggsQuery) -> int:
    """Nominal width of one bar (a day is 24 h here: close enough to look valid)."""
    if query.timespan in INTRADAY_MS:
        return INTRADAY_MS[query.timespan] * query.multiplier
    days = 7 if query.timespan is Timespan.WEEK else 1
    return days * _DAY_MS * query.multiplier


def _with_results(body: Body, results: list[Bar], descending: bool = False) -> Body:
    ordered = sorted(results, key=lambda bar: bar["t"], reverse=descending)
    return {**body, "results": ordered, "resultsCount": len(ordered), "count": len(ordered)}


def duplicates(body: Body) -> Body:
    """Every bar twice: a wrong copy (o/h/l/c + 1) first, the true bar last ("last wins")."""
    results: list[Bar] = []
    for bar in body["results"]:
        wrong = {**bar, **{key: bar[key] + 1 for key in "ohlc"}}
        results += [wrong, dict(bar)]
    return {**body, "results": results, "resultsCount": len(results), "count": len(results)}


def out_of_range(body: Body, query: AggsQuery) -> Body:
    """Two aligned, plausible bars: one before ``from`` and one after ``to``."""
    width = bar_width_ms(query)
    bars = body["results"]
    first = min(bars, key=lambda bar: bar["t"])
    last = max(bars, key=lambda bar: bar["t"])
    before = {**first, "t": first["t"] - width * ((first["t"] - query.lo) // width + 1)}
    after = {**last, "t": last["t"] + width * ((query.hi - last["t"]) // width + 1)}
    return _with_results(body, [*map(dict, bars), before, after], query.descending)


def invalid_bars(body: Body, query: AggsQuery) -> Body:
    """Three bars a millisecond off real bar times, inside the range: high < low, a NaN
    close (serialised as the bare ``NaN`` token) and a negative volume."""
    bars = body["results"]
    extra: list[Bar] = []
    for offset in (1, 2, 3):
        source = bars[(offset - 1) % len(bars)]
        t = int(source["t"]) + offset
        if t > query.hi:
            t = int(source["t"]) - offset
        extra.append({**source, "t": t})
    extra[0]["h"], extra[0]["l"] = extra[0]["l"] - 1, extra[0]["h"] + 1
    extra[1]["c"] = math.nan
    extra[2]["v"] = -abs(float(extra[2].get("v", 100.0)) or 100.0)
    return _with_results(body, [*map(dict, bars), *extra], query.descending)


def null_results(body: Body) -> Body:
    """An answer indistinguishable from "no data": ``results: null``, zero counts."""
    out = {key: value for key, value in body.items() if key != "next_url"}
    return {**out, "results": None, "resultsCount": 0, "queryCount": 0, "count": 0}


def extra_fields(body: Body) -> Body:
    """Unknown keys at the top level and in every bar, which a client must ignore."""
    unknown = {"otc": False, "foo": {"x": 1}}
    out = {**body, **unknown}
    if body.get("results"):
        out["results"] = [{**bar, **unknown} for bar in body["results"]]
    return out


def next_url_loop(body: Body, page_url: str) -> Body:
    """``next_url`` naming the very page just served."""
    return {**body, "next_url": page_url}


def foreign_next_url(body: Body) -> Body:
    """``next_url`` on another origin; path and query kept (the key must not go there)."""
    parts = urlsplit(body["next_url"])
    foreign = urlsplit(FOREIGN_ORIGIN)
    return {**body, "next_url": urlunsplit(parts._replace(scheme=foreign.scheme,
                                                          netloc=foreign.netloc))}


def full_page_no_next(body: Body, query: AggsQuery) -> Body:
    """A page that claims ``limit`` results and stops: truncation in disguise (pitfall 1)."""
    out = {key: value for key, value in body.items() if key != "next_url"}
    return {**out, "resultsCount": query.limit, "queryCount": query.limit}


def _seconds(value: float) -> str:
    """Retry-After text: whole seconds as an integer, else the float (fast tests)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def fault_reply(rule: FaultRule, status: int, body: Body, page_url: str,
                query: AggsQuery | None, results: int) -> Reply:
    """The reply ``rule`` makes of a real answer. TIMEOUT and CONNECTION_RESET keep the
    real reply: how it (never) reaches the client is the server's business."""
    kind = rule.kind
    if kind in ERRORS:
        code, message, state = ERRORS[kind]
        reply = json_reply(code, error_body(message, state))
        if rule.retry_after_s is not None and kind in _RETRY_AFTER:
            reply.headers["Retry-After"] = _seconds(rule.retry_after_s)
        return reply
    if kind is FaultKind.BAD_GATEWAY_HTML:
        return Reply(502, BAD_GATEWAY_HTML, "text/html")
    if kind is FaultKind.MALFORMED:
        return Reply(200, MALFORMED_TEXT)
    if kind is FaultKind.TRUNCATED_JSON:
        text = json_reply(status, body).text
        return Reply(status, text[: len(text) // 2])
    if kind in (FaultKind.TIMEOUT, FaultKind.CONNECTION_RESET):
        return json_reply(status, body, results)
    changed = _rewrite(kind, body, page_url, query)
    return json_reply(status, changed, len(changed.get("results") or ()))


_RETRY_AFTER = frozenset({FaultKind.RATE_LIMIT, FaultKind.UNAVAILABLE})


def _rewrite(kind: FaultKind, body: Body, page_url: str, query: AggsQuery | None) -> Body:
    if kind is FaultKind.NULL_RESULTS:
        return null_results(body)
    if kind is FaultKind.DUPLICATES:
        return duplicates(body)
    if kind is FaultKind.EXTRA_FIELDS:
        return extra_fields(body)
    if kind is FaultKind.NEXT_URL_LOOP:
        return next_url_loop(body, page_url)
    if kind is FaultKind.FOREIGN_NEXT_URL:
        return foreign_next_url(body)
    if query is None:
        raise ValueError(f"fault {kind.value!r} needs an aggregates request")
    if kind is FaultKind.OUT_OF_RANGE:
        return out_of_range(body, query)
    if kind is FaultKind.INVALID_BARS:
        return invalid_bars(body, query)
    if kind is FaultKind.FULL_PAGE_NO_NEXT:
        return full_page_no_next(body, query)
    raise ValueError(f"unhandled fault kind {kind.value!r}")
