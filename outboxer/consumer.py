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

This module is the facade. The parts, one idea each: :mod:`outboxer.handlers`
(registration), :mod:`outboxer.intake` (decoding and matching a delivery),
:mod:`outboxer.plan` (the retry plan of one handler), :mod:`outboxer.steps` (what
processing a message does), :mod:`outboxer.fallbacks` (writing its outcome whatever the
message), :mod:`outboxer.processing` (carrying the steps out), :mod:`outboxer.running` and
:mod:`outboxer.runner` (a run against a broker, the delivery loop),
:mod:`outboxer.retention` and :mod:`outboxer.reports`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from .adapters import build_adapter
from .checks import check_number
from .errors import ConfigurationError
from .failures import ErrorChannel, OnFailure, channel_for
from .handlers import HandlerRegistry, HandlerSpec, build_spec, factory_is_async
from .instrumentation import TransportDescription
from .keys import FromBody, FromHeader
from .processing import Processor
from .reports import ConsumerStats, MessageReport
from .retention import Retention
from .retry import Retry
from .runner import RunOptions, StopSignal
from .running import check_runnable, consume, run_blocking
from .scheduling import Scheduled, build_scheduled
from .transports.base import Subscription, Transport

__all__ = ["Consumer", "ConsumerStats", "MessageReport"]

F = TypeVar("F", bound=Callable[..., Any])

_NO_TRANSPORT = TransportDescription("none")
_DEFAULT_PREFETCH = 50


class Consumer:
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
    ``dead_letter_retention`` when it is set.
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
        self.name = name
        self.session_factory = session_factory
        self.retry = retry or Retry()
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.inbox_retention = inbox_retention
        self.dead_letter_retention = dead_letter_retention
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

    # Registration ---------------------------------------------------------------------

    def handler(
        self,
        message: type | str,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        dedup_key: str | Callable[[Any], object] | FromHeader | None = None,
        destination: str | None = None,
        on_failure: OnFailure = None,
        transactional: bool = True,
    ) -> Callable[[F], F]:
        """Register a handler for ``message`` (a registered class, or a type name for dicts).

        The handler gets the decoded event as its first argument; parameters named
        ``session`` (this handler's transaction) and ``context`` (a
        :class:`~outboxer.Context`) are passed by name. ``retry`` overrides the
        consumer's policy; ``dedup_key`` (a field name, a function of the event, or
        :func:`outboxer.from_header` for a header's value) makes the inbox deduplicate
        on a business key instead of the message id.
        ``destination`` says where messages of a dict type come from. ``on_failure`` (a
        function, an :class:`~outboxer.ErrorChannel` or a channel's name) runs when the
        handler gives up, instead of the consumer's (:mod:`outboxer.failures`).
        ``transactional=False`` runs the handler outside any database transaction and
        writes its inbox row after it returns (:mod:`outboxer.untransacted`): a crash in
        between repeats the call, so pass ``context.message_id`` as its idempotency key.
        """
        build = partial(
            build_spec, name=name, retry=retry, dedup_key=dedup_key, destination=destination
        )
        return self._registering("handler", build, message, on_failure, transactional)

    def scheduled(
        self,
        every: timedelta | float,
        *,
        name: str | None = None,
        retry: Retry | None = None,
        on_failure: OnFailure = None,
        lease: timedelta | float | None = None,
    ) -> Callable[[F], F]:
        """Register a function to run every ``every`` (a timedelta or seconds) while the
        consumer runs, once per tick across all its replicas (:mod:`outboxer.scheduling`).

        Parameters named ``session`` (the run's transaction: what it publishes goes through
        the outbox) and ``context`` (an :class:`~outboxer.Tick`) are passed by name.
        ``retry`` allows instant retries only (default: none); ``on_failure`` runs when a
        tick gives up. ``lease`` (default 60 s; renewed while a run lasts) bounds how long
        a replica that died in a run keeps the others from running the next tick.
        """

        def register(fn: F) -> F:
            spec = build_scheduled(
                self.name,
                fn,
                every=every,
                name=name,
                retry=retry,
                lease=lease,
                consumer_is_async=self.is_async,
                taken={s.name for s in self.schedules},
            )
            channel = channel_for(
                on_failure if on_failure is not None else self.on_failure,
                self.error_channels,
                where=f"consumer {self.name!r}, scheduled handler {spec.name!r}",
                is_async=False,
            )
            self.schedules.append(replace(spec, channel=channel))
            return fn

        return register

    def error_channel(self, name: str, *, dead_letter: bool = True) -> Callable[[F], F]:
        """Register a named error channel: handlers (or the consumer) then pass
        ``on_failure=name``. ``dead_letter=False`` runs it instead of the dead-letter store
        (see :class:`~outboxer.ErrorChannel`). Register it above the handlers that use it.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"an error channel needs a name, got {name!r}")
        if name in self.error_channels:
            raise ConfigurationError(
                f"consumer {self.name!r} already has an error channel named {name!r}"
            )

        def register(fn: F) -> F:
            channel = ErrorChannel(fn, dead_letter=dead_letter, name=name)
            channel_for(channel, {}, where=f"consumer {self.name!r}", is_async=self.is_async)
            self.error_channels[name] = channel
            return fn

        return register

    def adapter(
        self,
        message: type | str,
        *,
        queue: str | None = None,
        exchange: str | None = None,
        routing_key: str = "#",
        message_id: FromHeader | FromBody | None = None,
        name: str | None = None,
        retry: Retry | None = None,
        dedup_key: str | Callable[[Any], object] | FromHeader | None = None,
        on_failure: OnFailure = None,
        transactional: bool = True,
    ) -> Callable[[F], F]:
        """Register an inbound adapter: a handler for plain messages another system sends.

        It reads ``queue`` (RabbitMQ or SQS), or, on RabbitMQ, a queue of its own (named
        ``queue``, by default ``<consumer>.<handler>``) bound to ``exchange`` with
        ``routing_key``. Each message's body is decoded as ``message`` (a registered class,
        or a type name for dicts). ``message_id`` says where its id is: the broker's own
        (the default: AMQP ``message_id``, SQS ``MessageId``), ``outboxer.from_header(...)``
        or ``outboxer.from_body(...)``. ``retry`` may hold instant retries only (the
        default: the consumer's instant retries); see :mod:`outboxer.adapters`. The other
        options are :meth:`handler`'s.
        """
        build = partial(
            build_adapter,
            queue=queue,
            exchange=exchange,
            routing_key=routing_key,
            message_id=message_id,
            name=name,
            retry=retry,
            dedup_key=dedup_key,
        )
        return self._registering("adapter", build, message, on_failure, transactional)

    def _registering(
        self,
        kind: str,
        build: Callable[..., HandlerSpec],
        message: type | str,
        on_failure: OnFailure,
        transactional: bool,
    ) -> Callable[[F], F]:
        """The decorator of :meth:`handler` and :meth:`adapter` (``kind``): ``build`` makes
        the function's spec (:func:`~outboxer.handlers.build_spec`,
        :func:`~outboxer.adapters.build_adapter`), which gets its error channel and
        ``transactional``, then is registered."""
        if not isinstance(transactional, bool):
            raise ConfigurationError(f"transactional must be True or False, got {transactional!r}")

        def register(fn: F) -> F:
            spec = build(self.name, self.retry, self.is_async, fn, message)
            spec.error_channel = channel_for(
                on_failure if on_failure is not None else self.on_failure,
                self.error_channels,
                where=f"consumer {self.name!r}, {kind} {spec.name!r}",
                is_async=self.is_async,
            )
            spec.transactional = transactional
            self.registry.add(spec)
            return fn

        return register

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
        Deliveries held longer than ``extend_after`` seconds, in progress or waiting for
        a worker, have their visibility extended by ``extend_by`` (SQS). A consumer with
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
        )
        self._start(options)
        return await consume(self, transport, options)

    def _start(self, options: RunOptions) -> None:
        check_runnable(self, options)
        self.stop_signal.clear()

    def stop(self) -> None:
        """Stop receiving, finish the messages in progress, return from :meth:`run`.

        Safe from any thread (a signal handler, another task)."""
        self.stop_signal.set()

    # Retention (outboxer.retention) ----------------------------------------------------

    def _retention(self) -> Retention:
        return Retention(self.inbox_retention, self.dead_letter_retention, self.stop_signal.is_set)

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
