"""AdaptiveRateLimiter on virtual time: the sliding-window guarantee, throughput, adaptation."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from polygon_backfill.clients import PRESETS, AdaptiveRateLimiter, RateLimit
from tests.support import FakeClock


async def start_times(limiter: AdaptiveRateLimiter, clock: FakeClock, count: int) -> list[float]:
    """Launch ``count`` concurrent acquires; return when each one was let through, in order."""
    starts: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        starts.append(clock.monotonic())

    await asyncio.gather(*(one() for _ in range(count)))
    return starts


def most_in_any_window(starts: list[float], period_s: float) -> int:
    """The largest number of starts inside any half-open window [t, t + period_s)."""
    ordered = sorted(starts)
    return max(sum(1 for s in ordered if t <= s < t + period_s) for t in ordered)


# --- RateLimit ------------------------------------------------------------------------------


def test_presets() -> None:
    """free is 5 per minute, paid is 100 per second (Polygon's published figures)."""
    assert PRESETS["free"] == RateLimit(5, 60.0)
    assert PRESETS["paid"] == RateLimit(100, 1.0)
    assert RateLimit.parse("free") == RateLimit(5, 60.0)
    assert RateLimit.parse(" Paid ") == RateLimit(100, 1.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("7/2", RateLimit(7, 2.0)), ("5/60", RateLimit(5, 60.0)), ("100 / 0.5", RateLimit(100, 0.5)),
])
def test_parse_custom(text: str, expected: RateLimit) -> None:
    """N/SECONDS gives N requests per SECONDS seconds."""
    assert RateLimit.parse(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "5", "5/", "/60", "0/60", "5/0", "-5/60",
                                  "5/-1", "5.5/60", "5/60/2", "inf/1", "5/inf"])
def test_parse_refuses_anything_else(text: str) -> None:
    """Unknown names, zero counts or periods and malformed fractions are ValueErrors."""
    with pytest.raises(ValueError, match="rate limit"):
        RateLimit.parse(text)


def test_scaled_shrinks_the_period_only() -> None:
    """scaled(f) keeps the count and multiplies the period, so N/P scales by 1/f."""
    fast = PRESETS["free"].scaled(0.001)
    assert fast == RateLimit(5, 0.06)
    assert fast.per_second == pytest.approx(PRESETS["free"].per_second * 1000)
    with pytest.raises(ValueError, match="scale"):
        PRESETS["free"].scaled(0)


# --- the guarantee ----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [RateLimit(5, 60.0), RateLimit(100, 1.0), RateLimit(7, 2.0)])
async def test_never_more_than_n_starts_in_any_window(limit: RateLimit) -> None:
    """200 concurrent acquires: no window of period_s ever holds more than N starts."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(limit, clock=clock)
    starts = await start_times(limiter, clock, 200)
    assert len(starts) == 200
    assert most_in_any_window(starts, limit.period_s) == limit.requests
    # The sliding-window form of the same invariant, pairwise.
    assert all(later - earlier >= limit.period_s
               for earlier, later in zip(starts, starts[limit.requests:], strict=False))


async def test_steady_throughput_is_n_per_period() -> None:
    """200 starts at 5 per 60 s take 39 full windows (+1% margin each): about 200/N * P."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(5, 60.0), clock=clock)
    starts = await start_times(limiter, clock, 200)
    assert starts[:5] == [0.0] * 5  # a quiet limiter lets a full window go at once
    assert starts[-1] == pytest.approx(39 * 60.0 * 1.01)
    assert starts[-1] == pytest.approx(200 / 5 * 60.0, rel=0.03)
    assert limiter.waited_s == pytest.approx(39 * 60.0 * 1.01)


async def test_waiters_are_served_in_arrival_order() -> None:
    """FIFO: the i-th caller gets the i-th slot; only the head of the queue sleeps."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(2, 10.0), clock=clock, margin=0)
    order: list[int] = []

    async def one(index: int) -> None:
        await limiter.acquire()
        order.append(index)

    await asyncio.gather(*(one(i) for i in range(9)))
    assert order == list(range(9))
    assert clock.sleeps == [10.0] * 4  # one sleep per window, not one per waiter


async def test_a_scaled_limit_keeps_the_shape() -> None:
    """Scaling the limit scales the schedule: the same starts, 1000 times sooner."""
    slow_clock, fast_clock = FakeClock(), FakeClock()
    slow = await start_times(AdaptiveRateLimiter(PRESETS["free"], clock=slow_clock),
                             slow_clock, 20)
    fast = await start_times(
        AdaptiveRateLimiter(PRESETS["free"].scaled(0.001), clock=fast_clock), fast_clock, 20)
    assert fast == pytest.approx([s / 1000 for s in slow])


# --- adaptation -------------------------------------------------------------------------------


async def test_a_429_halves_the_rate_and_logs_it() -> None:
    """on_rate_limited halves the allowed count, at most once per period, floor 1."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(100, 1.0), clock=clock)
    with capture_logs() as events:
        limiter.on_rate_limited(None)
        limiter.on_rate_limited(None)  # same period: the in-flight requests predate the cut
    assert limiter.current_rate == 50.0
    assert limiter.limit == RateLimit(100, 1.0)
    [event] = events
    assert event["event"] == "polygon.rate_reduced"
    assert event["message"] == ("Request rate cut after a 429, from 100 to 50 "
                                "per 1 s")
    rates = []
    for _ in range(8):
        await clock.sleep(1.0)
        limiter.on_rate_limited(None)
        rates.append(limiter.current_limit.requests)
    assert rates == [25, 12, 6, 3, 1, 1, 1, 1]


async def test_a_reduced_rate_is_what_acquire_enforces() -> None:
    """After a cut from 10 to 5 per 10 s, no window holds more than 5 new starts."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(10, 10.0), clock=clock)
    limiter.on_rate_limited(None)
    starts = await start_times(limiter, clock, 30)
    assert most_in_any_window(starts, 10.0) == 5
    assert starts[-1] == pytest.approx(5 * 10.0 * 1.01)


async def test_retry_after_holds_every_acquire() -> None:
    """A Retry-After of 30 s blocks all acquires until then, even with slots free."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(100, 1.0), clock=clock)
    await clock.sleep(5.0)
    with capture_logs() as events:
        limiter.on_rate_limited(30.0)
    assert "holding 30 s (Retry-After)" in events[0]["message"]
    starts = await start_times(limiter, clock, 3)
    assert starts == [35.0, 35.0, 35.0]


async def test_a_huge_retry_after_is_capped() -> None:
    """A Retry-After of two hours holds acquires for max_hold_s only."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(100, 1.0), clock=clock, max_hold_s=300.0)
    limiter.on_rate_limited(7200.0)
    assert await start_times(limiter, clock, 1) == [300.0]


async def test_successes_restore_gradually_never_above_the_limit() -> None:
    """10 successes in a row, a period apart from the last change, give back 10% each time."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(100, 1.0), clock=clock, restore_after=10,
                                  restore_every_periods=1)
    limiter.on_rate_limited(None)
    for _ in range(9):
        limiter.on_success()
    await clock.sleep(1.0)
    limiter.on_success()
    assert limiter.current_limit.requests == 60
    for _ in range(10):
        limiter.on_success()  # 10 more, but within a period of the last change
    assert limiter.current_limit.requests == 60
    seen = []
    with capture_logs() as events:
        for _ in range(8):
            await clock.sleep(1.0)
            for _ in range(10):
                limiter.on_success()
            seen.append(limiter.current_limit.requests)
    assert seen == [70, 80, 90, 100, 100, 100, 100, 100]
    assert [event["event"] for event in events] == ["polygon.rate_restored"] * 4
    assert events[-1]["message"] == ("Request rate restored from 90 to 100 per 1 s "
                                     "(configured 100)")


async def test_a_429_resets_the_success_streak() -> None:
    """Successes interrupted by a 429 do not count towards a restore."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(5, 60.0), clock=clock, restore_after=3,
                                  restore_every_periods=1)
    limiter.on_rate_limited(None)
    assert limiter.current_limit.requests == 2
    await clock.sleep(60.0)
    limiter.on_success()
    limiter.on_success()
    limiter.on_rate_limited(None)
    assert limiter.current_limit.requests == 1
    await clock.sleep(60.0)
    limiter.on_success()
    limiter.on_success()
    assert limiter.current_limit.requests == 1
    limiter.on_success()
    assert limiter.current_limit.requests == 2  # free plan: a step of one request


def test_bad_arguments_are_refused() -> None:
    """A negative margin or a zero restore count is a ValueError."""
    with pytest.raises(ValueError, match="margin"):
        AdaptiveRateLimiter(PRESETS["free"], margin=-0.1)
    with pytest.raises(ValueError, match="restore_after"):
        AdaptiveRateLimiter(PRESETS["free"], restore_after=0)


async def test_a_429_cuts_to_what_the_server_accepted_in_the_window() -> None:
    """Six starts in the window, then a 429: the server takes five, so the limit becomes
    five; a later restore waits ``restore_every_periods`` periods."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(10, 60.0), clock=clock, restore_after=1,
                                  restore_every_periods=10)
    for _ in range(6):
        await limiter.acquire()
    limiter.on_rate_limited(None)
    assert limiter.current_limit.requests == 5
    await clock.sleep(9 * 60.0)
    limiter.on_success()
    assert limiter.current_limit.requests == 5
    await clock.sleep(60.0)
    limiter.on_success()
    assert limiter.current_limit.requests == 6


# --- when a request counts ----------------------------------------------------------------


async def test_a_quick_answer_counts_the_request_from_its_answer() -> None:
    """A request answered in 20 ms holds its place until then: the next window opens a
    period (+1%) after the answer, not after the start."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(1, 1.0), clock=clock)
    async with limiter.slot() as slot:
        await clock.sleep(0.005)
        slot.sent()
        await clock.sleep(0.015)
    await limiter.acquire()
    assert clock.monotonic() == pytest.approx(0.02 + 1.01)


async def test_a_slow_answer_counts_from_the_sending_plus_the_allowance() -> None:
    """One per 10 s. Granted at 0, sent at 0.3 s (a handshake, a busy loop), answered at
    2 s: the request counts as arriving 5% of the period (0.5 s) after it was sent, at
    0.8 s; not at its grant (0.5 s), not at its answer (2 s)."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(1, 10.0), clock=clock)
    async with limiter.slot() as slot:
        await clock.sleep(0.3)
        slot.sent()
        await clock.sleep(1.7)
    await limiter.acquire()
    assert clock.monotonic() == pytest.approx(0.8 + 10.1)


async def test_a_request_never_sent_counts_until_its_end() -> None:
    """No headers went out (a refused connection, a transport without httpcore's trace):
    only the end is a safe bound, however long it took."""
    clock = FakeClock()
    limiter = AdaptiveRateLimiter(RateLimit(1, 10.0), clock=clock)

    async def refused() -> None:
        async with limiter.slot():
            await clock.sleep(3.0)
            raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        await refused()
    await limiter.acquire()
    assert clock.monotonic() == pytest.approx(3.0 + 10.1)
