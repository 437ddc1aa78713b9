"""What the relay did: one report per batch, and running totals."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BatchReport", "RelayStats"]


@dataclass
class BatchReport:
    """What one claim-send-settle iteration did."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    unavailable: bool = False
    claim_seconds: float = 0.0
    send_seconds: float = 0.0
    settle_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.claim_seconds + self.send_seconds + self.settle_seconds

    def line(self) -> str:
        """The batch as one log line."""
        return (
            f"batch: {self.claimed} claimed, {self.sent} sent, {self.retried} retried, "
            f"{self.dead_lettered} dead-lettered, {self.released} released in "
            f"{self.seconds * 1000:.1f} ms (claim {self.claim_seconds * 1000:.1f}, "
            f"send {self.send_seconds * 1000:.1f}, settle {self.settle_seconds * 1000:.1f})"
        )


@dataclass
class RelayStats:
    """Totals since the relay started (``relay.stats``) or of one ``run()``."""

    batches: int = 0
    sent: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    outages: int = 0
    last: BatchReport = field(default_factory=BatchReport)

    def add(self, report: BatchReport) -> None:
        if report.claimed:
            self.batches += 1
        self.sent += report.sent
        self.retried += report.retried
        self.dead_lettered += report.dead_lettered
        self.released += report.released
        self.outages += int(report.unavailable)
        self.last = report
