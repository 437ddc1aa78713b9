"""Processing one delivered message through the inbox, written once for sync and async.

:meth:`Processor.steps` is everything processing does: intake, then for each handler its
plan, spans, retry and dead-letter writes. It yields the I/O to perform (:class:`_Run` a
handler in its transaction; :class:`_Write` rows in a transaction of their own) and
receives the results; :meth:`Processor.process` and :meth:`Processor.process_async` only
carry the requests out.

Writes cannot fail because of a message. A :class:`_Write` lists fallbacks: a retry that
cannot be written becomes the handler's dead letter, a dead letter that cannot be written
becomes a quarantine row that needs nothing from the message. Only when even that fails
(or the connection was lost) is the database down: then :meth:`process` raises and the
delivery goes back to the broker.

The handler's session: it runs in the transaction outboxer opened with the inbox row, and
outboxer commits it when the handler returns. ``session.commit()`` and
``session.rollback()`` are refused while the handler runs (:class:`HandlerSessionError`,
dead-lettered at once), since either would split the inbox row from the handler's work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from . import instrumentation, store
from .adapters import take_in
from .failures import Failure, RunChannel, channel_steps, default_channel
from .guard import guarded
from .handlers import HandlerRegistry, HandlerSpec
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
from .publishing import handling
from .redaction import error_text, printable, redact
from .reports import MessageReport
from .store import dead_letters as dead_letter_store
from .store import inbox as inbox_store
from .store.dead_letters import NewDeadLetter
from .untransacted import run_untransacted_async, run_untransacted_sync

__all__ = ["Processor", "lost_database", "no_connection"]

log = logging.getLogger("outboxer.consumer")

T = TypeVar("T")
Job = Callable[[Connection], Any]

_QUARANTINE_BYTES = 64 * 1024
"""What a quarantine row keeps of the body: the start, enough to recognise the message."""


def lost_database(error: BaseException) -> bool:
    """The database connection went away (restart, failover, network): an outage, not a
    handler failure. SQLAlchemy marks those errors ``connection_invalidated``."""
    return isinstance(error, DBAPIError) and error.connection_invalidated


def no_connection(error: BaseException) -> bool:
    """No connection could be opened (refused, "the database system is starting up", too
    many clients): the database is down, and nothing was sent to it. SQLAlchemy raises
    those with no statement."""
    return isinstance(error, DBAPIError) and error.statement is None


@dataclass(frozen=True)
class _Run:
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


@dataclass(frozen=True)
class _Write:
    """I/O request: call ``job`` with a connection in a transaction of its own.

    The driver sends back None, or the exception the write raised (the steps decide).
    """

    job: Job


_Request = _Run | _Write | RunChannel


class Processor:
    """Runs a consumer's handlers on one message: :meth:`process` or :meth:`process_async`."""

    def __init__(
        self, name: str, registry: HandlerRegistry, session_factory: Callable[[], Any]
    ) -> None:
        self.name = name
        self.registry = registry
        self.session_factory = session_factory

    # The drivers ----------------------------------------------------------------------

    def process(
        self,
        body: bytes,
        headers: Mapping[str, str],
        destination: str,
        redelivered: bool,
        transport: TransportDescription,
        first: RunResult | None = None,
    ) -> MessageReport:
        """Carry out :meth:`steps` with sync sessions. ``first``: the result of the first
        handler run, when it happened already (a failed batch ran it)."""
        steps = self.steps(body, headers, destination, redelivered, transport)
        request = next(steps)
        while True:
            try:
                if isinstance(request, _Run) and first is not None:
                    result: Any = first
                    first = None
                elif isinstance(request, _Run):
                    result = self._run_sync(request)
                elif isinstance(request, RunChannel):
                    result = request.run_sync(self.session_factory)
                else:
                    result = _attempt(self.transaction_sync, request.job)
            except BaseException as exc:
                steps.throw(exc)  # unwind the steps (and their spans) in this thread
                raise
            try:
                request = steps.send(result)
            except StopIteration as done:
                report: MessageReport = done.value
                return report

    async def process_async(
        self,
        body: bytes,
        headers: Mapping[str, str],
        destination: str,
        redelivered: bool,
        transport: TransportDescription,
    ) -> MessageReport:
        """Carry out :meth:`steps` with async sessions."""
        steps = self.steps(body, headers, destination, redelivered, transport)
        request = next(steps)
        while True:
            try:
                if isinstance(request, _Run):
                    result: Any = await self._run_async(request)
                elif isinstance(request, RunChannel):
                    result = await request.run_async(self.session_factory)
                else:
                    try:
                        await self.transaction_async(request.job)
                        result = None
                    except Exception as exc:
                        result = exc
            except BaseException as exc:
                steps.throw(exc)  # unwind the steps (and their spans) in this task
                raise
            try:
                request = steps.send(result)
            except StopIteration as done:
                report: MessageReport = done.value
                return report

    # Everything processing does --------------------------------------------------------

    def intake(
        self, body: bytes, headers: Mapping[str, str], destination: str
    ) -> Prepared | Rejected:
        """The delivery decoded and matched to its handlers: an inbound adapter's plain
        message (:func:`~outboxer.adapters.take_in`), or one of outboxer's
        (:func:`~outboxer.intake.prepare`)."""
        adapter = self.registry.adapter_for(destination)
        if adapter is not None:
            return take_in(body, headers, destination, self.name, adapter)
        return prepare(body, headers, destination, self.name, self.registry)

    def steps(
        self,
        body: bytes,
        headers: Mapping[str, str],
        destination: str,
        redelivered: bool,
        transport: TransportDescription,
    ) -> Generator[_Request, Any, MessageReport]:
        """Everything processing one message does; yields I/O requests, returns the report."""
        prepared = self.intake(body, headers, destination)
        if isinstance(prepared, Rejected):
            yield from self._park(prepared.dead_letter, destination)
            log.warning(
                "message dead-lettered by consumer %s: %s", self.name, printable(prepared.reason)
            )
            return MessageReport(_message_id(headers), {}, prepared.reason)
        tracer = instrumentation.get()
        envelope = prepared.envelope
        outcomes: dict[str, str] = {}
        with tracer.process(transport, envelope, self.name):
            for spec in prepared.handlers:
                yield from self._handler_steps(spec, prepared, redelivered, outcomes)
        return MessageReport(str(envelope.message_id), outcomes)

    def _handler_steps(
        self, spec: HandlerSpec, prepared: Prepared, redelivered: bool, outcomes: dict[str, str]
    ) -> Generator[_Request, Any, None]:
        tracer = instrumentation.get()
        envelope = prepared.envelope
        plan = handler_plan(spec.retry, prepared.first_attempt)
        step: Step | None = next(plan)
        while isinstance(step, RunHandler):
            # One span per run; a retry or dead-letter decision is a child of the run that
            # failed, and sets its outcome.
            started = time.perf_counter()
            with tracer.handler(envelope, spec.id, step.attempt) as span:
                result: RunResult = yield _Run(spec, prepared, step.attempt, redelivered)
                label = result.outcome
                if result.error is not None:
                    span.record_error(result.error)
                step = _advance(plan, result, outcomes, spec)
                if isinstance(step, ScheduleRetry):
                    label = yield from self._schedule_retry(spec, prepared, step)
                    step = _advance(plan, None, outcomes, spec)
                    outcomes[spec.name] = label
                elif isinstance(step, GiveUp):
                    label = yield from self._give_up(spec, prepared, step)
                    step = _advance(plan, None, outcomes, spec)
                    outcomes[spec.name] = label
                span.set_attribute("outboxer.handler.outcome", label)
            tracer.handler_done(spec.id, label, time.perf_counter() - started)

    def _schedule_retry(
        self, spec: HandlerSpec, prepared: Prepared, step: ScheduleRetry
    ) -> Generator[_Request, Any, str]:
        tracer = instrumentation.get()
        envelope = prepared.envelope
        with tracer.step("retry", envelope, {"outboxer.handler": spec.id}) as span:
            message = retry_message(envelope, spec, self.name, step, span.trace_headers())
            span.set_attribute("outboxer.retry.delay", step.delay)
            # The retry cannot be written (a field the outbox refuses): give up instead.
            fallback = GiveUp(step.attempt - 1, step.error, "exhausted")
            row = handler_dead_letter(envelope, spec, self.name, fallback, span.trace_headers())
            used = yield from self._first_written(
                partial(store.insert_messages, messages=[message]),
                *self._park_jobs(row, envelope.destination),
            )
        if used:
            log.warning(
                "handler %s failed on message %s and its retry could not be written; "
                "dead-lettered: %s",
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
        self, spec: HandlerSpec, prepared: Prepared, step: GiveUp
    ) -> Generator[_Request, Any, str]:
        tracer = instrumentation.get()
        envelope = prepared.envelope
        attributes = {"outboxer.handler": spec.id, "error.type": error_type_name(step.error)}
        with tracer.step("dead_letter", envelope, attributes) as span:
            row = handler_dead_letter(envelope, spec, self.name, step, span.trace_headers())
            channel = spec.error_channel or default_channel()
            if channel is not None:
                span.set_attribute("outboxer.error_channel", channel.name)
                event = prepared.events[spec.id]
                failure = Failure(
                    event, envelope, step.error, step.attempt, self.name, spec.name, step.reason
                )
                inbox = _Run(spec, prepared, step.attempt, False).inbox_row(event)
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
            yield from self._park(row, envelope.destination)
        log.warning(
            "handler %s gave up on message %s after %s (%s): %s",
            spec.id,
            envelope.message_id,
            plural(step.attempt, "attempt"),
            step.reason,
            printable(error_text(step.error)),
        )
        return HandlerOutcome.DEAD_LETTERED

    def _park(self, row: NewDeadLetter, destination: str) -> Generator[_Request, Any, int]:
        """Write ``row``; if the database refuses it, a quarantine row in its place."""
        return (yield from self._first_written(*self._park_jobs(row, destination)))

    def _park_jobs(self, row: NewDeadLetter, destination: str) -> tuple[Job, Job]:
        body = row.envelope.payload if row.envelope is not None else row.raw_body
        last_resort = dead_letter_store.quarantine(
            consumer=self.name,
            destination=destination,
            error_type="quarantined",
            error=(
                f"a message's dead letter could not be stored (origin {row.origin}, "
                f"{row.error_type}: {row.error_message[:500]}); only the first "
                f"{_QUARANTINE_BYTES} bytes of its {len(body)}-byte body are kept, see the "
                "consumer's log"
            ),
            payload=bytes(body[:_QUARANTINE_BYTES]),
        )
        return (
            partial(dead_letter_store.insert_dead_letters, rows=[row]),
            partial(dead_letter_store.insert_dead_letters, rows=[last_resort]),
        )

    def _first_written(self, *jobs: Job) -> Generator[_Request, Any, int]:
        """Write the first of ``jobs`` the database takes; returns its index.

        A job the database refuses falls back to the next. A lost connection is tried
        once more first (a database restart passes; a message that breaks the connection,
        one larger than the server's packet limit, breaks it again). A database that
        cannot be connected to refused nothing: its error is raised at once, and the
        delivery goes back (falling back then would dead-letter the message for an outage
        once the server is back). When the last job fails too, that error is raised.
        """
        for index, job in enumerate(jobs):
            error: Exception | None = yield _Write(job)
            if error is not None and lost_database(error) and not no_connection(error):
                error = yield _Write(job)
            if error is None:
                return index
            if no_connection(error):
                raise error  # the database is down, not refusing this row: give it back
            if index == len(jobs) - 1:
                raise error
            _log_fallback(error)
        raise AssertionError("no jobs to write")  # pragma: no cover

    # I/O --------------------------------------------------------------------------------

    def _run_sync(self, run: _Run) -> RunResult:
        envelope, spec = run.prepared.envelope, run.spec
        event = run.prepared.events[spec.id]
        context = spec.context(envelope, self.name, run.attempt, run.redelivered)
        connected = False
        try:
            if not spec.transactional:
                return run_untransacted_sync(
                    self.session_factory, spec, event, context, envelope, run.inbox_row(event)
                )
            with self.session_factory() as session, session.begin():
                connection = session.connection()
                connected = True
                if not inbox_store.record_inbox(connection, **run.inbox_row(event)):
                    return RunResult(HandlerOutcome.DUPLICATE)
                with handling(envelope), guarded(session, spec):
                    spec.fn(event, **spec.arguments(event, session, context))
        except (KeyboardInterrupt, SystemExit):
            raise  # a shutdown signal: the runner stops and gives the delivery back
        except BaseException as exc:
            if lost_database(exc) or (not connected and no_connection(exc)):
                raise  # not the handler's fault: give the delivery back, spend no attempt
            return RunResult(HandlerOutcome.FAILED, redact(exc))
        return RunResult(HandlerOutcome.PROCESSED)

    async def _run_async(self, run: _Run) -> RunResult:
        envelope, spec = run.prepared.envelope, run.spec
        event = run.prepared.events[spec.id]
        context = spec.context(envelope, self.name, run.attempt, run.redelivered)
        row = run.inbox_row(event)
        connected = False
        try:
            if not spec.transactional:
                return await run_untransacted_async(
                    self.session_factory, spec, event, context, envelope, row
                )
            async with self.session_factory() as session, session.begin():
                await session.connection()
                connected = True
                recorded = await session.run_sync(
                    lambda s: inbox_store.record_inbox(s.connection(), **row)
                )
                if not recorded:
                    return RunResult(HandlerOutcome.DUPLICATE)
                with handling(envelope), guarded(session.sync_session, spec):
                    await spec.fn(event, **spec.arguments(event, session, context))
        except (KeyboardInterrupt, SystemExit):
            raise
        except asyncio.CancelledError as exc:
            if _being_cancelled():
                raise  # the task is cancelled (shutdown), not failed
            return RunResult(HandlerOutcome.FAILED, exc)
        except BaseException as exc:
            if lost_database(exc) or (not connected and no_connection(exc)):
                raise
            return RunResult(HandlerOutcome.FAILED, redact(exc))
        return RunResult(HandlerOutcome.PROCESSED)

    def transaction_sync(self, fn: Callable[[Connection], T]) -> T:
        """``fn(connection)`` in a transaction of its own (sync session factory)."""
        with self.session_factory() as session, session.begin():
            return fn(session.connection())

    async def transaction_async(self, fn: Callable[[Connection], T]) -> T:
        """``fn(connection)`` in a transaction of its own (async session factory)."""
        async with self.session_factory() as session, session.begin():
            result: T = await session.run_sync(lambda s: fn(s.connection()))
            return result


def _attempt(transaction: Callable[[Job], Any], job: Job) -> Exception | None:
    try:
        transaction(job)
    except Exception as exc:
        return exc
    return None


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return task is None or cancelling is None or cancelling() > 0


def _log_fallback(exc: BaseException) -> None:
    log.warning(
        "the database refused a row built from a message (%s); writing a simpler one",
        printable(f"{type(exc).__name__}: {error_text(exc).splitlines()[0] if str(exc) else ''}"),
    )


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
