"""A process-wide client-side rate limiter, so a correctly configured daemon never sees a 429.

Polygon counts requests in a sliding window: at most N accepted requests in the last P
seconds. :class:`AdaptiveRateLimiter` keeps a log of the last N requests and lets the next
one start only when the k-th most recent (k = the allowed count now) has left the window.
That holds the server's own invariant for any k, and lets a quiet client start a burst of k
at once (the free plan's 5 requests go out together, not one every 12 s).

A request reaches the server somewhere between the moment it is sent and the moment its
answer comes back. So a request made through :meth:`slot` counts as arriving at its answer,
or ``jitter_share`` of the period after its headers went out if the answer takes longer
(5%: 50 ms at 1 s, 3 s on the free plan's minute): arrival jitter up to that bound cannot
push a window over, and a slow answer costs at most that share of the throughput, not its
whole latency. The moment is the one the headers left (the client tells the :class:`Slot`),
not the one the limiter granted: between the two lie our own event loop (busy decoding a
large page, it can send a granted request 50 ms late), the pool's wait for a connection
and a TLS handshake, none of which the server sees. Counted from the grant, 5% gave two
429s in 125 requests in one benchmark run and 15% was needed; counted from the sending,
5% gave none in any run, and each window of requests starts 0.1 s sooner at 100 ms latency.

Why not aiolimiter: its leaky bucket with capacity N lets up to 2N - 1 requests through in
one window (a full bucket drains N at once, then refills while they run), which breaks the
guarantee; with capacity 1 it would be correct but paces every request P/N apart, and it
reads ``loop.time()``, so tests could not step an injected clock. A deque and a lock on the
injected :class:`~polygon_backfill.clock.Clock` are simpler than either workaround.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import structlog

from polygon_backfill.clock import Clock, SystemClock

log = structlog.get_logger(__name__)

_CUSTOM = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``requests`` request starts within any ``period_s`` seconds."""

    requests: int
    period_s: float

    def __post_init__(self) -> None:
        if self.requests < 1 or not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(
                f"a rate limit needs requests >= 1 and a period > 0, got {self.requests}/"
                f"{self.period_s}")

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """``free`` (5/60), ``paid`` (100/1) or ``N/SECONDS`` such as ``7/2``."""
        key = text.strip().lower()
        if key in PRESETS:
            return PRESETS[key]
        match = _CUSTOM.match(key)
        if match is None:
            raise ValueError(
                f"rate limit {text!r} is not 'free', 'paid' or 'N/SECONDS' (e.g. '5/60')")
        return cls(int(match.group(1)), float(match.group(2)))

    def scaled(self, factor: float) -> RateLimit:
        """The same count over ``period_s * factor``: tests and benchmarks shrink time with it."""
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"scale factor must be > 0, got {factor}")
        return RateLimit(self.requests, self.period_s * factor)

    @property
    def per_second(self) -> float:
        return self.requests / self.period_s

    def __str__(self) -> str:
        return f"{self.requests} requests per {self.period_s:g} s"


PRESETS: Final[dict[str, RateLimit]] = {
    "free": RateLimit(5, 60.0),
    "paid": RateLimit(100, 1.0),
}


class Slot:
    """One request's place in the window. Granted is not sent: a busy event loop, a pool
    waiting for a connection or a TLS handshake can stand between the two, and the server
    counts the request from its arrival. :meth:`sent`, called when the request's headers
    have gone out, moves the moment the jitter allowance is counted from to then."""

    __slots__ = ("_clock", "sent_at")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.sent_at: float | None = None

    def sent(self) -> None:
        self.sent_at = self._clock.monotonic()

    def arrived_by(self, answered: float, allowance: float) -> float:
        """When the request counts as having reached the server: at its answer, or
        ``allowance`` after it was sent if that is sooner. Never told it was sent (a
        transport without httpcore's trace, a connection that failed), only the answer
        is a safe bound."""
        if self.sent_at is None:
            return answered
        return min(answered, self.sent_at + allowance)


class AdaptiveRateLimiter:
    """One per process (per API key), shared by every concurrent request.

    ``acquire()`` waits for a slot in the sliding window; waiters are served first come,
    first served behind one lock, so only the head of the queue sleeps (no thundering herd).
    Each window is stretched by ``margin`` (1%) against clock and network skew.

    Adaptive: a 429 cuts the allowed count to what the server just proved it accepts, the
    starts seen in the current window less one (halving when that tells nothing), floor 1 per
    period, at most one cut per period, because the requests already in flight were started
    under the old rate. With a Retry-After it also holds every acquire until that moment
    (capped at ``max_hold_s``, as the client caps its own wait, so one odd header cannot
    freeze the daemon). After ``restore_after`` consecutive successes, and at least
    ``restore_every_periods`` periods after the last change, 10% of the configured count
    comes back, never above the configured limit. Each step up probes the server's limit and
    may cost one 429, so steps are rare: a daemon configured above its plan settles at the
    plan's rate with well under 5% of its requests answered 429.
    """

    def __init__(self, limit: RateLimit, *, clock: Clock | None = None, margin: float = 0.01,
                 jitter_share: float = 0.05,
                 restore_after: int = 10, restore_every_periods: float = 10.0,
                 max_hold_s: float = 300.0) -> None:
        if margin < 0 or restore_after < 1 or max_hold_s < 0 or restore_every_periods < 0:
            raise ValueError("margin, max_hold_s and restore_every_periods must be >= 0 and "
                             "restore_after >= 1")
        self._limit = limit
        self._clock = clock or SystemClock()
        self._window_s = limit.period_s * (1 + margin)
        self._jitter_s = limit.period_s * jitter_share
        self._restore_after = restore_after
        self._restore_gap_s = restore_every_periods * limit.period_s
        self._max_hold_s = max_hold_s
        self._step = max(1, math.ceil(limit.requests / 10))
        self._allowed = limit.requests
        # When each of the last N requests counts as having reached the server (see the
        # module docstring), kept sorted: a slow answer is stamped before a quick later one.
        self._starts: list[float] = []
        self._in_flight = 0
        self._freed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._blocked_until = -math.inf
        self._last_cut = -math.inf
        self._last_change = -math.inf
        self._streak = 0
        self.waited_s = 0.0

    @property
    def limit(self) -> RateLimit:
        """The configured limit, the ceiling the adaptive rate returns to."""
        return self._limit

    @property
    def current_limit(self) -> RateLimit:
        """The limit in force now (after any cuts)."""
        return RateLimit(self._allowed, self._limit.period_s)

    @property
    def current_rate(self) -> float:
        """Requests per second allowed now."""
        return self._allowed / self._limit.period_s

    async def acquire(self) -> None:
        """Wait until one more request may start, then count it as started now (for callers
        whose requests take no time; the client uses :meth:`slot`)."""
        async with self._lock:
            await self._wait_for_room()
            self._stamp(self._clock.monotonic())

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Hold one place in the window from the request's start until its answer; the
        caller may tell the :class:`Slot` when the request actually left."""
        async with self._lock:
            await self._wait_for_room()
            self._in_flight += 1
            slot = Slot(self._clock)
        try:
            yield slot
        finally:
            self._in_flight -= 1
            self._stamp(slot.arrived_by(self._clock.monotonic(), self._jitter_s))
            self._freed.set()

    def _stamp(self, moment: float) -> None:
        bisect.insort(self._starts, moment)
        if len(self._starts) > self._limit.requests:
            del self._starts[0]

    async def _wait_for_room(self) -> None:
        """Sleep until one more request fits; called with the lock held (FIFO)."""
        while True:
            ready = self._ready_at()
            if ready is None:  # every allowed place is taken by a request in flight
                self._freed.clear()
                await self._freed.wait()
                continue
            wait = ready - self._clock.monotonic()
            if wait <= 0:
                return
            self.waited_s += wait
            await self._clock.sleep(wait)

    def _ready_at(self) -> float | None:
        """When the next start fits (after any Retry-After hold and inside the window), or
        None while only an answer to a request in flight can make room."""
        room = self._allowed - self._in_flight
        if room <= 0:
            return None
        ready = self._blocked_until
        if len(self._starts) >= room:
            ready = max(ready, self._starts[-room] + self._window_s)
        return ready

    def on_rate_limited(self, retry_after_s: float | None) -> None:
        """A 429: cut the rate, and hold every acquire for the server's Retry-After."""
        now = self._clock.monotonic()
        self._streak = 0
        if retry_after_s is not None and retry_after_s > 0:
            self._blocked_until = max(self._blocked_until,
                                      now + min(retry_after_s, self._max_hold_s))
        if now - self._last_cut < self._limit.period_s or self._allowed == 1:
            return
        before = self._allowed
        observed = self._in_flight + sum(1 for start in self._starts
                                         if start > now - self._window_s)
        accepted = observed - 1 if 1 < observed <= self._allowed else self._allowed // 2
        self._allowed = max(1, accepted)
        self._last_cut = self._last_change = now
        hold = ("" if retry_after_s is None else
                f", holding {min(retry_after_s, self._max_hold_s):g} s (Retry-After)")
        log.warning("polygon.rate_reduced",
                    message=f"Request rate cut after a 429, from {before} to "
                            f"{self._allowed} per {self._limit.period_s:g} s{hold}",
                    requests=self._allowed, previous=before, period_s=self._limit.period_s,
                    configured=self._limit.requests, retry_after_s=retry_after_s)

    def on_success(self) -> None:
        """A 2xx: after enough of them in a row, give back part of a cut."""
        if self._allowed >= self._limit.requests:
            return
        self._streak += 1
        now = self._clock.monotonic()
        if self._streak < self._restore_after or now - self._last_change < self._restore_gap_s:
            return
        before = self._allowed
        self._allowed = min(self._limit.requests, self._allowed + self._step)
        self._last_change = now
        self._streak = 0
        log.info("polygon.rate_restored",
                 message=f"Request rate restored from {before} to {self._allowed} per "
                         f"{self._limit.period_s:g} s (configured {self._limit.requests})",
                 requests=self._allowed, previous=before, period_s=self._limit.period_s,
                 configured=self._limit.requests)
