"""Settings: environment parsing, defaults, and one clear line per bad value."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from polygon_backfill.config import load_settings
from polygon_backfill.errors import ConfigError
from polygon_backfill.models import Timeframe


def test_environment_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Comma lists (a repeated ticker once), booleans, numbers and dates come from the
    environment."""
    monkeypatch.setenv("TICKERS", "AAPL, BRK.B,X:BTCUSD ,C:EURUSD,I:SPX,AAPL")
    monkeypatch.setenv("TIMEFRAMES", "1m,5m,15m,30m,1h,4h,1d,1w")
    monkeypatch.setenv("PARALLEL_BACKFILL", "false")
    monkeypatch.setenv("MAX_CONCURRENT_SYMBOLS", "4")
    monkeypatch.setenv("BACKFILL_START", "2020-02-03")
    settings = load_settings()
    assert settings.tickers == ["AAPL", "BRK.B", "X:BTCUSD", "C:EURUSD", "I:SPX"]
    assert [tf.name for tf in settings.timeframes] == ["1m", "5m", "15m", "30m", "1h", "4h",
                                                       "1d", "1w"]
    assert settings.parallel_backfill is False
    assert settings.max_concurrent_symbols == 4
    # A start date is a session date: New York midnight for stocks, UTC midnight for crypto.
    assert settings.backfill_start_for("AAPL", datetime.now(UTC)) == datetime(
        2020, 2, 3, 5, tzinfo=UTC)
    assert settings.backfill_start_for("X:BTCUSD", datetime.now(UTC)) == datetime(
        2020, 2, 3, tzinfo=UTC)


def test_defaults_match_the_seed_contract() -> None:
    """Groups of 3, 5 s stagger, 10 s pause, 5 attempts, Polygon's base URL."""
    settings = load_settings()
    assert (settings.max_concurrent_symbols, settings.stagger_seconds,
            settings.group_pause_seconds, settings.retry_attempts) == (3, 5.0, 10.0, 5)
    assert settings.polygon_base_url == "https://api.polygon.io"
    assert settings.parallel_backfill is True
    assert Timeframe.parse("1d") in settings.timeframes


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("TICKERS", "AAPL,../x,A/B, ,?", "TICKERS: invalid ticker(s) '../x', 'A/B', '?'"),
    ("TICKERS", "AAPL,MS FT", "TICKERS: invalid ticker(s) 'MS FT'"),
    ("TIMEFRAMES", "1m,7x", "TIMEFRAMES: invalid timeframe '7x'"),
    ("MAX_CONCURRENT_SYMBOLS", "0", "MAX_CONCURRENT_SYMBOLS:"),
    ("PARALLEL_BACKFILL", "perhaps", "PARALLEL_BACKFILL:"),
    ("SCHEDULE_CRON", "every minute", "SCHEDULE_CRON: 'every minute' is not a valid crontab"),
    ("SCHEDULE_TIMEZONE", "Mars/Olympus", "SCHEDULE_TIMEZONE: unknown time zone"),
    ("POLYGON_BASE_URL", "api.polygon.io", "POLYGON_BASE_URL: 'api.polygon.io' is not"),
    ("BACKFILL_START", "yesterday", "BACKFILL_START:"),
])
def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch, variable: str,
                                     value: str, expected: str) -> None:
    """Each bad value raises one ConfigError line that starts with the variable's name."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(expected)
    assert "\n" not in str(caught.value)


def test_database_password_is_a_secret_and_never_in_repr() -> None:
    """The DB password and API key are known as secrets and hidden from repr."""
    settings = load_settings(polygon_api_key="k3y-123",
                             database_url="postgresql://u:pa55word@db:5432/market")
    assert settings.secrets() == ["k3y-123", "pa55word"]
    assert "pa55word" not in repr(settings)
    assert "k3y-123" not in repr(settings)


def test_overrides_keep_the_other_values_and_are_validated() -> None:
    """with_overrides replaces the named fields only, and refuses bad values by name."""
    settings = load_settings(tickers="AAPL,X:BTCUSD", timeframes="5m,1d")
    changed = settings.with_overrides(polygon_base_url="http://127.0.0.1:8010/")
    assert changed.polygon_base_url == "http://127.0.0.1:8010"
    assert changed.tickers == ["AAPL", "X:BTCUSD"]
    assert [tf.name for tf in changed.timeframes] == ["5m", "1d"]
    with pytest.raises(ConfigError, match=r"^TIMEFRAMES: invalid timeframe '2y'"):
        settings.with_overrides(timeframes="2y")


def test_env_example_documents_every_setting_and_nothing_else() -> None:
    """.env.example is the user's list of knobs: it must name each Settings field."""
    import re
    from pathlib import Path

    from polygon_backfill.config import Settings

    text = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z_]+)=", text, re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}
