"""The fault soak, short: 20% injected faults and one PostgreSQL restart, exact at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import TICKERS, soak


@pytest.mark.timeout(180)
async def test_soak_with_faults_and_a_database_restart_ends_exact(tmp_path: Path) -> None:
    """Every injected fault is survived: no ticker dropped, every row equal to the source,
    no duplicate, and the restart really happened and was retried through."""
    report = await soak(tmp_path, tickers=TICKERS[:4], days=8, fault_rate=0.2, page_limit=500)
    assert report.db_restarts == 1
    assert report.db_write_retries >= 1
    assert sum(report.faults_injected.values()) >= 5
    assert report.retries >= sum(report.faults_injected.values())
    assert report.tickers_failed == {}
    assert report.rows > 0
    assert report.rows_wrong == 0
    assert report.duplicate_keys == 0
