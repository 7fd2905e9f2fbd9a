"""Fault rules for the sandbox: which failure to inject into which request, and when.

A client's resilience is only proven against real wire failures (a 502 HTML page, a body
cut mid-stream, a ``next_url`` that loops), so the sandbox injects them on request. Rules
are checked in order and the first that fires wins; a seeded ``random.Random`` makes a
given request order always produce the same faults.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum


class FaultKind(StrEnum):
    """One failure, named by the value the CLI's ``--faults`` option uses."""

    RATE_LIMIT = "429"
    SERVER_ERROR = "500"
    BAD_GATEWAY_HTML = "502"
    UNAVAILABLE = "503"
    TIMEOUT = "timeout"
    TRUNCATED_JSON = "truncated"
    MALFORMED = "malformed"
    STATUS_ERROR = "status_error"
    NULL_RESULTS = "null_results"
    DUPLICATES = "duplicates"
    OUT_OF_RANGE = "out_of_range"
    INVALID_BARS = "invalid_bars"
    EXTRA_FIELDS = "extra_fields"
    NEXT_URL_LOOP = "next_url_loop"
    FOREIGN_NEXT_URL = "foreign_host"
    FULL_PAGE_NO_NEXT = "full_no_next"
    CONNECTION_RESET = "reset"
    UNKNOWN_TICKER = "404"
    NOT_AUTHORIZED = "403"
    UNAUTHORIZED = "401"


# Kinds that replace the answer outright, whatever the real one was (even a 400).
WIRE_KINDS = frozenset({
    FaultKind.RATE_LIMIT, FaultKind.SERVER_ERROR, FaultKind.BAD_GATEWAY_HTML,
    FaultKind.UNAVAILABLE, FaultKind.TIMEOUT, FaultKind.MALFORMED, FaultKind.STATUS_ERROR,
    FaultKind.UNKNOWN_TICKER, FaultKind.NOT_AUTHORIZED, FaultKind.UNAUTHORIZED,
})
# Kinds that make sense for grouped daily (no per-ticker range, no paging there).
GROUPED_KINDS = WIRE_KINDS | {
    FaultKind.TRUNCATED_JSON, FaultKind.NULL_RESULTS, FaultKind.DUPLICATES,
    FaultKind.EXTRA_FIELDS, FaultKind.CONNECTION_RESET,
}
_NEEDS_BARS = frozenset({FaultKind.DUPLICATES, FaultKind.OUT_OF_RANGE, FaultKind.INVALID_BARS})
_NEEDS_NEXT = frozenset({FaultKind.FOREIGN_NEXT_URL, FaultKind.FULL_PAGE_NO_NEXT})


@dataclass
class FaultRule:
    """Inject ``kind`` into matching requests.

    A request matches by ``ticker``/``timespan`` (None: any) and by whether the kind can
    apply to it (body faults need a 200 answer; some need bars or a ``next_url``;
    OUT_OF_RANGE only hits a first page, whose range is the client's own). Of the
    matching requests, the first ``after`` are skipped, at most ``times`` are hit, and each
    remaining one is hit with ``probability``.
    """

    kind: FaultKind
    probability: float = 1.0
    ticker: str | None = None
    timespan: str | None = None
    after: int = 0
    times: int | None = None
    retry_after_s: float | None = None
    hang_s: float = 3600.0

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault probability must be within [0, 1], got {self.probability}")


@dataclass(frozen=True, slots=True)
class Target:
    """What a fault rule needs to know about one answered request."""

    ticker: str | None
    timespan: str | None
    grouped: bool
    status: int
    has_bars: bool
    has_next: bool
    first_page: bool = True


def applies(kind: FaultKind, target: Target) -> bool:
    """Whether ``kind`` can be injected into this request at all."""
    if target.grouped and kind not in GROUPED_KINDS:
        return False
    if kind in WIRE_KINDS:
        return True
    if target.status != 200:
        return False
    if kind in _NEEDS_BARS and not target.has_bars:
        return False
    if kind is FaultKind.OUT_OF_RANGE and not target.first_page:
        return False  # a followed next_url moved ``from``: only page 1 names the client's range
    return not (kind in _NEEDS_NEXT and not target.has_next)


class FaultInjector:
    """The rules plus their counters and random stream; one per server."""

    def __init__(self, rules: list[FaultRule], seed: int) -> None:
        self.rules = list(rules)
        self._random = random.Random(seed)
        self._matched = [0] * len(self.rules)
        self._fired = [0] * len(self.rules)

    def pick(self, target: Target) -> FaultRule | None:
        """The first rule that fires for this request (counting matches as it goes)."""
        for index, rule in enumerate(self.rules):
            if not self._matches(rule, target):
                continue
            self._matched[index] += 1
            if self._matched[index] <= rule.after:
                continue
            if rule.times is not None and self._fired[index] >= rule.times:
                continue
            if rule.probability < 1.0 and self._random.random() >= rule.probability:
                continue
            self._fired[index] += 1
            return rule
        return None

    @staticmethod
    def _matches(rule: FaultRule, target: Target) -> bool:
        if rule.ticker is not None and rule.ticker != target.ticker:
            return False
        if rule.timespan is not None and rule.timespan != target.timespan:
            return False
        return applies(rule.kind, target)


def parse_faults(text: str) -> list[FaultRule]:
    """``"429:0.05,500:0.05,timeout"`` -> rules; a bare kind means probability 1."""
    rules: list[FaultRule] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, chance = item.partition(":")
        try:
            kind = FaultKind(name.strip())
        except ValueError:
            known = ", ".join(member.value for member in FaultKind)
            raise ValueError(f"unknown fault kind {name.strip()!r} in {item!r}; "
                             f"known kinds: {known}") from None
        try:
            probability = float(chance) if sep else 1.0
        except ValueError:
            raise ValueError(f"fault probability must be a number in {item!r}") from None
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"fault probability must be within [0, 1] in {item!r}")
        rules.append(FaultRule(kind, probability))
    return rules
