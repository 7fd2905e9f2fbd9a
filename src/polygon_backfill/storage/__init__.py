"""PostgreSQL storage: bars, coverage intervals, run results and the embedded server."""

from polygon_backfill.storage.bar_store import (
    BarStore,
    PairStatus,
    ServiceState,
    StoredBar,
    WriteResult,
)
from polygon_backfill.storage.database import open_database
from polygon_backfill.storage.embedded import EmbeddedPostgres
from polygon_backfill.storage.schema import migrate, schema_version

__all__ = [
    "BarStore",
    "EmbeddedPostgres",
    "PairStatus",
    "ServiceState",
    "StoredBar",
    "WriteResult",
    "migrate",
    "open_database",
    "schema_version",
]
