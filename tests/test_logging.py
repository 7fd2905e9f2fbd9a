"""Logging: JSON lines in the file, grep-able phrases, secrets redacted everywhere."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import structlog

from polygon_backfill.logging import configure_logging


def test_file_gets_json_lines_with_the_message_and_no_secret(tmp_path: Path) -> None:
    """The API key and DB password are replaced in messages, fields and exceptions."""
    log_file = tmp_path / "logs" / "app.log"
    configure_logging(log_file, "INFO", secrets=["s3cret-key", "pa55word"])
    log = structlog.get_logger("test")
    log.warning("polygon.rate_limited", message="Rate limited on AAPL 1d, key s3cret-key",
                url="https://api.polygon.io/v2?apiKey=s3cret-key")
    try:
        raise RuntimeError("connect to postgresql://u:pa55word@db failed")
    except RuntimeError:
        log.exception("storage.failed")
    logging.getLogger().handlers[-1].flush()
    text = log_file.read_text()
    assert "s3cret-key" not in text
    assert "pa55word" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines[0]["event"] == "polygon.rate_limited"
    assert lines[0]["message"] == "Rate limited on AAPL 1d, key ***"
    assert lines[0]["url"] == "https://api.polygon.io/v2?apiKey=***"
    assert lines[0]["level"] == "warning"
    assert "postgresql://u:***@db" in lines[1]["exception"]
    configure_logging(None, "INFO")
