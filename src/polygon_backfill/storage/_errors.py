"""Turn driver and OS failures into ``StorageError`` without leaking connection secrets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import asyncpg

from polygon_backfill.errors import StorageError, StorageUnavailableError

# What can go wrong talking to PostgreSQL: the server said no, the driver or socket broke,
# or we waited too long. Anything else is a bug and should surface unchanged.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # Raised when the server vanishes in the middle of a COPY: the protocol is left
    # mid-operation ("cannot switch to state 15; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

# The server went away or is not accepting connections yet: a restart or an outage, not a
# refusal of what we wrote. SQLSTATE class 08 (connection exception) and 57P01-57P03
# (admin/crash shutdown, cannot connect now).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    OSError,
    TimeoutError,
)

_MAX_REASON_CHARS = 500


def redact(text: str, dsn: str | None) -> str:
    """Remove the DSN and its password from ``text``: driver messages sometimes echo them."""
    if not dsn:
        return text
    text = text.replace(dsn, "<database-url>")
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text


def storage_error(action: str, exc: BaseException, *, dsn: str | None = None) -> StorageError:
    """A StorageError naming what we were doing and why it failed, minus any secret."""
    # One line for the log; asyncpg appends PostgreSQL's DETAIL (the failing row) itself.
    reason = " ".join(str(exc).split())[:_MAX_REASON_CHARS] or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    code = f" [SQLSTATE {sqlstate}]" if isinstance(sqlstate, str) else ""
    kind = StorageUnavailableError if isinstance(exc, _UNAVAILABLE) else StorageError
    return kind(redact(f"{action} failed: {type(exc).__name__}{code}: {reason}", dsn))


@contextmanager
def storage_errors(action: str, *, dsn: str | None = None) -> Iterator[None]:
    """Turn a driver or OS failure inside the block into one StorageError naming ``action``."""
    try:
        yield
    except DATABASE_ERRORS as exc:
        raise storage_error(action, exc, dsn=dsn) from exc
