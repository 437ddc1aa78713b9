"""What processing reports: per message (:class:`MessageReport`) and per run (totals)."""

from __future__ import annotations

from dataclasses import dataclass

from .instrumentation import HandlerOutcome

__all__ = ["ConsumerStats", "MessageReport"]


@dataclass
class MessageReport:
    """What processing one delivered message did, per handler."""

    message_id: str | None
    outcomes: dict[str, str]
    """Handler name -> a :class:`~outboxer.instrumentation.HandlerOutcome` value."""
    rejected: str | None = None
    """Why the message was dead-lettered without running any handler."""


@dataclass
class ConsumerStats:
    """Totals of a run."""

    messages: int = 0
    processed: int = 0
    duplicates: int = 0
    retries_scheduled: int = 0
    dead_lettered: int = 0
    error_channel: int = 0
    """Handlers that gave up on a message an error channel took instead of the dead letters."""
    rejected: int = 0
    failed_deliveries: int = 0
    """Deliveries given back to the broker because bookkeeping failed (e.g. database down)."""

    def add(self, report: MessageReport) -> None:
        """Count one processed message."""
        self.messages += 1
        if report.rejected is not None:
            self.rejected += 1
        for outcome in report.outcomes.values():
            if outcome == HandlerOutcome.PROCESSED:
                self.processed += 1
            elif outcome == HandlerOutcome.DUPLICATE:
                self.duplicates += 1
            elif outcome == HandlerOutcome.RETRY_SCHEDULED:
                self.retries_scheduled += 1
            elif outcome == HandlerOutcome.DEAD_LETTERED:
                self.dead_lettered += 1
            elif outcome == HandlerOutcome.ERROR_CHANNEL:
                self.error_channel += 1
