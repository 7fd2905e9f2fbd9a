"""Test doubles that are not the database: a stepped clock and paths to shared data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.harness import before_each_write
from polygon_backfill.sandbox import FaultRule, SandboxConfig, SandboxServer

__all__ = [
    "FIXTURES",
    "REAL_DATA",
    "FakeClock",
    "RecordingSleep",
    "SandboxFactory",
    "before_each_write",
    "sandboxes",
]

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_DATA = SHARED / "data" / "real"
FIXTURES = SHARED / "fixtures" / "polygon"


class FakeClock:
    """Virtual time: ``sleep(d)`` returns at once and moves time to (time at the call + d).

    Concurrent sleeps that started together end at their own targets (0, 5, 10 s), so a
    test sees the schedule the real clock would produce, without waiting for it.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._origin = start or datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
        self._now_s = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self._now_s

    def now(self) -> datetime:
        return self._origin + timedelta(seconds=self._now_s)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        target = self._now_s + max(0.0, seconds)
        await asyncio.sleep(0)
        self._now_s = max(self._now_s, target)


class RecordingSleep:
    """Stands in for asyncio.sleep: records each wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


SandboxFactory = Callable[..., Awaitable[SandboxServer]]


@asynccontextmanager
async def sandboxes(now: datetime) -> AsyncIterator[SandboxFactory]:
    """``start(*faults, **config)`` starts a sandbox on a free port with ``now`` fixed
    unless given; every one started is stopped on exit."""
    started: list[SandboxServer] = []

    async def start(*faults: FaultRule, **options: Any) -> SandboxServer:
        options.setdefault("now", lambda: now)
        server = SandboxServer(SandboxConfig(faults=list(faults), **options))
        await server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()
