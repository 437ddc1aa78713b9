"""The plan for one handler on one message: run, retry at once, retry later, or give up.

:func:`handler_plan` is a pure generator: it yields the steps and receives each run's
:class:`RunResult`, deciding with the handler's :class:`~outboxer.retry.Retry`. The
builders below make what the steps write: the retry message (an outbox row addressed to
that handler alone) and the handler's dead letter. No I/O happens here.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from .errors import HandlerMisuse
from .handlers import HandlerSpec
from .instrumentation import HandlerOutcome
from .message import Envelope
from .redaction import error_text, traceback_text
from .retry import Retry, Verdict
from .store import NewMessage
from .store.dead_letters import NewDeadLetter
from .times import aware_utc

__all__ = [
    "FIRST_FAILED_AT",
    "GiveUp",
    "RunHandler",
    "RunResult",
    "ScheduleRetry",
    "Step",
    "error_type_name",
    "handler_dead_letter",
    "handler_plan",
    "retry_message",
]

FIRST_FAILED_AT = "outboxer-first-failed-at"
"""Internal header carried by retries: when the handler first failed on this message."""


@dataclass(frozen=True)
class RunHandler:
    """Step: run the handler (in its transaction, with its inbox row)."""

    attempt: int


@dataclass(frozen=True)
class ScheduleRetry:
    """Step: write a retry message for the handler, due after ``delay`` seconds."""

    attempt: int
    """The attempt number the retry will be."""
    delay: float
    error: BaseException


@dataclass(frozen=True)
class GiveUp:
    """Step: write the handler's dead letter."""

    attempt: int
    error: BaseException
    reason: str
    """``non_retryable`` or ``exhausted``."""


@dataclass(frozen=True)
class RunResult:
    """What one run of a handler produced."""

    outcome: str
    """A :class:`~outboxer.instrumentation.HandlerOutcome` value."""
    error: BaseException | None = None


Step = RunHandler | ScheduleRetry | GiveUp


def handler_plan(retry: Retry, first_attempt: int) -> Generator[Step, RunResult | None, str]:
    """The steps for one handler on one message; returns the final outcome."""
    attempt = first_attempt
    while True:
        result = yield RunHandler(attempt)
        assert result is not None
        if result.error is None:
            return result.outcome
        if isinstance(result.error, HandlerMisuse):
            # A programming error: every run would do the same.
            yield GiveUp(attempt, result.error, "non_retryable")
            return HandlerOutcome.DEAD_LETTERED
        decision = retry.decide(attempt, result.error)
        if decision.verdict is Verdict.RETRY_NOW:
            attempt += 1
            continue
        if decision.verdict is Verdict.RETRY_LATER:
            yield ScheduleRetry(attempt + 1, decision.delay, result.error)
            return HandlerOutcome.RETRY_SCHEDULED
        yield GiveUp(attempt, result.error, decision.reason)
        return HandlerOutcome.DEAD_LETTERED


def retry_message(
    envelope: Envelope,
    handler: HandlerSpec,
    consumer: str,
    step: ScheduleRetry,
    trace: Mapping[str, str],
) -> NewMessage:
    """The outbox row that brings ``envelope`` back to ``handler`` alone, later.

    It goes to the consumer's own destination, keeps the message id (so the inbox still
    recognises it) and carries no key (a retry must not hold back other messages).
    """
    headers = dict(envelope.headers)
    if _first_failed_at(envelope) is None:
        headers[FIRST_FAILED_AT] = datetime.now(timezone.utc).isoformat()
    retried = replace(
        envelope,
        destination=consumer,
        key=None,
        handler=handler.id,
        attempt=step.attempt,
        headers=headers,
        traceparent=trace.get("traceparent", envelope.traceparent),
        tracestate=trace.get("tracestate", envelope.tracestate),
    )
    return NewMessage(retried, step.delay)


def handler_dead_letter(
    envelope: Envelope,
    handler: HandlerSpec,
    consumer: str,
    step: GiveUp,
    trace: Mapping[str, str] | None = None,
) -> NewDeadLetter:
    """The dead letter for a handler that gave up; ``trace`` is the dead-letter span's
    context, so a replay continues the message's trace from there."""
    error = step.error
    reason = "retries exhausted" if step.reason == "exhausted" else "not retryable"
    headers = {k: v for k, v in envelope.headers.items() if k != FIRST_FAILED_AT}
    parked = replace(envelope, headers=headers, handler=None, attempt=1)
    if trace:
        parked = replace(
            parked, traceparent=trace.get("traceparent"), tracestate=trace.get("tracestate")
        )
    return NewDeadLetter(
        origin="handler",
        envelope=parked,
        destination=consumer,
        consumer=consumer,
        handler=handler.name,
        error_type=error_type_name(error),
        error_message=f"{error_text(error)} ({reason} after {plural(step.attempt, 'attempt')})",
        traceback=traceback_text(error),
        attempts=step.attempt,
        first_failed_at=_first_failed_at(envelope),
    )


def _first_failed_at(envelope: Envelope) -> datetime | None:
    """The retry header's time, in UTC; None when absent, or not an aware ISO time that
    outboxer stores (forged: the retry row and the dead letter then take now instead)."""
    return aware_utc(envelope.headers.get(FIRST_FAILED_AT))


def error_type_name(error: BaseException) -> str:
    """``ValueError`` for builtins, ``module.Class`` otherwise."""
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 attempt``, ``2 attempts`` (``nouns`` for an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
