"""Test doubles that are not the database: a stepped clock and paths to shared data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from polygon_backfill.sandbox import FaultRule, SandboxConfig, SandboxServer
from polygon_backfill.storage import BarStore

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


@contextmanager
def before_each_write(store: BarStore,
                      hook: Callable[[int], Awaitable[None]]) -> Iterator[list[int]]:
    """Await ``hook(n)`` before the store's n-th ``write_page`` (n from 1): how a test stops,
    cancels or breaks a run at a chosen page. Yields the live count; restores on exit."""
    original = store.write_page
    count = [0]

    async def write_page(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        await hook(count[0])
        return await original(*args, **kwargs)

    store.write_page = write_page  # type: ignore[method-assign]
    try:
        yield count
    finally:
        store.write_page = original  # type: ignore[method-assign]


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
