"""structlog set-up: readable lines on the console, JSON lines in ``logs/app.log``.

Event names are stable (``polygon.rate_limited``); the phrases users grep for
(``Rate limited``, ``Processing symbol group``) live in the ``message`` field. A redaction
processor replaces the API key and the database password wherever they appear.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

import structlog

_secrets: list[str] = []


def _redact_text(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, "***")
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, BaseException):
        return _redact_text(f"{type(value).__name__}: {value}")
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(item) for item in value)
    return value


def redact_secrets(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: no registered secret survives into any field."""
    if _secrets:
        for key, value in list(event_dict.items()):
            event_dict[key] = _redact_value(value)
    return event_dict


def register_secrets(secrets: Iterable[str]) -> None:
    """Add values to redact from every later log line (the API key, the DB password)."""
    for secret in secrets:
        if secret and secret not in _secrets:
            _secrets.append(secret)


def configure_logging(log_file: Path | None, level: str = "INFO",
                      secrets: Iterable[str] = ()) -> None:
    """Route structlog and stdlib logging to the console and, if given, a JSON-lines file."""
    register_secrets(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    tail: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                       structlog.processors.format_exc_info, redact_secrets]
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[*tail, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())],
    ))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[*tail, structlog.processors.JSONRenderer()],
        ))
        handlers.append(file_handler)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "apscheduler", "aiohttp.access", "asyncio", "pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
