"""PostgreSQL storage: bars, coverage intervals, run results and the embedded server."""

from polygon_backfill.storage.bar_store import (
    BarStore,
    EncodedPage,
    PairStatus,
    ReadyPage,
    ServiceState,
    StoredBar,
    StoredPair,
    WriteResult,
    encode_page,
)
from polygon_backfill.storage.database import open_database
from polygon_backfill.storage.embedded import EmbeddedPostgres
from polygon_backfill.storage.schema import migrate, schema_version

__all__ = [
    "BarStore",
    "EmbeddedPostgres",
    "EncodedPage",
    "PairStatus",
    "ReadyPage",
    "ServiceState",
    "StoredBar",
    "StoredPair",
    "WriteResult",
    "encode_page",
    "migrate",
    "open_database",
    "schema_version",
]
