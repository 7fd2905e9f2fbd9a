"""Time as an injected dependency, so tests step a fake clock instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the scheduler, client and limiter need to know about time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def now(self) -> datetime:
        """The current wall-clock time, aware UTC."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ScaledClock:
    """Real time running ``factor`` times faster: a minute of the free plan's rate window
    passes in 0.6 s at factor 100. Benchmarks and acceptance tests give the same factor to
    the sandbox, so both sides agree on what a "minute" is."""

    def __init__(self, factor: float, start: datetime | None = None) -> None:
        if factor <= 0:
            raise ValueError("ScaledClock factor must be positive")
        self.factor = factor
        self._origin_monotonic = time.monotonic()
        self._origin_now = start or datetime.now(UTC)

    def monotonic(self) -> float:
        return (time.monotonic() - self._origin_monotonic) * self.factor

    def now(self) -> datetime:
        """Wall time from ``start`` (default: the real time at creation), not sped up: bars
        are dated by the calendar."""
        return self._origin_now + timedelta(seconds=time.monotonic() - self._origin_monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.factor)
