"""The sandbox's settings and its per-request log entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path


@dataclass
class SandboxConfig:
    """How the sandbox behaves; every knob a test needs to provoke a client's failure path.

    ``now`` and ``monotonic`` are injectable so tests never wait: ``now`` hides bars that
    have not started yet, ``monotonic`` drives the rate-limit window.
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

    def current_time(self) -> datetime:
        """The sandbox's "now" (aware UTC)."""
        return self.now() if self.now is not None else datetime.now(UTC)


@dataclass(frozen=True)
class RequestRecord:
    """One request as the sandbox saw it, so tests can assert what a client sent."""

    path: str
    params: dict[str, str]
    status: int
    ticker: str | None
    results: int
