"""Keep stored adjusted prices on one side of every split (pitfall 10).

Polygon adjusts a ticker's whole history when it splits, so bars fetched before the split
no longer match the series the API serves. Each run asks for the split list of every stock
ticker already stored and, when the splits in effect changed (a split announced for a later
date changes nothing yet: the series moves on its execution date), forgets the ticker's
coverage: the plan then fetches its whole stored history again (it reaches back to the
earliest stored bar) and the upsert replaces every stale value.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import structlog

from polygon_backfill.errors import AuthenticationError, BackfillError
from polygon_backfill.models import NEW_YORK, AssetClass, Split, asset_class
from polygon_backfill.storage import BarStore

log = structlog.get_logger(__name__)

FetchSplits = Callable[[str], Awaitable[list[Split]]]


def is_stale(listed: Sequence[Split], recorded: Sequence[Split] | None,
             oldest_write: datetime | None) -> bool:
    """Whether stored bars may be adjusted for another split list than ``listed``.

    Against a recorded list, any difference counts (a new, removed or corrected split).
    With none recorded (first check), bars are stale when a split took effect on or after
    the day the oldest stored bar was written.
    """
    if recorded is not None:
        return sorted(listed) != sorted(recorded)
    if oldest_write is None:
        return False
    written = oldest_write.astimezone(NEW_YORK).date()
    return any(split.execution_date >= written for split in listed)


async def refresh_splits(fetch: FetchSplits, store: BarStore, tickers: Sequence[str],
                         now: datetime, stopping: Callable[[], bool]) -> None:
    """Check every stored stock ticker's splits in effect; a ticker whose history is to be
    fetched again is logged. A ticker's failure is logged and skipped (checked again next
    run); a rejected API key stops the run as it would any request."""
    today = now.astimezone(NEW_YORK).date()
    for ticker in tickers:
        if stopping():
            break
        if asset_class(ticker) is not AssetClass.STOCK:
            continue
        try:
            if not await store.has_coverage(ticker):
                continue  # nothing stored: the first fetch is adjusted for today's splits
            listed = [split for split in await fetch(ticker) if split.execution_date <= today]
            recorded = await store.recorded_splits(ticker)
            oldest = await store.oldest_write(ticker) if recorded is None else None
            stale = is_stale(listed, recorded, oldest)
            await store.save_splits(ticker, listed, now, refetch_history=stale)
        except AuthenticationError:
            raise
        except BackfillError as exc:
            log.warning("splits.check_failed",
                        message=f"Could not check the splits of {ticker}: {exc}",
                        ticker=ticker, error_type=type(exc).__name__)
            continue
        if stale:
            log.warning("splits.changed",
                        message=f"Split list of {ticker} changed ({len(listed)} split(s)): "
                                "fetching its whole history again",
                        ticker=ticker, splits=len(listed))
