"""Processing one delivered message through the inbox, written once for sync and async.

The steps (:func:`outboxer.steps.message_steps`) are everything processing does; they
yield the I/O to perform and receive the results. :class:`Processor` carries the
requests out: :meth:`Processor.process` with sync sessions, :meth:`Processor.process_async`
with async ones. A handler runs in its transaction with its inbox row; rows are written
in a transaction of their own, with the fallbacks of :mod:`outboxer.fallbacks`. Only when
the database is down (or the connection was lost) does :meth:`Processor.process` raise:
then the delivery goes back to the broker.

The handler's session: it runs in the transaction outboxer opened with the inbox row, and
outboxer commits it when the handler returns. ``session.commit()`` and
``session.rollback()`` are refused while the handler runs (:class:`HandlerSessionError`,
dead-lettered at once), since either would split the inbox row from the handler's work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from .callables import being_cancelled, call_async, call_sync
from .diagnosis import refuses_writes, try_again
from .failures import RunChannel
from .fallbacks import Job, lost_database, no_connection
from .guard import guarded
from .handlers import HandlerRegistry
from .instrumentation import HandlerOutcome, TransportDescription
from .intake import Prepared, Rejected
from .plan import RunResult
from .publishing import handling
from .redaction import redact
from .reports import MessageReport
from .steps import Run, intake, message_steps
from .store import inbox as inbox_store
from .untransacted import run_untransacted_async, run_untransacted_sync

__all__ = ["Processor", "lost_database", "no_connection"]

T = TypeVar("T")


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
        """Carry out the steps (:func:`~outboxer.steps.message_steps`) with sync sessions.
        ``first``: the result of the first handler run, when it happened already (a failed
        batch ran it)."""
        steps = message_steps(
            self.name, self.registry, body, headers, destination, redelivered, transport
        )
        request = next(steps)
        while True:
            try:
                if isinstance(request, Run) and first is not None:
                    result: Any = first
                    first = None
                elif isinstance(request, Run):
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
        """Carry out the steps with async sessions."""
        steps = message_steps(
            self.name, self.registry, body, headers, destination, redelivered, transport
        )
        request = next(steps)
        while True:
            try:
                if isinstance(request, Run):
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

    # Intake (outboxer.steps) ---------------------------------------------------------

    def intake(
        self, body: bytes, headers: Mapping[str, str], destination: str
    ) -> Prepared | Rejected:
        """The delivery decoded and matched to its handlers (:func:`outboxer.steps.intake`)."""
        return intake(self.name, self.registry, body, headers, destination)

    # I/O --------------------------------------------------------------------------------

    def _run_sync(self, run: Run) -> RunResult:
        envelope, spec = run.prepared.envelope, run.spec
        context = spec.context(envelope, self.name, run.attempt, run.redelivered)
        connected = False
        try:
            event = run.prepared.event_for(spec.id)
            if not spec.transactional:
                return run_untransacted_sync(
                    self.session_factory, spec, event, context, envelope, run.inbox_row(event)
                )
            with self.session_factory() as session, session.begin():
                connection = session.connection()
                connected = True
                if not inbox_store.record_inbox(connection, **run.inbox_row(event)):
                    return RunResult(HandlerOutcome.DUPLICATE)
                who = f"handler {spec.id}"
                with handling(envelope), guarded(session, who):
                    call_sync(spec.fn, who, event, **spec.arguments(event, session, context))
        except (KeyboardInterrupt, SystemExit):
            raise  # a shutdown signal: the runner stops and gives the delivery back
        except BaseException as exc:
            if lost_database(exc) or try_again(exc) or refuses_writes(exc):
                # Not the handler's fault (a lost connection, a deadlock, a lock-wait
                # timeout, a read-only server): give the delivery back, spend no attempt.
                raise
            if not connected and no_connection(exc):
                raise
            return RunResult(HandlerOutcome.FAILED, redact(exc))
        return RunResult(HandlerOutcome.PROCESSED)

    async def _run_async(self, run: Run) -> RunResult:
        envelope, spec = run.prepared.envelope, run.spec
        context = spec.context(envelope, self.name, run.attempt, run.redelivered)
        connected = False
        try:
            event = run.prepared.event_for(spec.id)
            row = run.inbox_row(event)
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
                with handling(envelope), guarded(session.sync_session, f"handler {spec.id}"):
                    await call_async(spec.fn, event, **spec.arguments(event, session, context))
        except (KeyboardInterrupt, SystemExit):
            raise
        except asyncio.CancelledError as exc:
            if being_cancelled():
                raise  # the task is cancelled (shutdown), not failed
            return RunResult(HandlerOutcome.FAILED, exc)
        except BaseException as exc:
            if lost_database(exc) or try_again(exc) or refuses_writes(exc):
                raise
            if not connected and no_connection(exc):
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
