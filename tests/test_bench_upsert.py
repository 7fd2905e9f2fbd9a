"""The bulk-upsert benchmark measures what it says: every scenario writes the bars it
claims, into the real table, with the daemon's writer count where it says so."""

from __future__ import annotations

from bench.upsert import measure
from polygon_backfill.pipeline import WRITERS


async def test_every_scenario_writes_what_it_reports(postgres_admin_url: str) -> None:
    rows = {row["scenario"]: row for row in await measure(postgres_admin_url, 300, 2)}
    assert list(rows) == ["fresh", f"fresh x{WRITERS}", "identical", "changed", "daily"]
    counts = {name: (row["writers"], row["pages"], row["inserted"], row["updated"],
                     row["unchanged"]) for name, row in rows.items()}
    assert counts == {
        "fresh": (1, 2, 600, 0, 0),
        f"fresh x{WRITERS}": (WRITERS, 2 * WRITERS, 600 * WRITERS, 0, 0),
        "identical": (1, 2, 0, 0, 600),
        "changed": (1, 2, 0, 600, 0),
        "daily": (1, 1, 300, 0, 0),
    }
    assert all(row["median_bars_per_s"] > 0 for row in rows.values())
