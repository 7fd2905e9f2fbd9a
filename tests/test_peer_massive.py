"""The benchmark's peer: the official Massive client in threads, writing through BarStore.

The sandbox runs on the test's own loop; the peer's threads block on HTTP while the loop
stays free to answer them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

pytest.importorskip("massive")

from bench.peer_massive import run_peer, table_vs_client
from polygon_backfill.clients import PolygonClient
from polygon_backfill.sandbox import SandboxConfig, SandboxServer
from polygon_backfill.storage import BarStore

NOW = datetime(2024, 3, 15, 12, tzinfo=UTC)

WORK = [
    ("AAPL", "1h", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 9, tzinfo=UTC)),
    ("X:BTCUSD", "5m", datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 5, tzinfo=UTC)),
    ("AAPL", "1d", datetime(2024, 2, 1, 5, tzinfo=UTC), datetime(2024, 3, 1, 5, tzinfo=UTC)),
    ("X:BTCUSD", "1d", datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
]


async def test_peer_fills_the_table_exactly_as_our_client_fetches(bar_store: BarStore) -> None:
    async with SandboxServer(SandboxConfig(now=lambda: NOW)) as sandbox:
        figures = await run_peer(sandbox.base_url, bar_store, WORK, threads=3, page_limit=500)
        served = len(sandbox.requests)
        async with PolygonClient("bench-key", sandbox.base_url) as ours:
            stored, wanted, differing = await table_vs_client(bar_store, ours, WORK)

    assert figures["ranges_failed"] == 0
    assert figures["requests"] == served  # counted on the wire, as the sandbox saw them
    assert figures["requests"] > len(WORK)  # small pages: list_aggs followed next_url
    assert figures["pages"] == served
    assert figures["http_429"] == 0
    assert stored == wanted == figures["bars_written"] > 0
    assert differing == 0
    assert figures["total_seconds"] > 0
    assert figures["db_seconds"] > 0


async def test_peer_counts_429s_that_urllib3_retries(bar_store: BarStore) -> None:
    config = SandboxConfig(now=lambda: NOW, rate_limit=2, rate_period_s=0.05)
    async with SandboxServer(config) as sandbox:
        # More retries than the client's default 3, so the test cannot lose a range.
        figures = await run_peer(sandbox.base_url, bar_store, WORK, threads=4,
                                 page_limit=500, retries=10)
        served = len(sandbox.requests)
        limited = sandbox.rate_limited_count
    async with SandboxServer(SandboxConfig(now=lambda: NOW)) as clean, \
            PolygonClient("bench-key", clean.base_url) as ours:
        stored, wanted, differing = await table_vs_client(bar_store, ours, WORK)

    assert figures["ranges_failed"] == 0
    assert figures["requests"] == served
    assert figures["http_429"] == limited > 0
    assert figures["pages"] == served - limited
    assert stored == wanted == figures["bars_written"]
    assert differing == 0
