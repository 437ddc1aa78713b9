"""Registration: the decorators that give a :class:`~outboxer.Consumer` its handlers,
scheduled handlers, error channels and inbound adapters.

:class:`Registration` is the part of ``Consumer`` that registers; what it builds (a
:class:`~outboxer.handlers.HandlerSpec`, a :class:`~outboxer.scheduling.Scheduled`, an
:class:`~outboxer.ErrorChannel`) is defined in :mod:`outboxer.handlers`,
:mod:`outboxer.adapters`, :mod:`outboxer.scheduling` and :mod:`outboxer.failures`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from .adapters import build_adapter
from .errors import ConfigurationError
from .failures import ErrorChannel, OnFailure, channel_for
from .handlers import HandlerRegistry, HandlerSpec, build_spec
from .keys import FromBody, FromHeader
from .retry import Retry
from .scheduling import Scheduled, build_scheduled

__all__ = ["Registration"]

F = TypeVar("F", bound=Callable[..., Any])


class Registration:
    """The registering decorators of a consumer (its base class)."""

    name: str
    retry: Retry
    is_async: bool
    registry: HandlerRegistry
    error_channels: dict[str, ErrorChannel]
    on_failure: OnFailure
    schedules: list[Scheduled]

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
