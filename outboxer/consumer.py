"""Consumers: handlers that run exactly once per message, through the inbox.

    consumer = outboxer.Consumer(Session, name="billing")

    @consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=5))
    def charge(event: OrderPlaced, session) -> None: ...

Each handler of a message runs in its own transaction, with its inbox row
(handler, message id); a duplicate delivery finds the row and skips. A failing
handler is retried alone: at once in process (``instant``), then through the outbox
with a delay, addressed to that handler only; when it gives up, the message goes to
the dead-letter table. The broker delivery is acknowledged only after every handler's
outcome is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from . import instrumentation, store
from .async_support import AsyncSession  # a stand-in without greenlet
from .errors import ConfigurationError, TransportError
from .inbox import (
    GiveUp,
    HandlerSpec,
    Outcome,
    Prepared,
    Rejected,
    RunHandler,
    ScheduleRetry,
    Step,
    context_for,
    handler_dead_letter,
    handler_plan,
    prepare,
    retry_message,
)
from .instrumentation import HandlerOutcome, TransportDescription
from .message import message_type_for
from .publishing import handling
from .retry import Retry
from .session import AsyncOutboxSession, OutboxMixin
from .store import dead_letters as dead_letter_store
from .store import inbox as inbox_store
from .transports.base import Delivery, Subscription, Transport

__all__ = ["Consumer", "ConsumerStats", "MessageReport"]

log = logging.getLogger("outboxer.consumer")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_NO_TRANSPORT = TransportDescription("none")
_PRUNE_BATCH = 1000


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
    rejected: int = 0
    failed_deliveries: int = 0
    """Deliveries given back to the broker because bookkeeping failed (e.g. database down)."""

    def add(self, report: MessageReport) -> None:
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
    """I/O request: call ``fn`` with a connection inside a transaction of its own."""

    fn: Callable[[Connection], Any]


class Consumer:
    """A consumer group: a name (its queue), a session factory, and handlers.

    ``session_factory`` makes the session each handler runs in: a ``sessionmaker`` of
    :class:`~outboxer.OutboxSession` for sync handlers, an ``async_sessionmaker`` of
    :class:`~outboxer.AsyncOutboxSession` for ``async def`` handlers. ``retry`` is the
    default policy of its handlers. Inbox rows older than ``inbox_retention`` seconds
    (default 7 days) are pruned by the running consumer, and dead letters older than
    ``dead_letter_retention`` when it is set.
    """

    def __init__(
        self,
        session_factory: Callable[[], Any],
        *,
        name: str,
        retry: Retry | None = None,
        prefetch: int = 50,
        inbox_retention: float = 7 * 24 * 3600,
        dead_letter_retention: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigurationError(f"a consumer needs a name of 1-200 characters, got {name!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(f"retry must be an outboxer.Retry, got {retry!r}")
        self.name = name
        self.session_factory = session_factory
        self.retry = retry or Retry()
        self.prefetch = prefetch
        self.inbox_retention = inbox_retention
        self.dead_letter_retention = dead_letter_retention
        self.is_async = _factory_is_async(session_factory, name)
        self._by_type: dict[str, list[HandlerSpec]] = {}
        self._by_id: dict[str, HandlerSpec] = {}
        self._stop = threading.Event()
        self.stats = ConsumerStats()

    # Registration ---------------------------------------------------------------------

    def handler(
        self,
        message: type | str,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        dedup_key: str | Callable[[Any], object] | None = None,
        destination: str | None = None,
    ) -> Callable[[F], F]:
        """Register a handler for ``message`` (a registered class, or a type name for dicts).

        The handler gets the decoded event as its first argument; parameters named
        ``session`` (this handler's transaction) and ``context`` (a
        :class:`~outboxer.inbox.Context`) are passed by name. ``retry`` overrides the
        consumer's policy; ``dedup_key`` (a field name or a function of the event) makes
        the inbox deduplicate on a business key instead of the message id.
        ``destination`` says where messages of a dict type come from.
        """

        def register(fn: F) -> F:
            spec = self._spec(fn, message, name, retry, dedup_key, destination)
            if spec.id in self._by_id:
                raise ConfigurationError(
                    f"consumer {self.name!r} already has a handler named {spec.name!r}; pass "
                    "name=... to tell them apart (the name keys the inbox and retries)"
                )
            self._by_id[spec.id] = spec
            self._by_type.setdefault(spec.type_name, []).append(spec)
            return fn

        return register

    def _spec(
        self,
        fn: Callable[..., Any],
        message: type | str,
        name: str | None,
        retry: Retry | None,
        dedup_key: str | Callable[[Any], object] | None,
        destination: str | None,
    ) -> HandlerSpec:
        handler_name = name or getattr(fn, "__name__", None)
        if not handler_name or not isinstance(handler_name, str) or len(handler_name) > 50:
            raise ConfigurationError(f"handler name must be 1-50 characters, got {handler_name!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(
                f"handler {handler_name!r}: retry must be an outboxer.Retry, got {retry!r}"
            )
        if isinstance(message, str):
            message_type = None
            type_name = message
            if not destination:
                raise ConfigurationError(
                    f"handler {handler_name!r} takes dicts of type {message!r}: pass "
                    "destination=... (where those messages are published)"
                )
        else:
            message_type = message_type_for(message)
            type_name = message_type.name
            destination = destination or message_type.destination
            if not destination:
                raise ConfigurationError(
                    f"handler {handler_name!r}: message type {type_name!r} has no destination; "
                    "pass destination=... to the handler or to @outboxer.message"
                )
        is_async = inspect.iscoroutinefunction(fn)
        if is_async != self.is_async:
            kind = "an async def" if is_async else "a plain def"
            need = (
                "async_sessionmaker(..., class_=outboxer.AsyncOutboxSession)"
                if is_async
                else ("sessionmaker(..., class_=outboxer.OutboxSession)")
            )
            raise ConfigurationError(
                f"handler {handler_name!r} is {kind} function but consumer {self.name!r} was "
                f"given a {'async' if self.is_async else 'sync'} session factory; use {need}"
            )
        wants_session, wants_context = _check_signature(fn, handler_name)
        key_fn: Callable[[Any], object] | None
        if isinstance(dedup_key, str):
            attribute = dedup_key
            key_fn = lambda event: (  # noqa: E731
                event.get(attribute) if isinstance(event, Mapping) else getattr(event, attribute)
            )
        else:
            key_fn = dedup_key
        return HandlerSpec(
            name=handler_name,
            id=f"{self.name}:{handler_name}",
            fn=fn,
            type_name=type_name,
            message_type=message_type,
            destination=destination,
            retry=retry or self.retry,
            dedup_key=key_fn,
            is_async=is_async,
            wants_session=wants_session,
            wants_context=wants_context,
        )

    @property
    def handlers(self) -> list[HandlerSpec]:
        return list(self._by_id.values())

    def subscription(self) -> Subscription:
        """The queue and bindings this consumer needs from a broker."""
        bindings: list[tuple[str, str]] = []
        for spec in self._by_id.values():
            if (spec.destination, spec.type_name) not in bindings:
                bindings.append((spec.destination, spec.type_name))
        return Subscription(queue=self.name, bindings=bindings, prefetch=self.prefetch)

    # Processing one message -----------------------------------------------------------

    def process(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        destination: str = "",
        redelivered: bool = False,
        transport: TransportDescription = _NO_TRANSPORT,
    ) -> MessageReport:
        """Run the handlers of one received message through the inbox (sync handlers).

        For applications with their own consumer loop: pass the body and the canonical
        headers (see :mod:`outboxer.wire`), acknowledge the message after this returns.
        Raises only when the outcome could not be recorded (the database is down): then
        do not acknowledge.
        """
        if self.is_async:
            raise ConfigurationError(
                f"consumer {self.name!r} has async handlers: await consumer.process_async(...)"
            )
        steps = self._steps(body, headers, destination, redelivered, transport)
        request = next(steps)
        while True:
            try:
                if isinstance(request, _Run):
                    result: Any = self._run_sync(request)
                else:
                    result = self._transaction_sync(request.fn)
            except BaseException as exc:
                # Unwind the steps (and their spans) here, in this thread and context.
                steps.throw(exc)
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
        *,
        destination: str = "",
        redelivered: bool = False,
        transport: TransportDescription = _NO_TRANSPORT,
    ) -> MessageReport:
        """:meth:`process` for consumers with ``async def`` handlers."""
        if not self.is_async:
            raise ConfigurationError(f"consumer {self.name!r} has sync handlers: use process()")
        steps = self._steps(body, headers, destination, redelivered, transport)
        request = next(steps)
        while True:
            try:
                if isinstance(request, _Run):
                    result: Any = await self._run_async(request)
                else:
                    result = await self._transaction_async(request.fn)
            except BaseException as exc:
                # Unwind the steps (and their spans) here, in this task and context.
                steps.throw(exc)
                raise
            try:
                request = steps.send(result)
            except StopIteration as done:
                report: MessageReport = done.value
                return report

    def _steps(
        self,
        body: bytes,
        headers: Mapping[str, str],
        destination: str,
        redelivered: bool,
        transport: TransportDescription,
    ) -> Generator[_Run | _Write, Any, MessageReport]:
        """Everything processing one message does, written once for sync and async.

        Yields the I/O to perform (run a handler in its transaction; write something in
        a transaction) and receives the result; :meth:`process` and
        :meth:`process_async` carry the requests out.
        """
        prepared = prepare(body, headers, destination, self.name, self._by_type, self._by_id)
        if isinstance(prepared, Rejected):
            if prepared.dead_letter is not None:
                yield _Write(
                    partial(dead_letter_store.insert_dead_letters, rows=[prepared.dead_letter])
                )
                log.warning("message dead-lettered by consumer %s: %s", self.name, prepared.reason)
            return MessageReport(headers.get("outboxer-id"), {}, prepared.reason)
        tracer = instrumentation.get()
        envelope = prepared.envelope
        outcomes: dict[str, str] = {}
        with tracer.process(transport, envelope, self.name):
            for spec in prepared.handlers:
                plan = handler_plan(spec.retry, prepared.first_attempt)
                step: Step | None = next(plan)
                while isinstance(step, RunHandler):
                    # One span per run; a retry or dead-letter decision is a child of the
                    # run that failed, and sets its outcome.
                    started = time.perf_counter()
                    with tracer.handler(envelope, spec.id, step.attempt) as span:
                        outcome = yield _Run(spec, prepared, step.attempt, redelivered)
                        label = outcome.value
                        if outcome.error is not None:
                            span.record_error(outcome.error)
                        step = _advance(plan, outcome, outcomes, spec)
                        if isinstance(step, ScheduleRetry):
                            label = HandlerOutcome.RETRY_SCHEDULED
                            with tracer.step(
                                "retry", envelope, {"outboxer.handler": spec.id}
                            ) as retry_span:
                                message = retry_message(
                                    envelope, spec, self.name, step, retry_span.trace_headers()
                                )
                                retry_span.set_attribute("outboxer.retry.delay", step.delay)
                                yield _Write(partial(store.insert_messages, messages=[message]))
                            log.info(
                                "handler %s failed on message %s (attempt %d): %s; retry in %.1f s",
                                spec.id,
                                envelope.message_id,
                                step.attempt - 1,
                                step.error,
                                step.delay,
                            )
                            step = _advance(plan, None, outcomes, spec)
                        elif isinstance(step, GiveUp):
                            label = HandlerOutcome.DEAD_LETTERED
                            attributes = {
                                "outboxer.handler": spec.id,
                                "error.type": type(step.error).__qualname__,
                            }
                            with tracer.step("dead_letter", envelope, attributes) as dead_span:
                                row = handler_dead_letter(
                                    envelope, spec, self.name, step, dead_span.trace_headers()
                                )
                                yield _Write(
                                    partial(dead_letter_store.insert_dead_letters, rows=[row])
                                )
                            log.warning(
                                "handler %s gave up on message %s after %d attempts (%s): %s",
                                spec.id,
                                envelope.message_id,
                                step.attempt,
                                step.reason,
                                step.error,
                            )
                            step = _advance(plan, None, outcomes, spec)
                        span.set_attribute("outboxer.handler.outcome", label)
                    tracer.handler_done(spec.id, label, time.perf_counter() - started)
        return MessageReport(str(envelope.message_id), outcomes)

    def _run_sync(self, run: _Run) -> Outcome:
        envelope, spec = run.prepared.envelope, run.spec
        event = run.prepared.events[spec.id]
        context = context_for(envelope, self.name, spec, run.attempt, run.redelivered)
        try:
            with self.session_factory() as session, session.begin():
                if not inbox_store.record_inbox(session.connection(), **run.inbox_row(event)):
                    return Outcome(HandlerOutcome.DUPLICATE)
                with handling(envelope):
                    spec.fn(event, **spec.arguments(event, session, context))
        except Exception as exc:
            if _lost_database(exc):
                raise  # not the handler's fault: give the delivery back, spend no attempt
            return Outcome(HandlerOutcome.FAILED, exc)
        return Outcome(HandlerOutcome.PROCESSED)

    async def _run_async(self, run: _Run) -> Outcome:
        envelope, spec = run.prepared.envelope, run.spec
        event = run.prepared.events[spec.id]
        context = context_for(envelope, self.name, spec, run.attempt, run.redelivered)
        row = run.inbox_row(event)
        try:
            async with self.session_factory() as session, session.begin():
                recorded = await session.run_sync(
                    lambda s: inbox_store.record_inbox(s.connection(), **row)
                )
                if not recorded:
                    return Outcome(HandlerOutcome.DUPLICATE)
                with handling(envelope):
                    await spec.fn(event, **spec.arguments(event, session, context))
        except Exception as exc:
            if _lost_database(exc):
                raise  # not the handler's fault: give the delivery back, spend no attempt
            return Outcome(HandlerOutcome.FAILED, exc)
        return Outcome(HandlerOutcome.PROCESSED)

    def _transaction_sync(self, fn: Callable[[Connection], T]) -> T:
        with self.session_factory() as session, session.begin():
            return fn(session.connection())

    async def _transaction_async(self, fn: Callable[[Connection], T]) -> T:
        async with self.session_factory() as session, session.begin():
            result: T = await session.run_sync(lambda s: fn(s.connection()))
            return result

    # Running against a broker -----------------------------------------------------------

    def run(
        self,
        transport: Transport,
        *,
        once: bool = False,
        concurrency: int = 1,
        idle_timeout: float = 1.0,
        prune_interval: float = 300.0,
        extend_after: float = 20.0,
        extend_by: float = 60.0,
    ) -> ConsumerStats:
        """Consume from ``transport`` until :meth:`stop` (or, with ``once``, until the
        queue is empty); returns this run's totals.

        ``concurrency`` messages are processed at a time (threads for sync handlers,
        tasks for async ones). A delivery is acknowledged after its handlers' outcomes
        are committed; if that fails (database down) it is given back to the broker.
        Deliveries still in progress after ``extend_after`` seconds have their
        visibility extended by ``extend_by`` (SQS). A consumer with async handlers runs
        its own event loop here; inside a running loop use :meth:`run_async`.
        """
        runner = self._runner(
            transport, concurrency, idle_timeout, prune_interval, extend_after, extend_by
        )
        if self.is_async:
            return asyncio.run(runner.run_async(once))
        return runner.run(once)

    async def run_async(
        self,
        transport: Transport,
        *,
        once: bool = False,
        concurrency: int = 1,
        idle_timeout: float = 1.0,
        prune_interval: float = 300.0,
        extend_after: float = 20.0,
        extend_by: float = 60.0,
    ) -> ConsumerStats:
        """:meth:`run` for async handlers, in the caller's event loop (where the
        application's async engine lives)."""
        if not self.is_async:
            raise ConfigurationError(f"consumer {self.name!r} has sync handlers: use run()")
        runner = self._runner(
            transport, concurrency, idle_timeout, prune_interval, extend_after, extend_by
        )
        return await runner.run_async(once)

    def _runner(
        self,
        transport: Transport,
        concurrency: int,
        idle_timeout: float,
        prune_interval: float,
        extend_after: float,
        extend_by: float,
    ) -> _Runner:
        if not self._by_id:
            raise ConfigurationError(f"consumer {self.name!r} has no handlers")
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {concurrency}")
        self._stop.clear()
        return _Runner(
            self, transport, concurrency, idle_timeout, prune_interval, extend_after, extend_by
        )

    def stop(self) -> None:
        """Stop receiving, finish the messages in progress, return from :meth:`run`."""
        self._stop.set()

    def prune(self) -> tuple[int, int]:
        """Delete old inbox rows (and old dead letters if a retention is set), in small
        batches; returns (inbox rows, dead letters) deleted. Sync consumers only."""
        return _prune(self)


def _lost_database(error: BaseException) -> bool:
    """The database connection went away (restart, failover, network): an outage, not a
    handler failure. SQLAlchemy marks those errors ``connection_invalidated``."""
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _advance(
    plan: Generator[Step, Outcome | None, str],
    feedback: Outcome | None,
    outcomes: dict[str, str],
    spec: HandlerSpec,
) -> Step | None:
    """The plan's next step, or None once it has decided (the decision goes in ``outcomes``)."""
    try:
        return plan.send(feedback)
    except StopIteration as done:
        outcomes[spec.name] = str(done.value)
        return None


class _Runner:
    def __init__(
        self,
        consumer: Consumer,
        transport: Transport,
        concurrency: int,
        idle_timeout: float,
        prune_interval: float,
        extend_after: float,
        extend_by: float,
    ) -> None:
        self.consumer = consumer
        self.transport = transport
        self.concurrency = concurrency
        self.idle_timeout = idle_timeout
        self.prune_interval = prune_interval
        self.extend_after = extend_after
        self.extend_by = extend_by
        self.stats = ConsumerStats()
        self.window = max(concurrency * 2, consumer.prefetch)
        """Deliveries held at once: in progress, or waiting for a worker."""
        self._held = 0
        self._room = threading.Condition()
        self._give_back = False
        self._started: dict[Delivery, float] = {}
        self._lock = threading.Lock()
        self._last_prune = time.monotonic()
        self._failures = 0
        self._broker_outages = 0

    def run(self, once: bool) -> ConsumerStats:
        consumer = self.consumer
        receiver = self.transport.receiver(consumer.subscription())
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"outboxer-{consumer.name}")
        log.info("consumer %s started (%d handlers)", consumer.name, len(consumer.handlers))
        try:
            while not consumer._stop.is_set():
                # Up to the prefetch waits here for a worker, so the broker is asked for
                # many deliveries at a time rather than one per message.
                with self._room:
                    capacity = self.window - self._held
                    if capacity <= 0:
                        self._room.wait(1.0)
                if capacity <= 0:
                    self._extend_slow()
                    continue
                try:
                    deliveries = receiver.receive(capacity, self.idle_timeout if once else 1.0)
                except TransportError:
                    if once:
                        raise
                    self._broker_down()
                    continue
                self._broker_outages = 0
                if not deliveries:
                    if once:
                        break
                    self._maintain()
                with self._room:
                    self._held += len(deliveries)
                for delivery in deliveries:
                    pool.submit(self._handle, delivery)
                self._extend_slow()
                self._back_off_after_failures()
        finally:
            # Deliveries no worker started yet go back to the broker at once (on stop);
            # the ones in progress finish and are acknowledged.
            self._give_back = consumer._stop.is_set()
            self._drain()
            pool.shutdown(wait=True)
            receiver.close()
            log.info("consumer %s stopped: %s", consumer.name, self.stats)
        return self.stats

    def _drain(self) -> None:
        """Wait until no delivery is held, extending the slow ones meanwhile."""
        while True:
            with self._room:
                if not self._held:
                    return
                self._room.wait(min(1.0, self.extend_after / 2))
            self._extend_slow()

    def _broker_down(self) -> None:
        """The broker could not be reached: wait longer each time, up to 30 s."""
        self._broker_outages += 1
        pause = min(30.0, 0.5 * 2 ** min(self._broker_outages - 1, 6))
        log.warning(
            "consumer %s cannot reach the broker; trying again in %.1f s",
            self.consumer.name,
            pause,
            exc_info=self._broker_outages == 1,  # the traceback once, not every retry
        )
        self.consumer._stop.wait(pause)

    def _handle(self, delivery: Delivery) -> None:
        if self._give_back:
            delivery.release()
            self._done_with(delivery)
            return
        with self._lock:
            self._started[delivery] = time.monotonic()
        try:
            report = self.consumer.process(
                delivery.body,
                delivery.headers,
                destination=delivery.destination,
                redelivered=delivery.redelivered,
                transport=self.transport.description,
            )
        except Exception as exc:
            with self._lock:
                self.stats.failed_deliveries += 1
                self._failures += 1
                first = self._failures == 1
            # The traceback once per streak: a database outage fails every message alike.
            log.warning(
                "consumer %s could not record a message's outcome (%s); giving it back",
                self.consumer.name,
                _one_line(exc),
                exc_info=first,
            )
            delivery.release()
        else:
            delivery.ack()
            with self._lock:
                self.stats.add(report)
                self.consumer.stats.add(report)
                self._failures = 0
        finally:
            self._done_with(delivery)

    def _done_with(self, delivery: Delivery) -> None:
        with self._lock:
            self._started.pop(delivery, None)
        with self._room:
            self._held -= 1
            self._room.notify_all()

    def _back_off_after_failures(self) -> None:
        # Bookkeeping keeps failing (the database is down): slow down instead of spinning
        # through redeliveries.
        failures = self._failures
        if failures:
            self.consumer._stop.wait(min(30.0, 0.5 * 2 ** min(failures - 1, 6)))

    def _extend_slow(self) -> None:
        now = time.monotonic()
        with self._lock:
            slow = [d for d, t in self._started.items() if now - t > self.extend_after]
            for delivery in slow:
                self._started[delivery] = now
        for delivery in slow:
            try:
                delivery.extend(self.extend_by)
            except Exception:
                log.warning("could not extend a slow message's visibility", exc_info=True)

    def _maintain(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < self.prune_interval:
            return
        self._last_prune = now
        try:
            inbox_rows, dead = _prune(self.consumer)
        except Exception:
            log.warning("pruning the inbox failed; will try again later", exc_info=True)
            return
        if inbox_rows or dead:
            log.info("pruned %d inbox rows and %d dead letters", inbox_rows, dead)

    async def _maintain_async(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < self.prune_interval:
            return
        self._last_prune = now
        try:
            inbox_rows, dead = await _prune_async(self.consumer)
        except Exception:
            log.warning("pruning the inbox failed; will try again later", exc_info=True)
            return
        if inbox_rows or dead:
            log.info("pruned %d inbox rows and %d dead letters", inbox_rows, dead)

    async def run_async(self, once: bool) -> ConsumerStats:
        consumer = self.consumer
        receiver = await asyncio.to_thread(self.transport.receiver, consumer.subscription())
        limit = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        log.info("consumer %s started (%d async handlers)", consumer.name, len(consumer.handlers))

        room = asyncio.Event()

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            room.set()

        async def handle(delivery: Delivery) -> None:
            async with limit:
                if self._give_back:
                    delivery.release()  # stopping: never started, back to the broker
                    return
                self._started[delivery] = time.monotonic()
                try:
                    report = await consumer.process_async(
                        delivery.body,
                        delivery.headers,
                        destination=delivery.destination,
                        redelivered=delivery.redelivered,
                        transport=self.transport.description,
                    )
                except Exception as exc:
                    self.stats.failed_deliveries += 1
                    self._failures += 1
                    log.warning(
                        "consumer %s could not record a message's outcome (%s); giving it back",
                        consumer.name,
                        _one_line(exc),
                        exc_info=self._failures == 1,
                    )
                    delivery.release()
                else:
                    delivery.ack()
                    self.stats.add(report)
                    consumer.stats.add(report)
                    self._failures = 0
                finally:
                    self._started.pop(delivery, None)

        try:
            while not consumer._stop.is_set():
                capacity = self.window - len(tasks)
                if capacity <= 0:
                    room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(room.wait(), timeout=1.0)
                    await asyncio.to_thread(self._extend_slow)
                    continue
                try:
                    deliveries = await asyncio.to_thread(
                        receiver.receive, capacity, self.idle_timeout if once else 1.0
                    )
                except TransportError:
                    if once:
                        raise
                    await asyncio.to_thread(self._broker_down)
                    continue
                self._broker_outages = 0
                if not deliveries:
                    if once:
                        break
                    await self._maintain_async()
                for delivery in deliveries:
                    task = asyncio.create_task(handle(delivery))
                    tasks.add(task)
                    task.add_done_callback(finished)
                await asyncio.to_thread(self._extend_slow)
                if self._failures:
                    await asyncio.sleep(min(30.0, 0.5 * 2 ** min(self._failures - 1, 6)))
        finally:
            self._give_back = consumer._stop.is_set()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await asyncio.to_thread(receiver.close)
            log.info("consumer %s stopped: %s", consumer.name, self.stats)
        return self.stats


def _prune(consumer: Consumer) -> tuple[int, int]:
    """Prune old inbox rows (and dead letters), one short transaction per batch."""
    if consumer.is_async:
        raise ConfigurationError("prune() needs a sync session factory; use prune_async()")
    return _prune_batches(consumer, consumer._transaction_sync)


async def _prune_async(consumer: Consumer) -> tuple[int, int]:
    counts = [0, 0]
    for index, batch in enumerate(_prune_jobs(consumer)):
        while not consumer._stop.is_set():
            pruned = await consumer._transaction_async(batch)
            counts[index] += pruned
            if pruned < _PRUNE_BATCH:
                break
    return counts[0], counts[1]


def _prune_batches(
    consumer: Consumer, transaction: Callable[[Callable[[Connection], int]], int]
) -> tuple[int, int]:
    counts = [0, 0]
    for index, batch in enumerate(_prune_jobs(consumer)):
        while not consumer._stop.is_set():
            pruned = transaction(batch)
            counts[index] += pruned
            if pruned < _PRUNE_BATCH:
                break
    return counts[0], counts[1]


def _prune_jobs(consumer: Consumer) -> list[Callable[[Connection], int]]:
    jobs: list[Callable[[Connection], int]] = [
        lambda c: inbox_store.prune_inbox(
            c, older_than=consumer.inbox_retention, limit=_PRUNE_BATCH
        )
    ]
    retention = consumer.dead_letter_retention
    if retention is not None:
        jobs.append(
            lambda c: dead_letter_store.prune_dead_letters(
                c, older_than=retention, limit=_PRUNE_BATCH
            )
        )
    return jobs


def _check_signature(fn: Callable[..., Any], name: str) -> tuple[bool, bool]:
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot inspect handler {name!r}: {exc}") from exc
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigurationError(
            f"handler {name!r} must take the event as its first positional parameter"
        )
    names = {p.name for p in parameters[1:]}
    for p in parameters[1:]:
        if p.name in ("session", "context") or p.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_POSITIONAL:
            raise ConfigurationError(
                f"handler {name!r} has a parameter {p.name!r} outboxer cannot supply; handlers "
                "take (event, session=..., context=...)"
            )
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    return "session" in names or has_kwargs, "context" in names or has_kwargs


def _factory_is_async(factory: Callable[[], Any], name: str) -> bool:
    cls = getattr(factory, "class_", None)
    if not isinstance(cls, type):
        probe = factory()
        cls = type(probe)
        if isinstance(probe, Session):
            probe.close()
    if issubclass(cls, AsyncSession):
        if not issubclass(cls, AsyncOutboxSession):
            raise ConfigurationError(
                f"consumer {name!r}: handlers publish through their session, so the factory must "
                "make outboxer.AsyncOutboxSession (async_sessionmaker(..., class_=outboxer."
                "AsyncOutboxSession))"
            )
        return True
    if issubclass(cls, Session):
        if not issubclass(cls, OutboxMixin):
            raise ConfigurationError(
                f"consumer {name!r}: handlers publish through their session, so the factory must "
                "make outboxer.OutboxSession (sessionmaker(engine, class_=outboxer.OutboxSession))"
            )
        return False
    raise ConfigurationError(
        f"consumer {name!r}: session_factory must be a sessionmaker or async_sessionmaker, "
        f"got {factory!r}"
    )


def _one_line(exc: BaseException) -> str:
    """An exception as ``Type: first line of its message``, for a log line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
