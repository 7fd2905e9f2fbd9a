"""The exception tree. Every error carries what a user needs to act on it.

    BackfillError
    ├── ConfigError                    a setting is invalid
    ├── PolygonError                   the API could not give us a range
    │   ├── TransientPolygonError      worth retrying: 429, 5xx, timeout, connection, bad body
    │   │   ├── RateLimitedError       429; carries ``retry_after_s`` when the server sent it
    │   │   ├── MalformedResponseError the body is not a well-formed aggregates answer
    │   │   ├── SuspectEmptyError      no bars for a span holding a whole session (pitfall 4)
    │   │   └── CircuitOpenError       the API kept failing; calls paused for a cool-down
    │   ├── PolygonClientError         400/401/403/404: the request itself is wrong; not retried
    │   │   ├── AuthenticationError    401: the key was rejected
    │   │   └── NotAuthorizedError     403 / NOT_AUTHORIZED: outside the plan
    │   └── PaginationError            ``next_url`` looped or the page cap was hit
    └── StorageError                   PostgreSQL refused or lost a write
        └── StorageUnavailableError    PostgreSQL unreachable or restarting; worth retrying

Messages never contain the API key or the database password.
"""

from __future__ import annotations


class BackfillError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(BackfillError):
    """A setting is missing or invalid; the message names the setting."""


class PolygonError(BackfillError):
    """A request for aggregates failed; carries the request's context and the server's word."""

    def __init__(
        self,
        message: str,
        *,
        ticker: str | None = None,
        timeframe: str | None = None,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        self.ticker = ticker
        self.timeframe = timeframe
        self.status_code = status_code
        self.server_message = server_message
        where = " ".join(part for part in (ticker, timeframe) if part)
        parts = [message]
        if where:
            parts.append(f"[{where}]")
        if status_code is not None:
            parts.append(f"HTTP {status_code}")
        if server_message:
            parts.append(f"server said: {server_message}")
        super().__init__(" ".join(parts))


class TransientPolygonError(PolygonError):
    """Worth another attempt after a wait."""


class RateLimitedError(TransientPolygonError):
    """HTTP 429; ``retry_after_s`` is the server's Retry-After when it sent one."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, **context: object):
        self.retry_after_s = retry_after_s
        super().__init__(message, **context)  # type: ignore[arg-type]


class MalformedResponseError(TransientPolygonError):
    """Truncated or invalid JSON, or a body that is not an aggregates answer: never 'no data'."""


class CircuitOpenError(TransientPolygonError):
    """The circuit breaker is open (or probing): no request was sent.

    ``retry_in_s`` is how long until the next probe may go (0 while a probe is in flight);
    ``last_error`` is the failure that opened it.
    """

    def __init__(self, message: str, *, retry_in_s: float = 0.0,
                 last_error: str | None = None, **context: object):
        self.retry_in_s = retry_in_s
        self.last_error = last_error
        super().__init__(message, **context)  # type: ignore[arg-type]


class SuspectEmptyError(TransientPolygonError):
    """An empty answer where a liquid ticker must have bars; asked again before believed."""


class PolygonClientError(PolygonError):
    """The API refused the request as such (400/401/403/404); retrying cannot help."""


class AuthenticationError(PolygonClientError):
    """HTTP 401: the API key was rejected. Fatal for the whole process."""


class NotAuthorizedError(PolygonClientError):
    """HTTP 403 / NOT_AUTHORIZED: this ticker or timeframe is outside the plan."""


class PaginationError(PolygonError):
    """``next_url`` repeated a cursor or the page cap was reached."""


class StorageError(BackfillError):
    """PostgreSQL could not complete a write."""


class StorageUnavailableError(StorageError):
    """PostgreSQL is unreachable or restarting; the write is worth retrying after a wait."""
