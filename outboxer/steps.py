"""Everything processing one delivered message does, as steps that yield their I/O.

:func:`message_steps` is intake, then for each handler its plan
(:func:`~outboxer.plan.handler_plan`), spans, retry and dead-letter writes. It yields
the I/O to perform (:class:`Run` a handler in its transaction; a
:class:`~outboxer.fallbacks.Write` of rows in a transaction of their own; a
:class:`~outboxer.failures.RunChannel`) and receives the results; the drivers in
:mod:`outboxer.processing` only carry the requests out, with sync or async sessions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from . import instrumentation, store
from .adapters import take_in
from .failures import Failure, RunChannel, channel_steps, default_channel
from .fallbacks import Write, first_written, park, park_jobs
from .handlers import MESSAGE_ID_KEY, HandlerRegistry, HandlerSpec
from .instrumentation import HandlerOutcome, TransportDescription
from .intake import Prepared, Rejected, prepare
from .plan import (
    GiveUp,
    RunHandler,
    RunResult,
    ScheduleRetry,
    Step,
    error_type_name,
    handler_dead_letter,
    handler_plan,
    plural,
    retry_message,
)
from .redaction import error_text, printable
from .reports import MessageReport
from .store import dead_letters as dead_letter_store
from .store import inbox as inbox_store

__all__ = ["Request", "Run", "intake", "message_steps"]

log = logging.getLogger("outboxer.consumer")


@dataclass(frozen=True)
class Run:
    """I/O request: run ``spec`` in its transaction with its inbox row."""

    spec: HandlerSpec
    prepared: Prepared
    attempt: int
    redelivered: bool

    def inbox_row(self, event: Any) -> dict[str, Any]:
        envelope = self.prepared.envelope
        return {
            "handler": self.spec.id,
            "dedup_key": self.spec.dedup_value(envelope, event),
            "message_id": envelope.message_id,
            "message_type": envelope.type,
        }


Request = Run | Write | RunChannel


def intake(
    consumer: str,
    registry: HandlerRegistry,
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
) -> Prepared | Rejected:
    """The delivery decoded and matched to its handlers: an inbound adapter's plain
    message (:func:`~outboxer.adapters.take_in`), or one of outboxer's
    (:func:`~outboxer.intake.prepare`)."""
    adapter = registry.adapter_for(destination)
    if adapter is not None:
        return take_in(body, headers, destination, consumer, adapter)
    return prepare(body, headers, destination, consumer, registry)


def message_steps(
    consumer: str,
    registry: HandlerRegistry,
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
    redelivered: bool,
    transport: TransportDescription,
) -> Generator[Request, Any, MessageReport]:
    """Everything processing one message does; yields I/O requests, returns the report."""
    prepared = intake(consumer, registry, body, headers, destination)
    if isinstance(prepared, Rejected):
        yield from park(consumer, prepared.dead_letter, destination)
        log.warning(
            "message dead-lettered by consumer %s: %s", consumer, printable(prepared.reason)
        )
        return MessageReport(_message_id(headers), {}, prepared.reason)
    tracer = instrumentation.get()
    envelope = prepared.envelope
    outcomes: dict[str, str] = {}
    with tracer.process(transport, envelope, consumer):
        for spec in prepared.handlers:
            yield from _handler_steps(consumer, spec, prepared, redelivered, outcomes)
    return MessageReport(str(envelope.message_id), outcomes)


def _handler_steps(
    consumer: str,
    spec: HandlerSpec,
    prepared: Prepared,
    redelivered: bool,
    outcomes: dict[str, str],
) -> Generator[Request, Any, None]:
    tracer = instrumentation.get()
    envelope = prepared.envelope
    plan = handler_plan(spec.retry, prepared.first_attempt)
    step: Step | None = next(plan)
    while isinstance(step, RunHandler):
        # One span per run; a retry or dead-letter decision is a child of the run that
        # failed, and sets its outcome.
        started = time.perf_counter()
        with tracer.handler(envelope, spec.id, step.attempt) as span:
            result: RunResult = yield Run(spec, prepared, step.attempt, redelivered)
            label = result.outcome
            if result.error is not None:
                span.record_error(result.error)
            step = _advance(plan, result, outcomes, spec)
            if isinstance(step, ScheduleRetry):
                label = yield from _schedule_retry(consumer, spec, prepared, step)
                step = _advance(plan, None, outcomes, spec)
                outcomes[spec.name] = label
            elif isinstance(step, GiveUp):
                label = yield from _give_up(consumer, spec, prepared, step)
                step = _advance(plan, None, outcomes, spec)
                outcomes[spec.name] = label
            span.set_attribute("outboxer.handler.outcome", label)
        tracer.handler_done(spec.id, label, time.perf_counter() - started)


def _schedule_retry(
    consumer: str, spec: HandlerSpec, prepared: Prepared, step: ScheduleRetry
) -> Generator[Request, Any, str]:
    tracer = instrumentation.get()
    envelope = prepared.envelope
    with tracer.step("retry", envelope, {"outboxer.handler": spec.id}) as span:
        message = retry_message(envelope, spec, consumer, step, span.trace_headers())
        span.set_attribute("outboxer.retry.delay", step.delay)
        # The retry cannot be written (a field the outbox refuses): give up instead.
        fallback = GiveUp(step.attempt - 1, step.error, "exhausted")
        row = handler_dead_letter(envelope, spec, consumer, fallback, span.trace_headers())
        used = yield from first_written(
            partial(store.insert_messages, messages=[message]),
            *park_jobs(consumer, row, envelope.destination),
        )
    if used:
        log.warning(
            "handler %s failed on message %s and its retry could not be written; dead-lettered: %s",
            spec.id,
            envelope.message_id,
            printable(error_text(step.error)),
        )
        return HandlerOutcome.DEAD_LETTERED
    log.info(
        "handler %s failed on message %s (attempt %d): %s; retry in %.1f s",
        spec.id,
        envelope.message_id,
        step.attempt - 1,
        printable(error_text(step.error)),
        step.delay,
    )
    return HandlerOutcome.RETRY_SCHEDULED


def _give_up(
    consumer: str, spec: HandlerSpec, prepared: Prepared, step: GiveUp
) -> Generator[Request, Any, str]:
    tracer = instrumentation.get()
    envelope = prepared.envelope
    attributes = {"outboxer.handler": spec.id, "error.type": error_type_name(step.error)}
    with tracer.step("dead_letter", envelope, attributes) as span:
        row = handler_dead_letter(envelope, spec, consumer, step, span.trace_headers())
        channel = spec.error_channel or default_channel()
        if channel is not None:
            span.set_attribute("outboxer.error_channel", channel.name)
            try:
                event = prepared.event_for(spec.id)  # not the one its runs may have changed
            except Exception:
                event = prepared.events[spec.id]
            failure = Failure(
                event, envelope, step.error, step.attempt, consumer, spec.name, step.reason
            )
            try:
                inbox = Run(spec, prepared, step.attempt, False).inbox_row(event)
            except Exception:
                # The handler failed on its key (a key function that raised): the channel's
                # row records the message by its id, which no business key can be.
                inbox = {
                    "handler": spec.id,
                    "dedup_key": MESSAGE_ID_KEY + str(envelope.message_id),
                    "message_id": envelope.message_id,
                    "message_type": envelope.type,
                }
            handled, note = yield from channel_steps(
                channel,
                failure,
                spec.id,
                dead_letter=partial(dead_letter_store.insert_dead_letters, rows=[row]),
                inbox=partial(inbox_store.record_inbox, **inbox),
            )
            if handled is not None:
                return handled
            row = replace(row, error_message=f"{row.error_message}; {note}")
        yield from park(consumer, row, envelope.destination)
    log.warning(
        "handler %s gave up on message %s after %s (%s): %s",
        spec.id,
        envelope.message_id,
        plural(step.attempt, "attempt"),
        step.reason,
        printable(error_text(step.error)),
    )
    return HandlerOutcome.DEAD_LETTERED


def _message_id(headers: Mapping[str, Any]) -> str | None:
    value = headers.get("outboxer-id")
    return value[:64] if isinstance(value, str) else None


def _advance(
    plan: Generator[Step, RunResult | None, str],
    feedback: RunResult | None,
    outcomes: dict[str, str],
    spec: HandlerSpec,
) -> Step | None:
    """The plan's next step, or None once it has decided (the decision goes in ``outcomes``)."""
    try:
        return plan.send(feedback)
    except StopIteration as done:
        outcomes[spec.name] = str(done.value)
        return None
