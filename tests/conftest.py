"""Shared fixtures. Each group below belongs to one concern; add new groups, keep them apart."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import structlog

from bench.harness import fresh_database
from polygon_backfill.config import Settings
from polygon_backfill.storage import BarStore, EmbeddedPostgres
from tests.support import REAL_DATA, SandboxFactory, sandboxes

# --------------------------------------------------------------------------------------
# Isolation from the developer's machine: no environment settings, no stray .env or logs/.
# --------------------------------------------------------------------------------------

_SETTINGS_ENV = {name.upper() for name in Settings.model_fields} | {
    "POLYGON_API_KEY", "POLYGON_BASE_URL", "DATABASE_URL", "TICKERS", "TIMEFRAMES"}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings read the environment case-insensitively and ``.env`` from the working
    directory: clear the first and run every test in its own empty directory."""
    for key in list(os.environ):
        if key.upper() in _SETTINGS_ENV:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restored_logging() -> Iterator[None]:
    """A test that calls configure_logging (the CLI does) must not leave handlers bound to
    pytest's captured streams, which close after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()


# --------------------------------------------------------------------------------------
# PostgreSQL: one server per test session, one fresh database per test.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A DSN allowed to create databases: ``TEST_DATABASE_URL`` if set, else an embedded
    pgserver started for this session (sync: pgserver blocks)."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    with EmbeddedPostgres(tmp_path_factory.mktemp("postgres") / "data") as server:
        assert server.dsn is not None
        yield server.dsn


@pytest.fixture
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A DSN to a brand-new empty database, dropped after the test."""
    async with fresh_database(postgres_admin_url) as dsn:
        yield dsn


@pytest.fixture
async def bar_store(database_url: str) -> AsyncIterator[BarStore]:
    """A migrated BarStore on the test's own database."""
    store = await BarStore.connect(database_url, min_size=1, max_size=4)
    try:
        yield store
    finally:
        await store.close()


# --------------------------------------------------------------------------------------
# Sandboxes: the real CSV data set, and sandboxes whose "now" is SANDBOX_NOW.
# --------------------------------------------------------------------------------------

SANDBOX_NOW = datetime(2024, 6, 1, tzinfo=UTC)


@pytest.fixture
def real_dir() -> Path:
    """``../shared/data/real``; the test is skipped where it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip("../shared/data/real is absent")
    return REAL_DATA


@pytest.fixture
async def sandbox() -> AsyncIterator[SandboxFactory]:
    """Start sandboxes (port 0, ``now`` fixed at SANDBOX_NOW unless given); all stopped
    after the test."""
    async with sandboxes(SANDBOX_NOW) as start:
        yield start
