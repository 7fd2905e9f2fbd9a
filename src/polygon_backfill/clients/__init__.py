"""The Polygon aggregates client: ``PolygonClient`` yields validated ``Page``s of bars."""

from polygon_backfill.clients.circuit_breaker import CircuitBreaker, CircuitState
from polygon_backfill.clients.polygon_client import Page, PolygonClient, ServerError
from polygon_backfill.clients.rate_limiter import PRESETS, AdaptiveRateLimiter, RateLimit
from polygon_backfill.clients.responses import parse_grouped_daily

__all__ = [
    "PRESETS",
    "AdaptiveRateLimiter",
    "CircuitBreaker",
    "CircuitState",
    "Page",
    "PolygonClient",
    "RateLimit",
    "ServerError",
    "parse_grouped_daily",
]
