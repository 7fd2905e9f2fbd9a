"""One entry point from settings to a ready BarStore, embedded server included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from polygon_backfill.storage.bar_store import BarStore
from polygon_backfill.storage.embedded import EmbeddedPostgres


@asynccontextmanager
async def open_database(database_url: str | None, embedded_dir: Path) -> AsyncIterator[BarStore]:
    """Connects (starting the embedded server when database_url is None), migrates, yields a
    BarStore, closes (and stops the embedded server)."""
    embedded: EmbeddedPostgres | None = None
    dsn = database_url
    if dsn is None:
        embedded = EmbeddedPostgres(embedded_dir)
        # pgserver blocks for about a second (initdb, pg_ctl): keep the loop responsive.
        dsn = await asyncio.to_thread(embedded.start)
    try:
        store = await BarStore.connect(dsn)
        try:
            yield store
        finally:
            await store.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
