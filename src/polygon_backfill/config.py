"""Settings from the environment and ``.env`` (pydantic-settings), validated at start-up.

Every field is one environment variable of the same name in upper case (``TICKERS``,
``PARALLEL_BACKFILL``...). ``load_settings`` turns any invalid value into one
``ConfigError`` line naming the variable, so a typo never starts a half-working daemon.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from polygon_backfill.clients.rate_limiter import RateLimit
from polygon_backfill.errors import ConfigError
from polygon_backfill.models import Timeframe, session_start, validate_ticker

DEFAULT_BASE_URL = "https://api.polygon.io"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the daemon can be told. Defaults give a small, sensible universe."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", case_sensitive=False)

    polygon_api_key: SecretStr = SecretStr("")
    polygon_base_url: str = DEFAULT_BASE_URL
    database_url: SecretStr | None = None
    embedded_pg_dir: Path = Path("data/postgres")

    tickers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["AAPL", "MSFT", "SPY", "X:BTCUSD"])
    timeframes: Annotated[list[Timeframe], NoDecode] = Field(
        default_factory=lambda: [Timeframe.parse("1h"), Timeframe.parse("1d")])
    backfill_start: date | None = None
    backfill_days: int = Field(default=30, ge=1)
    adjusted: bool = True
    trailing_window_days: float = Field(default=3.0, ge=0, le=36_500)
    trailing_window_by_timeframe: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=dict)
    check_splits: bool = True

    parallel_backfill: bool = True
    backfill_mode: Literal["pipeline", "groups"] = "pipeline"
    max_in_flight_requests: int = Field(default=64, ge=1, le=256)
    max_bars_in_flight: int = Field(default=100_000, ge=1_000)
    queued_pages: int = Field(default=4, ge=1, le=256)
    max_concurrent_symbols: int = Field(default=3, ge=1, le=100)
    grouped_daily_max_sessions: int = Field(default=5, ge=0)
    stagger_seconds: float = Field(default=5.0, ge=0)
    group_pause_seconds: float = Field(default=10.0, ge=0)

    schedule_cron: str = "*/30 * * * *"
    schedule_timezone: str = "America/New_York"
    run_on_start: bool = True

    rate_limit: str = "paid"
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_cooldown_seconds: float = Field(default=60.0, gt=0)
    db_retry_attempts: int = Field(default=8, ge=1, le=50)

    http_timeout_seconds: float = Field(default=30.0, gt=0)
    retry_attempts: int = Field(default=5, ge=1, le=20)
    retry_max_wait_seconds: float = Field(default=300.0, gt=0)
    page_limit: int = Field(default=50_000, ge=1, le=50_000)
    max_pages: int = Field(default=10_000, ge=1)
    shutdown_timeout_seconds: float = Field(default=30.0, gt=0)

    log_file: Path = Path("logs/app.log")
    log_level: str = "INFO"

    @field_validator("tickers", mode="before")
    @classmethod
    def _parse_tickers(cls, value: Any) -> Any:
        tickers = _split_csv(value)
        if isinstance(tickers, list):
            bad = []
            for ticker in tickers:
                try:
                    validate_ticker(ticker)
                except ValueError:
                    bad.append(repr(ticker))
            if bad:
                raise ValueError(f"invalid ticker(s) {', '.join(bad)}: a ticker may hold "
                                 "letters, digits, '.', '-' and an X:/C:/I: prefix")
            if not tickers:
                raise ValueError("no tickers given")
            return list(dict.fromkeys(tickers))
        return tickers

    @field_validator("timeframes", mode="before")
    @classmethod
    def _parse_timeframes(cls, value: Any) -> Any:
        items = _split_csv(value)
        if isinstance(items, list):
            parsed = [item if isinstance(item, Timeframe) else Timeframe.parse(item)
                      for item in items]
            if not parsed:
                raise ValueError("no timeframes given")
            return list(dict.fromkeys(parsed))
        return items

    @field_validator("trailing_window_by_timeframe", mode="before")
    @classmethod
    def _parse_trailing_windows(cls, value: Any) -> Any:
        """``1m=1,1d=5``: days re-fetched every run, per timeframe."""
        items = _split_csv(value)
        if not isinstance(items, list):
            return items
        windows: dict[str, float] = {}
        for item in items:
            name, sep, days = item.partition("=")
            try:
                timeframe = Timeframe.parse(name.strip())
                windows[timeframe.name] = float(days) if sep else float("nan")
            except ValueError as exc:
                raise ValueError(f"{item!r} is not TIMEFRAME=DAYS ({exc})") from None
            if not 0 <= windows[timeframe.name] <= 36_500:
                raise ValueError(f"{item!r} is not TIMEFRAME=DAYS with 0 <= DAYS <= 36500")
        return windows

    @field_validator("rate_limit")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        RateLimit.parse(value)
        return value.strip().lower()

    @field_validator("polygon_base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @field_validator("schedule_timezone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"{value!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return level

    def model_post_init(self, context: Any, /) -> None:
        try:
            CronTrigger.from_crontab(self.schedule_cron, timezone=ZoneInfo(self.schedule_timezone))
        except ValueError as exc:
            raise ConfigError(f"SCHEDULE_CRON: {self.schedule_cron!r} is not a valid "
                              f"crontab expression ({exc})") from exc

    def trailing_window_for(self, timeframe: Timeframe) -> timedelta:
        """How far back every run re-fetches ``timeframe`` (late and corrected bars)."""
        days = self.trailing_window_by_timeframe.get(timeframe.name, self.trailing_window_days)
        return timedelta(days=days)

    def backfill_start_for(self, ticker: str, now: datetime) -> datetime:
        """The earliest moment to keep for ``ticker``, as aware UTC: ``BACKFILL_START`` is a
        session date, so it begins at that day's midnight in the ticker's home zone."""
        if self.backfill_start is not None:
            return session_start(ticker, self.backfill_start)
        return now - timedelta(days=self.backfill_days)

    def database_dsn(self) -> str | None:
        """``DATABASE_URL`` in clear for the driver, None for the embedded server."""
        return self.database_url.get_secret_value() if self.database_url else None

    def secrets(self) -> list[str]:
        """Values that must never reach a log line or an error message."""
        found = [self.polygon_api_key.get_secret_value()]
        if self.database_url is not None:
            from urllib.parse import urlsplit

            password = urlsplit(self.database_url.get_secret_value()).password
            if password:
                found.append(password)
        return [secret for secret in found if secret]

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with some fields replaced and validated again; the environment is not
        read a second time."""
        try:
            return type(self).model_validate(dict(self) | overrides)
        except ValidationError as exc:
            raise _config_error(exc) from None


def _config_error(exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    return ConfigError(f"{field.upper()}: {message}")


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation failures into one ConfigError naming the variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise _config_error(exc) from None
