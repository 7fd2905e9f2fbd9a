"""The sandbox's settings and its per-request log entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from polygon_backfill.sandbox.faults import FaultRule


@dataclass
class SandboxConfig:
    """How the sandbox behaves; every knob a test needs to provoke a client's failure path.

    ``now`` and ``monotonic`` are injectable so tests never wait: ``now`` hides bars that
    have not started yet, ``monotonic`` drives the rate-limit window.

    Rate limit: an exact sliding window. A request is refused (429) when ``rate_limit``
    admitted requests arrived within the last ``rate_period_s``; refused requests do not
    count, and a request exactly ``rate_period_s`` after the oldest admitted one is
    allowed. Scale time down for fast tests: ``rate_limit=5, rate_period_s=0.6`` is the
    free plan's 5 per minute at 100x speed.

    ``faults`` are checked in order after auth and the rate limit (see ``faults.py``);
    ``fault_seed`` seeds their random draws, so one request order gives one fault pattern.
    """

    data_dir: Path | None = None
    synthetic: bool = True
    rate_limit: int | None = None
    rate_period_s: float = 60.0
    latency_s: float = 0.0
    api_key: str | None = None
    now: Callable[[], datetime] | None = None
    monotonic: Callable[[], float] | None = None
    synthetic_start: date = date(2000, 1, 1)
    faults: list[FaultRule] = field(default_factory=list)
    fault_seed: int = 0

    def current_time(self) -> datetime:
        """The sandbox's "now" (aware UTC)."""
        return self.now() if self.now is not None else datetime.now(UTC)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the sandbox saw it, so tests can assert what a client sent.

    ``fault`` is the injected fault's kind value; ``status`` is 0 when no answer was sent.
    ``ticker`` is an aggregates path's ticker, None for grouped daily and splits requests
    (a splits request's ticker is in ``params``, or in its cursor on later pages).
    """

    path: str
    params: dict[str, str]
    status: int
    ticker: str | None
    results: int
    fault: str | None = None
