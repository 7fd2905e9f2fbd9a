"""Results of one backfill pass: per (ticker, timeframe), per ticker, and for the run."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from polygon_backfill.clients import Page
    from polygon_backfill.clock import Clock
    from polygon_backfill.models import Timeframe
    from polygon_backfill.storage import ReadyPage, WriteResult


@dataclass(slots=True)
class PairOutcome:
    """What happened to one (ticker, timeframe) in one run."""

    ticker: str
    timeframe: str
    ok: bool = True
    ranges: int = 0
    pages: int = 0
    inserted: int = 0
    updated: int = 0
    rejected: int = 0
    error: str | None = None
    skipped: bool = False


@dataclass(slots=True)
class TickerResult:
    """One ticker's run: its pairs and the time its writes took."""

    ticker: str
    pairs: list[PairOutcome] = field(default_factory=list)
    db_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Skipped pairs (outside the plan, unknown ticker) do not make a ticker fail."""
        return all(pair.ok or pair.skipped for pair in self.pairs)

    @property
    def bars_written(self) -> int:
        return sum(pair.inserted + pair.updated for pair in self.pairs)

    @property
    def error(self) -> str | None:
        errors = [f"{pair.timeframe}: {pair.error}" for pair in self.pairs
                  if pair.error and not pair.skipped]
        return "; ".join(errors) or None


@dataclass(slots=True)
class BackfillSummary:
    """The figures a run logs and returns; ``as_dict`` is what ``_backfill_job`` returns."""

    tickers_ok: list[str]
    tickers_failed: dict[str, str]
    pairs_skipped: dict[str, str]
    bars_inserted: int
    bars_updated: int
    bars_rejected: int
    requests: int
    rate_limited: int
    api_seconds: float
    db_seconds: float
    total_seconds: float
    stopped_early: bool = False

    @property
    def bars_written(self) -> int:
        return self.bars_inserted + self.bars_updated

    @classmethod
    def from_results(cls, results: dict[str, TickerResult], **figures: Any) -> BackfillSummary:
        pairs = [pair for result in results.values() for pair in result.pairs]
        return cls(
            tickers_ok=[ticker for ticker, result in results.items() if result.ok],
            tickers_failed={ticker: result.error or "failed"
                            for ticker, result in results.items() if not result.ok},
            pairs_skipped={f"{pair.ticker} {pair.timeframe}": pair.error or "skipped"
                           for pair in pairs if pair.skipped},
            bars_inserted=sum(pair.inserted for pair in pairs),
            bars_updated=sum(pair.updated for pair in pairs),
            bars_rejected=sum(pair.rejected for pair in pairs),
            db_seconds=round(sum(result.db_seconds for result in results.values()), 3),
            **figures,
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bars_written": self.bars_written}


# How the scheduler's steps hand work back to it (pipeline.py, grouped.py).
WritePage = Callable[[str, "Timeframe", "Page | ReadyPage"], Awaitable["WriteResult"]]
PreparePage = Callable[[str, "Timeframe", "Page"], "ReadyPage"]
NoteFailure = Callable[[str, "Timeframe", PairOutcome, Exception], None]
FinishPair = Callable[[str, "Timeframe", PairOutcome], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PassHooks:
    """What every runner of a pass (pipeline.py, grouped.py) gets from the scheduler: how
    to write a page, report a pair's failure and its end, the stop signal and the clock."""

    write: WritePage
    note_failure: NoteFailure
    finish_pair: FinishPair
    stop: asyncio.Event
    clock: Clock
