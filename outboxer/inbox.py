"""Processing one delivered message through the inbox: the part sync and async share.

For each handler the message is meant for, :func:`handler_plan` decides the steps
(run in a transaction with its inbox row; retry at once; schedule a delayed retry
through the outbox; give up to the dead-letter table) and the drivers in
:mod:`outboxer.consumer` carry them out with a sync Session or an AsyncSession. The
decisions are written once, here; only the I/O differs.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from . import wire
from .errors import DecodeError
from .instrumentation import HandlerOutcome
from .message import Envelope, MessageType, registered_type
from .retry import Retry, Verdict
from .store import NewMessage
from .store.dead_letters import NewDeadLetter

__all__ = [
    "FIRST_FAILED_AT",
    "Context",
    "GiveUp",
    "HandlerSpec",
    "Outcome",
    "RunHandler",
    "ScheduleRetry",
    "handler_plan",
]

FIRST_FAILED_AT = "outboxer-first-failed-at"
"""Internal header carried by retries: when the handler first failed on this message."""


@dataclass(frozen=True)
class Context:
    """What a handler may want to know about the message it is handling (``context=``)."""

    message_id: UUID
    message_type: str
    consumer: str
    handler: str
    attempt: int
    """Which run of this handler on this message (1 for the first)."""
    headers: Mapping[str, str]
    correlation_id: str
    causation_id: str | None
    occurred_at: datetime
    key: str | None
    redelivered: bool = False


@dataclass
class HandlerSpec:
    """A registered handler."""

    name: str
    """Its name within the consumer (default: the function's name)."""
    id: str
    """``consumer:name``: its inbox key and the target of its retries and replays."""
    fn: Callable[..., Any]
    type_name: str
    message_type: MessageType[Any] | None
    """None when the handler takes plain dicts (registered by type name)."""
    destination: str
    retry: Retry
    dedup_key: Callable[[Any], object] | None = None
    is_async: bool = False
    wants_session: bool = False
    wants_context: bool = False

    def dedup_value(self, envelope: Envelope, event: Any) -> str:
        fn = self.dedup_key
        if fn is None and self.message_type is not None:
            fn = self.message_type.dedup_key
        if fn is None:
            return str(envelope.message_id)
        value = fn(event)
        if value is None:
            return str(envelope.message_id)
        return value if isinstance(value, str) else str(value)

    def arguments(self, event: Any, session: Any, context: Context) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.wants_session:
            kwargs["session"] = session
        if self.wants_context:
            kwargs["context"] = context
        return kwargs


# The plan: steps a driver performs, outcomes it sends back -------------------------------


@dataclass(frozen=True)
class RunHandler:
    attempt: int


@dataclass(frozen=True)
class ScheduleRetry:
    attempt: int
    """The attempt number the retry will be."""
    delay: float
    error: BaseException


@dataclass(frozen=True)
class GiveUp:
    attempt: int
    error: BaseException
    reason: str
    """``non_retryable`` or ``exhausted``."""


@dataclass(frozen=True)
class Outcome:
    """What a RunHandler step produced."""

    value: str
    """A :class:`~outboxer.instrumentation.HandlerOutcome` value."""
    error: BaseException | None = None


Step = RunHandler | ScheduleRetry | GiveUp


def handler_plan(retry: Retry, first_attempt: int) -> Generator[Step, Outcome | None, str]:
    """The steps for one handler on one message; returns the final outcome."""
    attempt = first_attempt
    while True:
        outcome = yield RunHandler(attempt)
        assert outcome is not None
        if outcome.error is None:
            return outcome.value
        decision = retry.decide(attempt, outcome.error)
        if decision.verdict is Verdict.RETRY_NOW:
            attempt += 1
            continue
        if decision.verdict is Verdict.RETRY_LATER:
            yield ScheduleRetry(attempt + 1, decision.delay, outcome.error)
            return HandlerOutcome.RETRY_SCHEDULED
        yield GiveUp(attempt, outcome.error, decision.reason)
        return HandlerOutcome.DEAD_LETTERED


# Building what the steps write --------------------------------------------------------------


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
    headers.setdefault(FIRST_FAILED_AT, datetime.now(timezone.utc).isoformat())
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
    first = envelope.headers.get(FIRST_FAILED_AT)
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
        error_message=f"{error} ({reason} after {step.attempt} attempt"
        f"{'s' if step.attempt != 1 else ''})",
        traceback="".join(traceback.format_exception(type(error), error, error.__traceback__)),
        attempts=step.attempt,
        first_failed_at=datetime.fromisoformat(first) if first else None,
    )


def malformed_dead_letter(
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
    consumer: str,
    error_type: str,
    error: str,
    envelope: Envelope | None = None,
) -> NewDeadLetter:
    """A message the consumer could not use at all (origin ``consumer``)."""
    return NewDeadLetter(
        origin="consumer",
        envelope=envelope,
        raw_body=body,
        raw_headers=dict(headers),
        destination=destination,
        consumer=consumer,
        error_type=error_type,
        error_message=error,
        attempts=1,
    )


def error_type_name(error: BaseException) -> str:
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def context_for(
    envelope: Envelope, consumer: str, handler: HandlerSpec, attempt: int, redelivered: bool
) -> Context:
    return Context(
        message_id=envelope.message_id,
        message_type=envelope.type,
        consumer=consumer,
        handler=handler.name,
        attempt=attempt,
        headers={k: v for k, v in envelope.headers.items() if not k.startswith("outboxer-")},
        correlation_id=envelope.correlation,
        causation_id=envelope.causation_id,
        occurred_at=envelope.occurred_at,
        key=envelope.key,
        redelivered=redelivered,
    )


# Decoding -------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A delivered message, decoded and matched to the handlers it is for."""

    envelope: Envelope
    handlers: list[HandlerSpec]
    events: dict[str, Any] = field(default_factory=dict)
    """The decoded payload per handler id."""
    first_attempt: int = 1


@dataclass
class Rejected:
    """A delivered message that goes straight to the dead-letter table (or is skipped)."""

    dead_letter: NewDeadLetter | None
    reason: str


def prepare(
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
    consumer: str,
    handlers_by_type: Mapping[str, list[HandlerSpec]],
    handlers_by_id: Mapping[str, HandlerSpec],
) -> Prepared | Rejected:
    """Decode the envelope and the payload for each handler; any problem becomes a dead letter."""
    try:
        envelope = wire.decode(body, headers, destination)
    except DecodeError as exc:
        return Rejected(
            malformed_dead_letter(
                body, headers, destination, consumer, "malformed_envelope", str(exc)
            ),
            str(exc),
        )
    if envelope.handler is not None:
        target = handlers_by_id.get(envelope.handler)
        if target is None:
            # A retry or replay for a handler this consumer does not have (renamed, or
            # another consumer's): park it rather than lose it.
            return Rejected(
                malformed_dead_letter(
                    body,
                    headers,
                    destination,
                    consumer,
                    "unknown_handler",
                    f"message {envelope.message_id} is addressed to handler "
                    f"{envelope.handler!r}, which consumer {consumer!r} does not have",
                    envelope,
                ),
                "unknown handler",
            )
        targets = [target]
    else:
        targets = list(handlers_by_type.get(envelope.type, ()))
    if not targets:
        known = registered_type(envelope.type)
        return Rejected(
            malformed_dead_letter(
                body,
                headers,
                destination,
                consumer,
                "unknown_type",
                f"consumer {consumer!r} has no handler for message type {envelope.type!r}"
                + ("" if known else " (no @outboxer.message registers that type here)"),
                envelope,
            ),
            "unknown type",
        )
    events: dict[str, Any] = {}
    decoded: dict[int, Any] = {}
    for handler in targets:
        try:
            if handler.message_type is None:
                key = 0
                if key not in decoded:
                    decoded[key] = json.loads(envelope.payload)
            else:
                key = id(handler.message_type)
                if key not in decoded:
                    decoded[key] = handler.message_type.decode(envelope.payload)
        except (DecodeError, ValueError) as exc:
            problem = str(exc) if isinstance(exc, DecodeError) else f"payload is not JSON: {exc}"
            return Rejected(
                malformed_dead_letter(
                    body, headers, destination, consumer, "payload_mismatch", problem, envelope
                ),
                problem,
            )
        events[handler.id] = decoded[key]
    return Prepared(envelope, targets, events, envelope.attempt if envelope.handler else 1)
