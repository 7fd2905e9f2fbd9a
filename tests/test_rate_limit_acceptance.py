"""Rate-limit acceptance, short version of ``bench/rate_limits.py``: the daemon against a
sandbox process that enforces a sliding-window limit, on a fresh database each time."""

from __future__ import annotations

import pytest

from bench.rate_limits import TICKERS, run
from polygon_backfill.clients.rate_limiter import RateLimit


@pytest.fixture(autouse=True)
def _shared_server(postgres_admin_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark creates its databases on the test session's server."""
    monkeypatch.setenv("TEST_DATABASE_URL", postgres_admin_url)


@pytest.mark.timeout(120)
async def test_configured_to_the_limit_no_429_at_double_it_adapts_free_plan_drops_nothing(
        ) -> None:
    """N/N: zero 429s. 2N/N: only the first window's requests in flight are refused, then
    the limiter settles. Free preset vs a free-plan sandbox (clocks 100x): every ticker
    complete. Every table equals a fault-free sandbox's answer."""
    exact, double, free = await run(RateLimit.parse("10/0.5"), "10/0.5", TICKERS[:4], 60, 100.0)
    assert exact["http_429"] == 0
    # 60 days hold 41 or 42 sessions: five pages of 10 base aggregates per stock.
    assert exact["requests"] == 4 * 5
    assert 1 <= double["http_429"] <= 3
    for row in (exact, double, free):
        assert row["tickers_failed"] == []
        assert row["rows_wrong"] == 0
        assert row["rows"] > 0
    assert free["http_429"] == 0
