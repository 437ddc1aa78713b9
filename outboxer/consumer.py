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

This module is the facade. The parts, one idea each: :mod:`outboxer.registration` (the
decorators), :mod:`outboxer.handlers` (what a handler is), :mod:`outboxer.intake`
(decoding and matching a delivery), :mod:`outboxer.plan` (the retry plan of one handler),
:mod:`outboxer.steps` (what processing a message does), :mod:`outboxer.fallbacks`
(writing its outcome whatever the message), :mod:`outboxer.processing` (carrying the
steps out), :mod:`outboxer.running` and :mod:`outboxer.runner` (a run against a broker,
the delivery loop), :mod:`outboxer.retention` and :mod:`outboxer.reports`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from .checks import check_number
from .errors import ConfigurationError
from .failures import ErrorChannel, OnFailure, channel_for
from .handlers import HandlerRegistry, HandlerSpec, factory_is_async
from .instrumentation import TransportDescription
from .processing import Processor
from .registration import Registration
from .reports import ConsumerStats, MessageReport
from .retention import Retention
from .retry import Retry
from .runner import RunOptions, StopSignal
from .running import check_runnable, consume, run_blocking
from .scheduling import Scheduled
from .transports.base import Subscription, Transport

__all__ = ["Consumer", "ConsumerStats", "MessageReport"]

_NO_TRANSPORT = TransportDescription("none")
_DEFAULT_PREFETCH = 50


class Consumer(Registration):
    """A consumer group: a name (its queue), a session factory, and handlers.

    ``session_factory`` makes the session each handler runs in: a ``sessionmaker`` of
    :class:`~outboxer.OutboxSession` for sync handlers, an ``async_sessionmaker`` of
    :class:`~outboxer.AsyncOutboxSession` for ``async def`` handlers. ``retry`` is the
    default policy of its handlers. A worker takes up to ``batch_size`` waiting
    deliveries at once and runs those of one handler in one transaction, falling back to
    one message at a time on any failure (:mod:`outboxer.batching`; 1 turns batching
    off). ``prefetch`` is how many deliveries a run holds at once (received, in
    progress or waiting for a worker); by default 50, or two batches per worker when that
    is more (``2 * concurrency * batch_size``). Inbox rows older than ``inbox_retention`` seconds
    (default 7 days) are pruned by the running consumer, and dead letters older than
    ``dead_letter_retention`` when it is set. A handler run (or a batch's) that lasts
    longer than ``slow_handler_warning`` seconds (default 60; None: never) is logged as a
    WARNING, again each time it has run twice as long (:mod:`outboxer.watchdog`).
    """

    def __init__(
        self,
        session_factory: Callable[[], Any],
        *,
        name: str,
        retry: Retry | None = None,
        prefetch: int | None = None,
        batch_size: int = 20,
        inbox_retention: float = 7 * 24 * 3600,
        dead_letter_retention: float | None = None,
        on_failure: OnFailure = None,
        slow_handler_warning: float | None = 60.0,
    ) -> None:
        if not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigurationError(f"a consumer needs a name of 1-200 characters, got {name!r}")
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigurationError(f"retry must be an outboxer.Retry, got {retry!r}")
        if prefetch is not None:
            check_number("prefetch", prefetch, whole=True, minimum=1)
        check_number("batch_size", batch_size, whole=True, minimum=1)
        check_number("inbox_retention", inbox_retention, positive=True)
        if dead_letter_retention is not None:
            check_number("dead_letter_retention", dead_letter_retention, positive=True)
        if slow_handler_warning is not None:
            check_number("slow_handler_warning", slow_handler_warning, positive=True)
        self.name = name
        self.session_factory = session_factory
        self.retry = retry or Retry()
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.inbox_retention = inbox_retention
        self.dead_letter_retention = dead_letter_retention
        self.slow_handler_warning = slow_handler_warning
        """Seconds a handler run lasts before it is logged (None: never)."""
        self.is_async = factory_is_async(session_factory, name)
        self.registry = HandlerRegistry(name)
        self.error_channels: dict[str, ErrorChannel] = {}
        """Channels registered with :meth:`error_channel`, by name."""
        if not isinstance(on_failure, str):
            # A name is resolved when a handler uses it (it is registered after this).
            channel_for(on_failure, {}, where=f"consumer {name!r}", is_async=self.is_async)
        self.on_failure = on_failure
        """The error channel of handlers that name none (:mod:`outboxer.failures`)."""
        self.schedules: list[Scheduled] = []
        """Handlers registered with :meth:`scheduled`."""
        self.stats = ConsumerStats()
        """Totals of every run of this consumer."""
        self.stop_signal = StopSignal()
        """Set by :meth:`stop`; the run in progress and its scheduler watch it."""

    @property
    def handlers(self) -> list[HandlerSpec]:
        """The registered handlers."""
        return self.registry.all()

    def subscription(self, concurrency: int = 1) -> Subscription:
        """The queue and bindings this consumer needs from a broker."""
        return self.registry.subscription(self.name, self.prefetch_for(concurrency))

    def prefetch_for(self, concurrency: int) -> int:
        """The deliveries a run with ``concurrency`` workers holds at once."""
        if self.prefetch is not None:
            return self.prefetch
        return max(_DEFAULT_PREFETCH, 2 * concurrency * self.batch_size)

    def check_names(self, transport: Transport) -> None:
        """Raise :class:`~outboxer.errors.InvalidName` if ``transport``'s broker would refuse
        this consumer's name or one of its destinations (say an SQS queue name with a dot).
        :meth:`run` checks this before it creates anything."""
        subscription = self.subscription()
        transport.validate_name(subscription.queue, f"consumer {self.name!r}: its name")
        for destination, type_name in subscription.bindings:
            transport.validate_name(
                destination, f"consumer {self.name!r}: the destination of {type_name}"
            )
        for source in subscription.sources:
            transport.validate_name(source.queue, f"consumer {self.name!r}: an adapter's queue")
        transport.validate_subscription(subscription, f"consumer {self.name!r}")

    # Processing one message -----------------------------------------------------------

    def processor(self) -> Processor:
        """What carries one message through this consumer's handlers."""
        # self.retry may be changed after construction (tests do): read it at each call.
        return Processor(self.name, self.registry, self.session_factory)

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
        return self.processor().process(body, headers, destination, redelivered, transport)

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
        return await self.processor().process_async(
            body, headers, destination, redelivered, transport
        )

    # Running against a broker (outboxer.running) ----------------------------------------

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
        Deliveries held longer than ``extend_after`` seconds (or half the queue's
        visibility timeout, if shorter), in progress or waiting for a worker, have their
        visibility extended by ``extend_by`` (SQS). A consumer with
        async handlers runs its own event loop here; inside a running loop use
        :meth:`run_async`.
        """
        options = RunOptions(
            once,
            concurrency,
            idle_timeout,
            prune_interval,
            extend_after,
            extend_by,
            self.batch_size,
            self.slow_handler_warning,
        )
        self._start(options)
        return run_blocking(self, lambda: consume(self, transport, options))

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
        options = RunOptions(
            once,
            concurrency,
            idle_timeout,
            prune_interval,
            extend_after,
            extend_by,
            self.batch_size,
            self.slow_handler_warning,
        )
        self._start(options)
        return await consume(self, transport, options)

    def _start(self, options: RunOptions) -> None:
        check_runnable(self, options)
        if options.slow_handler_warning is not None:  # it may be set after construction
            check_number("slow_handler_warning", options.slow_handler_warning, positive=True)
        self.stop_signal.clear()

    def stop(self) -> None:
        """Stop receiving, finish the messages in progress, return from :meth:`run`.

        Safe from any thread (a signal handler, another task)."""
        self.stop_signal.set()

    # Retention (outboxer.retention) ----------------------------------------------------

    def _retention(self) -> Retention:
        return Retention(
            self.inbox_retention,
            self.dead_letter_retention,
            self.stop_signal.is_set,
            consumer=self.name,
        )

    def prune(self) -> tuple[int, int]:
        """Delete old inbox rows (and old dead letters if a retention is set), in small
        batches; returns (inbox rows, dead letters) deleted. Sync consumers only."""
        if self.is_async:
            raise ConfigurationError("prune() needs a sync session factory; use prune_async()")
        return self._retention().prune(self.processor().transaction_sync)

    async def prune_async(self) -> tuple[int, int]:
        """:meth:`prune` for consumers with async handlers."""
        return await self._retention().prune_async(self.processor().transaction_async)

    async def prune_in_thread(self) -> tuple[int, int]:
        """:meth:`prune` of a sync consumer, off the event loop."""
        return await asyncio.to_thread(self.prune)
