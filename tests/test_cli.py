"""The command line as a user runs it: exit codes, one-line errors, no secret in the log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from polygon_backfill.cli import main


@pytest.fixture
def sandbox_requiring_key() -> Iterator[str]:
    """`polygon-backfill sandbox --api-key right-key` in its own process; its base URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "polygon_backfill.cli", "sandbox", "--port", "0",
         "--api-key", "right-key"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("Polygon sandbox listening on "), line
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        process.terminate()
        process.communicate(timeout=10)


@pytest.fixture
def cli_database(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for a command run through asyncio.run (so created synchronously)."""
    name = f"cli_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(postgres_admin_url)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield urlsplit(postgres_admin_url)._replace(path=f"/{name}").geturl()
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_a_rejected_key_stops_once_with_exit_3_and_one_clear_line(
        sandbox_requiring_key: str, cli_database: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """401: exit code 3, one `polygon.key_rejected` line, no retries, the key nowhere."""
    monkeypatch.setenv("POLYGON_API_KEY", "wrong-key-123")
    monkeypatch.setenv("DATABASE_URL", cli_database)
    code = main(["once", "--base-url", sandbox_requiring_key, "--tickers", "AAPL,MSFT,SPY,QQQ",
                 "--timeframes", "1d", "--days", "5", "--sequential"])
    assert code == 3
    events = [json.loads(line) for line in (tmp_path / "logs" / "app.log").read_text().splitlines()]
    assert [e["event"] for e in events].count("polygon.key_rejected") == 1
    assert not [e for e in events if e["event"] in ("polygon.retrying", "polygon.rate_limited")]
    assert [e["ticker"] for e in events if e["event"] == "backfill.symbol_started"] == ["AAPL"]
    assert "wrong-key-123" not in (tmp_path / "logs" / "app.log").read_text()
    assert "wrong-key-123" not in capsys.readouterr().err


def test_status_lists_each_pair_with_its_last_result(
        cli_database: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`once --with-sandbox` then `status`: one row per pair with its bar count and 'ok'."""
    monkeypatch.setenv("DATABASE_URL", cli_database)
    monkeypatch.setenv("STAGGER_SECONDS", "0")
    monkeypatch.setenv("GROUP_PAUSE_SECONDS", "0")
    assert main(["once", "--with-sandbox", "--tickers", "AAPL,X:BTCUSD", "--timeframes", "1d",
                 "--days", "10"]) == 0
    capsys.readouterr()
    assert main(["status"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " 1d " in line]
    assert len(rows) == 2
    assert "AAPL" in rows[0]
    assert " ok " in rows[0]
    assert "X:BTCUSD" in rows[1]
    assert "│   11 │" in rows[1]


def test_sigterm_lets_the_running_pass_finish_its_page_and_exits_cleanly(
        cli_database: str, tmp_path: Path) -> None:
    """`run` under SIGTERM mid-pass (systemd's stop): exit 0, no crashed job, and every
    stored bar lies inside recorded coverage, so nothing is half-written."""
    env = {**os.environ, "DATABASE_URL": cli_database, "TICKERS": "AAPL,X:BTCUSD",
           "TIMEFRAMES": "1m", "BACKFILL_DAYS": "20", "PAGE_LIMIT": "1000",
           "RATE_LIMIT": "4/1", "LOG_FILE": str(tmp_path / "app.log")}
    process = subprocess.Popen(
        [sys.executable, "-m", "polygon_backfill.cli", "run", "--with-sandbox"],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "app.log"
    deadline = time.monotonic() + 60
    while "Processing symbol group" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the daemon never started a pass"
        time.sleep(0.1)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "scheduler.stopping" in events
    assert "backfill.finished" in events
    assert "backfill.job_crashed" not in events

    async def uncovered_bars() -> tuple[int, int]:
        connection = await asyncpg.connect(cli_database)
        try:
            stored = await connection.fetchval("SELECT count(*) FROM bars")
            outside = await connection.fetchval(
                "SELECT count(*) FROM bars b WHERE NOT EXISTS (SELECT 1 FROM coverage c "
                "WHERE c.ticker = b.ticker AND c.timeframe = b.timeframe "
                "AND b.bar_time >= c.range_start AND b.bar_time < c.range_end)")
        finally:
            await connection.close()
        return stored, outside

    stored, outside = asyncio.run(uncovered_bars())
    assert stored > 0
    assert outside == 0


def test_gaps_report_and_verify_on_a_backfilled_table(
        sandbox_requiring_key: str, cli_database: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """After `once`: `gaps` finds no hole (exit 0) until bars are deleted (exit 1, the
    sessions listed), `report` writes the PNG and HTML, `verify` finds no mismatch."""
    monkeypatch.setenv("POLYGON_API_KEY", "right-key")
    monkeypatch.setenv("DATABASE_URL", cli_database)
    universe = ["--base-url", sandbox_requiring_key, "--tickers", "AAPL,X:BTCUSD",
                "--timeframes", "1d", "--days", "15"]
    assert main(["once", *universe]) == 0
    capsys.readouterr()
    assert main(["gaps", *universe]) == 0
    assert "0 hole(s) in 0 of 2 pair(s)" in capsys.readouterr().out

    async def punch() -> str:
        connection = await asyncpg.connect(cli_database)
        try:
            day = await connection.fetchval(
                "SELECT session_date FROM bars WHERE ticker = 'AAPL' ORDER BY bar_time "
                "OFFSET 2 LIMIT 1")
            await connection.execute("DELETE FROM bars WHERE ticker = 'AAPL' AND "
                                     "session_date = $1", day)
            return str(day)
        finally:
            await connection.close()

    day = asyncio.run(punch())
    assert main(["gaps", *universe]) == 1
    out = capsys.readouterr().out
    assert "1 hole(s) in 1 of 2 pair(s)" in out
    assert day in out
    assert main(["report", *universe, "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "coverage.png").stat().st_size > 0
    assert "AAPL 1d" in (tmp_path / "report" / "coverage.html").read_text()
    capsys.readouterr()
    assert main(["verify", *universe, "--sample", "8", "--seed", "3"]) == 0
    assert "Verified 8 session(s)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["status", "gaps", "report"])
def test_an_unreachable_database_is_one_line_without_the_password(
        command: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://backfill:hunter2-secret@127.0.0.1:1/bars")
    assert main([command]) == 1
    err = capsys.readouterr().err
    assert err.startswith("polygon-backfill: ")
    assert err.count("\n") == 1
    assert "hunter2-secret" not in err
