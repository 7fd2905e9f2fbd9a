"""A local Polygon-compatible aggregates server: CSV data, synthetic bars, failure knobs."""

from polygon_backfill.sandbox.config import RequestRecord, SandboxConfig
from polygon_backfill.sandbox.server import SandboxServer, run_sandbox

__all__ = ["RequestRecord", "SandboxConfig", "SandboxServer", "run_sandbox"]
