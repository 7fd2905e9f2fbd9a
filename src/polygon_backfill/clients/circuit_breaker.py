"""A circuit breaker, so an API outage costs one probe per cool-down instead of a retry storm.

States: ``closed`` (calls go through), ``open`` (calls fail at once with
:class:`~polygon_backfill.errors.CircuitOpenError`), ``half_open`` (one probe is in flight;
everyone else still fails fast). Only outages count as failures: 5xx, timeouts, connection
errors and malformed bodies. A 4xx or a 429 is the API answering, so the client reports it as
a success here (the rate limiter deals with 429s).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import structlog

from polygon_backfill.clock import Clock, SystemClock
from polygon_backfill.errors import CircuitOpenError

log = structlog.get_logger(__name__)

OnChange = Callable[[str, str | None], None]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; probes after ``cooldown_s``.

    Share one per process (per API). Not a lock: asyncio runs these methods without
    interleaving, so the state changes are atomic.
    """

    def __init__(self, failure_threshold: int = 5, cooldown_s: float = 60.0, *,
                 clock: Clock | None = None, on_change: OnChange | None = None) -> None:
        if failure_threshold < 1 or cooldown_s < 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_s >= 0")
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock or SystemClock()
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._last_error: str | None = None

    @property
    def state(self) -> CircuitState:
        """The state as of the last call; ``open`` turns ``half_open`` when a probe is let in."""
        return self._state

    @property
    def last_error(self) -> str | None:
        """The latest failure seen, as text (kept after closing, for status displays)."""
        return self._last_error

    def before_call(self) -> None:
        """Let a call through, or raise CircuitOpenError without calling the API."""
        if self._state is CircuitState.CLOSED:
            return
        if self._state is CircuitState.OPEN:
            remaining = self._opened_at + self._cooldown_s - self._clock.monotonic()
            if remaining > 0:
                raise CircuitOpenError(
                    f"circuit open after {self._failures} consecutive API failures, next "
                    f"probe in {remaining:.1f} s; last error: {self._last_error}",
                    retry_in_s=remaining, last_error=self._last_error)
            self._change(CircuitState.HALF_OPEN)
        if self._probing:
            raise CircuitOpenError(
                f"circuit half-open, a probe request is in flight; last error: "
                f"{self._last_error}", last_error=self._last_error)
        self._probing = True

    def record_success(self) -> None:
        """The API answered: reset the failure streak; a successful probe closes the circuit."""
        if self._state is CircuitState.OPEN:
            return  # a call started before the circuit opened; only a probe decides
        self._failures = 0
        if self._state is CircuitState.HALF_OPEN:
            self._change(CircuitState.CLOSED)

    def record_failure(self, error: BaseException | str) -> None:
        """An outage-like failure: count it; the threshold or a failed probe opens the circuit."""
        self._last_error = str(error)
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or (
                self._state is CircuitState.CLOSED and self._failures >= self._threshold):
            self._opened_at = self._clock.monotonic()
            self._change(CircuitState.OPEN)

    def release(self) -> None:
        """A call ended without a verdict (cancelled): let the next caller probe instead."""
        if self._state is CircuitState.HALF_OPEN:
            self._probing = False

    def _change(self, state: CircuitState) -> None:
        self._state = state
        self._probing = False
        if state is CircuitState.OPEN:
            log.warning("polygon.circuit_open",
                        message=f"Circuit open after {self._failures} consecutive API "
                                f"failures: pausing requests for {self._cooldown_s:g} s; "
                                f"last error: {self._last_error}",
                        failures=self._failures, cooldown_s=self._cooldown_s,
                        last_error=self._last_error)
        elif state is CircuitState.HALF_OPEN:
            log.info("polygon.circuit_half_open",
                     message="Circuit half-open: letting one probe request through",
                     last_error=self._last_error)
        else:
            log.info("polygon.circuit_closed",
                     message="Circuit closed: the API answered the probe, requests resume",
                     last_error=self._last_error)
        if self._on_change is not None:
            self._on_change(state.value, self._last_error)
