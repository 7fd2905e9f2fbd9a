"""CircuitBreaker on virtual time, alone and inside PolygonClient (respx)."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
import respx
from structlog.testing import capture_logs

from polygon_backfill.clients import CircuitBreaker, PolygonClient, ServerError
from polygon_backfill.errors import CircuitOpenError, NotAuthorizedError, RateLimitedError
from polygon_backfill.models import Timeframe
from tests.support import FakeClock, RecordingSleep

BASE_URL = "https://api.test.polygon"
DAY = Timeframe.parse("1d")
START = datetime(2023, 1, 3, 5, tzinfo=UTC)
END = datetime(2023, 1, 5, 5, tzinfo=UTC)
AAPL_DAY_URL = f"{BASE_URL}/v2/aggs/ticker/AAPL/range/1/day/2023-01-03/2023-01-04"


class Changes:
    """Records on_change calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, state: str, last_error: str | None) -> None:
        self.calls.append((state, last_error))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> Changes:
    return Changes()


@pytest.fixture
def breaker(clock: FakeClock, changes: Changes) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=5, cooldown_s=60.0, clock=clock, on_change=changes)


def fail(breaker: CircuitBreaker, times: int, error: str = "HTTP 500") -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_failure(error)


def test_four_failures_keep_it_closed_the_fifth_opens(breaker: CircuitBreaker,
                                                      changes: Changes) -> None:
    """Opening needs failure_threshold consecutive failures, not one fewer."""
    fail(breaker, 4)
    assert breaker.state == "closed"
    assert changes.calls == []
    with capture_logs() as events:
        fail(breaker, 1, "server error HTTP 503")
    assert breaker.state == "open"
    assert breaker.last_error == "server error HTTP 503"
    assert changes.calls == [("open", "server error HTTP 503")]
    [event] = events
    assert event["event"] == "polygon.circuit_open"
    assert event["log_level"] == "warning"
    assert event["message"] == ("Circuit open after 5 consecutive API failures: pausing "
                                "requests for 60 s; last error: server error HTTP 503")


def test_a_success_in_between_resets_the_count(breaker: CircuitBreaker) -> None:
    """4 failures, a success, 4 failures: still closed."""
    fail(breaker, 4)
    breaker.before_call()
    breaker.record_success()
    fail(breaker, 4)
    assert breaker.state == "closed"


async def test_open_fails_fast_then_one_probe_and_success_closes(
        breaker: CircuitBreaker, clock: FakeClock, changes: Changes) -> None:
    """Open: CircuitOpenError until the cool-down ends; then one probe; success closes."""
    fail(breaker, 5)
    await clock.sleep(59.0)
    with pytest.raises(CircuitOpenError, match=r"next probe in 1\.0 s") as caught:
        breaker.before_call()
    assert caught.value.retry_in_s == pytest.approx(1.0)
    assert caught.value.last_error == "HTTP 500"
    await clock.sleep(1.0)
    with capture_logs() as events:
        breaker.before_call()  # the probe
        assert breaker.state == "half_open"
        with pytest.raises(CircuitOpenError, match="probe request is in flight"):
            breaker.before_call()  # everyone else while the probe runs
        breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_call()
    assert [event["event"] for event in events] == ["polygon.circuit_half_open",
                                                    "polygon.circuit_closed"]
    assert [state for state, _ in changes.calls] == ["open", "half_open", "closed"]


async def test_a_failed_probe_reopens_for_another_cooldown(
        breaker: CircuitBreaker, clock: FakeClock, changes: Changes) -> None:
    """A probe that fails re-opens at once, for a full cool-down from that moment."""
    fail(breaker, 5)
    await clock.sleep(60.0)
    breaker.before_call()
    breaker.record_failure("timed out")
    assert breaker.state == "open"
    await clock.sleep(59.0)
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    await clock.sleep(1.0)
    breaker.before_call()
    breaker.record_success()
    assert changes.calls == [("open", "HTTP 500"), ("half_open", "HTTP 500"),
                             ("open", "timed out"), ("half_open", "timed out"),
                             ("closed", "timed out")]


async def test_a_probe_without_verdict_lets_the_next_caller_probe(
        breaker: CircuitBreaker, clock: FakeClock) -> None:
    """A cancelled probe (release) must not leave the circuit half-open forever."""
    fail(breaker, 5)
    await clock.sleep(60.0)
    breaker.before_call()
    breaker.release()
    breaker.before_call()
    assert breaker.state == "half_open"


def test_bad_arguments_are_refused() -> None:
    """A zero threshold or a negative cool-down is a ValueError."""
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown_s"):
        CircuitBreaker(cooldown_s=-1)


# --- inside PolygonClient -------------------------------------------------------------------


def _ok() -> httpx.Response:
    return httpx.Response(200, json={"status": "OK", "results": [
        {"o": 1, "h": 2, "l": 1, "c": 2, "v": 10, "t": 1672722000000}]})


@respx.mock
async def test_five_500s_open_the_circuit_and_stop_calling(breaker: CircuitBreaker) -> None:
    """A page's 5 failed attempts open it; the next range fails fast without a request."""
    route = respx.get(AAPL_DAY_URL).mock(return_value=httpx.Response(500, text="boom"))
    async with PolygonClient("k", BASE_URL, sleep=RecordingSleep(),
                             circuit_breaker=breaker) as client:
        assert client.circuit_breaker is breaker
        with pytest.raises(ServerError):
            await client.fetch_range("AAPL", DAY, START, END)
        assert breaker.state == "open"
        assert route.call_count == 5
        with pytest.raises(CircuitOpenError) as caught:
            await client.fetch_range("AAPL", DAY, START, END)
    assert route.call_count == 5
    assert client.total_requests == 5
    assert caught.value.ticker == "AAPL"
    assert "HTTP 500" in (caught.value.last_error or "")


@pytest.mark.parametrize("answer", [
    httpx.Response(403, json={"status": "NOT_AUTHORIZED", "message": "upgrade"}),
    httpx.Response(429, json={"status": "ERROR", "error": "slow down"}),
], ids=["403", "429"])
@respx.mock
async def test_4xx_and_429_do_not_count(breaker: CircuitBreaker, answer: httpx.Response) -> None:
    """403s and 429s are the API answering: many of them never open the circuit."""
    route = respx.get(AAPL_DAY_URL).mock(return_value=answer)
    async with PolygonClient("k", BASE_URL, sleep=RecordingSleep(),
                             circuit_breaker=breaker) as client:
        for _ in range(3):
            with pytest.raises((NotAuthorizedError, RateLimitedError)):
                await client.fetch_range("AAPL", DAY, START, END)
    assert breaker.state == "closed"
    assert route.call_count >= 3


@respx.mock
async def test_a_short_cooldown_recovers_within_a_page(clock: FakeClock,
                                                       changes: Changes) -> None:
    """CircuitOpenError is retried after the time left in the cool-down (not the shorter
    backoff), so the attempt that follows is the probe: it succeeds and closes the circuit,
    all inside one fetch."""
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=3.0, clock=clock,
                             on_change=changes)
    route = respx.get(AAPL_DAY_URL).mock(side_effect=[
        httpx.Response(502), httpx.Response(502), _ok()])
    async with PolygonClient("k", BASE_URL, sleep=clock.sleep,
                             circuit_breaker=breaker) as client:
        bars = await client.fetch_range("AAPL", DAY, START, END)
    assert len(bars) == 1
    # 502 at t=0, 502 at t=1 opens it until t=4; fast fail at t=3 waits the 1 s left,
    # the probe at t=4 succeeds.
    assert clock.sleeps == [1, 2, 1]
    assert route.call_count == 3
    assert [state for state, _ in changes.calls] == ["open", "half_open", "closed"]
