"""A local Polygon-compatible aggregates server: CSV data, synthetic bars, failure knobs."""

from polygon_backfill.sandbox.config import RequestRecord, SandboxConfig
from polygon_backfill.sandbox.faults import FaultKind, FaultRule, parse_faults
from polygon_backfill.sandbox.server import SandboxServer, run_sandbox

__all__ = ["FaultKind", "FaultRule", "RequestRecord", "SandboxConfig", "SandboxServer",
           "parse_faults", "run_sandbox"]
