"""The Polygon aggregates client: ``PolygonClient`` yields validated ``Page``s of bars."""

from polygon_backfill.clients.polygon_client import Page, PolygonClient, ServerError
from polygon_backfill.clients.responses import parse_grouped_daily

__all__ = ["Page", "PolygonClient", "ServerError", "parse_grouped_daily"]
