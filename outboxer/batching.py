"""Batching: several deliveries for one handler in one transaction, one commit.

A worker that takes several deliveries at once hands them to :meth:`Batcher.process`.
The deliveries that can share a transaction are grouped by handler; each group runs as
one transaction: one multi-row inbox insert (rows already there are duplicates, skipped),
the handler once per new message, one commit. The runner then acknowledges the group at
once (one multiple-ack on RabbitMQ, ``DeleteMessageBatch`` on SQS).

Everything else goes through the one-message path of :mod:`outboxer.processing`, as
without batching: a delivery the intake rejects, a message for several handlers, a
retry or replay addressed to one handler, an async or non-transactional handler, and
the second of two deliveries with one inbox key.

When a group fails (a handler raises, the insert or the commit fails), its transaction
is rolled back and every message of it goes through the one-message path, so isolation,
retries and dead letters are exactly those of one message at a time. When a handler
raised an error of its own (not a database error, which may come from another message's
writes flushed late, or from an outage), that run counts as its message's first: the
error is fed to the message's retry plan as the first run's result, so the failure
spends no extra attempt and runs the handler no extra time. Every other message of the
group runs its handler once more (its first run was rolled back): a handler's effects
outside its transaction may repeat, as they may on any redelivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import SQLAlchemyError

from . import instrumentation
from .callables import call_sync
from .fallbacks import lost_database
from .guard import guarded
from .handlers import HandlerSpec
from .instrumentation import HandlerOutcome, TransportDescription
from .intake import Prepared
from .plan import RunResult
from .processing import Processor
from .publishing import handling
from .redaction import chain, redact
from .reports import MessageReport
from .store import inbox as inbox_store
from .transports.base import Delivery

__all__ = ["Batcher", "batchable"]

log = logging.getLogger("outboxer.consumer")

Outcome = MessageReport | BaseException
"""Per delivery: its report (acknowledge it) or the error (give it back)."""


def batchable(spec: HandlerSpec) -> bool:
    """Whether ``spec`` may share a transaction with other messages: a sync handler that
    runs in outboxer's transaction."""
    return not spec.is_async and spec.transactional


@dataclass
class _Item:
    index: int
    delivery: Delivery
    prepared: Prepared
    spec: HandlerSpec
    row: inbox_store.InboxRow
    outcome: str = HandlerOutcome.PROCESSED
    duration: float = 0.0


@dataclass(frozen=True)
class _Failed:
    """A group's transaction failed; ``item`` is the message whose handler raised, if any."""

    error: BaseException
    item: _Item | None


class Batcher:
    """Processes a worker's deliveries, batched per handler where it is safe."""

    def __init__(self, processor: Processor, transport: TransportDescription) -> None:
        self.processor = processor
        self.transport = transport

    def process(self, deliveries: Sequence[Delivery]) -> list[Outcome]:
        """Process ``deliveries``; one outcome per delivery, in order.

        A :class:`KeyboardInterrupt` or :class:`SystemExit` from a handler is the outcome
        of every delivery not yet settled by then (a stop: they go back to the broker).
        """
        results: list[Outcome | None] = [None] * len(deliveries)
        alone: list[int] = []
        groups: dict[str, list[_Item]] = {}
        keys: set[tuple[str, str]] = set()
        if len(deliveries) > 1:
            for index, delivery in enumerate(deliveries):
                item = self._item(index, delivery)
                if item is None or (item.spec.id, item.row.dedup_key) in keys:
                    alone.append(index)
                    continue
                keys.add((item.spec.id, item.row.dedup_key))
                groups.setdefault(item.spec.id, []).append(item)
        else:
            alone = list(range(len(deliveries)))
        known: dict[int, RunResult] = {}
        try:
            for items in groups.values():
                if len(items) == 1:
                    alone.append(items[0].index)
                    continue
                failed = self._run_group(items)
                if failed is None:
                    for item in items:
                        envelope = item.prepared.envelope
                        report = {item.spec.name: item.outcome}
                        results[item.index] = MessageReport(str(envelope.message_id), report)
                    continue
                alone.extend(item.index for item in items)
                if failed.item is not None:
                    known[failed.item.index] = RunResult(
                        HandlerOutcome.FAILED, redact(failed.error)
                    )
            for index in sorted(alone):
                results[index] = self._one(deliveries[index], known.get(index))
        except (KeyboardInterrupt, SystemExit) as stop:
            return [stop if result is None else result for result in results]
        done = [result for result in results if result is not None]
        assert len(done) == len(deliveries)
        return done

    # One group in one transaction ------------------------------------------------------

    def _item(self, index: int, delivery: Delivery) -> _Item | None:
        """The delivery as a member of its handler's group, or None: it goes alone."""
        processor = self.processor
        prepared = processor.intake(delivery.body, delivery.headers, delivery.destination)
        if not isinstance(prepared, Prepared) or len(prepared.handlers) != 1:
            return None
        envelope = prepared.envelope
        spec = prepared.handlers[0]
        if envelope.handler is not None or not batchable(spec):
            return None
        try:
            key = spec.dedup_value(envelope, prepared.events[spec.id])
        except Exception:
            return None  # the one-message path makes it the handler's failure
        row = inbox_store.InboxRow(spec.id, key, envelope.message_id, envelope.type)
        return _Item(index, delivery, prepared, spec, row)

    def _run_group(self, items: list[_Item]) -> _Failed | None:
        """Run ``items`` (one handler) in one transaction; None once it has committed."""
        processor = self.processor
        tracer = instrumentation.get()
        spec = items[0].spec
        current: _Item | None = None
        shared = _SharedSession(None)
        try:
            with (
                processor.session_factory() as session,
                session.begin(),
                _SharedSession(session) as shared,
            ):
                fresh = inbox_store.record_inbox_many(
                    session.connection(), [item.row for item in items]
                )
                for item, new in zip(items, fresh, strict=True):
                    envelope = item.prepared.envelope
                    attempt = item.prepared.first_attempt
                    started = time.perf_counter()
                    failure: BaseException | None = None
                    with (
                        tracer.process(self.transport, envelope, processor.name),
                        tracer.handler(envelope, spec.id, attempt) as span,
                    ):
                        span.set_attribute("outboxer.batch.size", len(items))
                        if new:
                            current = item
                            shared.next_handler()
                            failure = self._run_handler(item, session)
                        else:
                            item.outcome = HandlerOutcome.DUPLICATE
                        if failure is None:
                            span.set_attribute("outboxer.handler.outcome", item.outcome)
                    if failure is not None:
                        raise failure
                    item.duration = time.perf_counter() - started
                current = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            if isinstance(exc, SQLAlchemyError) or lost_database(exc) or shared.from_flush(exc):
                # A database error may come from an earlier handler's writes (flushed
                # late, or a session it broke), or from an outage; an error raised by a
                # flush may be an earlier handler's write: nobody to blame.
                current = None
            log.debug("a batch of %d for %s failed; one at a time", len(items), spec.id)
            return _Failed(exc, current)
        for item in items:
            tracer.handler_done(spec.id, item.outcome, item.duration)
        return None

    def _run_handler(self, item: _Item, session: Any) -> BaseException | None:
        """Run the handler on ``item``; its exception is returned (raised outside the
        spans, so that a batch's rolled-back run does not read as a failed message)."""
        spec, prepared = item.spec, item.prepared
        envelope = prepared.envelope
        event = prepared.event_for(spec.id)
        context = spec.context(
            envelope, self.processor.name, prepared.first_attempt, item.delivery.redelivered
        )
        who = f"handler {spec.id}"
        try:
            with handling(envelope), guarded(session, who):
                call_sync(spec.fn, who, event, **spec.arguments(event, session, context))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            return exc
        return None

    # One message at a time --------------------------------------------------------------

    def _one(self, delivery: Delivery, first: RunResult | None) -> Outcome:
        """The one-message path; ``first`` is the result of its handler's first run,
        when a failed batch ran it already."""
        try:
            return self.processor.process(
                delivery.body,
                delivery.headers,
                delivery.destination,
                delivery.redelivered,
                self.transport,
                first,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            return exc


class _SharedSession:
    """While a group's handlers share ``session``: what one handler wrote is in the database
    before any later statement runs, and a failed flush is known.

    One message at a time, a handler's writes are committed before the next message's
    handler runs, so it sees them whatever it queries with. In a batch they may still be
    pending in the session: an ORM query autoflushes them, but a Core statement
    (``session.connection().execute(...)``, ``session.execute(text(...))``) or a session
    made with ``autoflush=False`` does not. So before any statement on the session's
    connection, pending writes are flushed (a ``before_execute`` listener on that one
    connection); writes nobody reads are flushed at the commit, in one go.

    A flush that fails (a constraint, a mapper event that raises) may fail on an earlier
    handler's write, so its error blames nobody: the group goes one message at a time,
    where the failing write is its own message's (:meth:`from_flush`). A flush error that
    the handler handled (an insert in a savepoint, its IntegrityError caught) blames
    nobody else either: it is not what the handler raised.

    A handler may also throw away what the session holds: ``expunge_all()``,
    ``expire_all()``, or ``expunge()``, ``expire()``, ``refresh()`` of an object an earlier
    handler changed. One at a time that loses nothing (the earlier message committed); in
    a batch it would drop the earlier messages' pending writes while their inbox rows
    commit. So those calls first flush, when earlier handlers left writes pending (the
    handler's own writes so far go with them: one at a time, the call would have thrown
    them away; SQLAlchemy has no flush of some objects only).
    """

    _DISCARDING = ("expunge_all", "expire_all", "expunge", "expire", "refresh")

    def __init__(self, session: Any) -> None:
        self.session = session
        self.flush_errors: list[BaseException] = []
        """What failed flushes raised."""
        self.connection: Any = None
        self.earlier = False
        """Earlier handlers left writes pending when the running handler began."""

    def next_handler(self) -> None:
        """A handler is about to run: what is pending now is the earlier handlers'."""
        session = self.session
        is_clean = getattr(session, "_is_clean", None)  # O(1), where session.new copies
        if callable(is_clean):
            self.earlier = not is_clean()
        else:  # pragma: no cover - a SQLAlchemy without it
            self.earlier = bool(session.new or session.dirty or session.deleted)

    def __enter__(self) -> _SharedSession:
        session = self.session
        original = session.flush

        def flush(objects: Any = None) -> None:
            try:
                original(objects)
            except BaseException as exc:
                self.flush_errors.append(exc)
                raise

        setattr(session, "flush", flush)  # noqa: B010 - this session only
        for name in self._DISCARDING:
            setattr(session, name, self._flushing_first(getattr(session, name)))
        self.connection = session.connection()
        event.listen(self.connection, "before_execute", self._before_execute)
        return self

    def from_flush(self, error: BaseException) -> bool:
        """Whether ``error`` is, or comes from, what a failed flush raised."""
        return any(current is failed for current in chain(error) for failed in self.flush_errors)

    def _flushing_first(self, discard: Callable[..., Any]) -> Callable[..., Any]:
        def flushed_first(*args: Any, **kwargs: Any) -> Any:
            earlier, self.earlier = self.earlier, False
            if earlier:
                self.session.flush()
            return discard(*args, **kwargs)

        return flushed_first

    def __exit__(self, *exc: object) -> None:
        for name in ("flush", *self._DISCARDING):
            vars(self.session).pop(name, None)
        if self.connection is not None and event.contains(
            self.connection, "before_execute", self._before_execute
        ):
            event.remove(self.connection, "before_execute", self._before_execute)

    def _before_execute(self, *args: Any) -> None:
        session = self.session
        if not session._flushing and (session.new or session.dirty or session.deleted):
            session.flush()
