"""Handler registration: what a handler is, what it is given, and the checks at start-up.

``@consumer.handler(...)`` builds a :class:`HandlerSpec` here and keeps it in the
consumer's :class:`HandlerRegistry`. Every mistake that can be seen at registration (a
parameter outboxer cannot supply, a sync handler on an async session factory, two
handlers with one name) raises :class:`~outboxer.errors.ConfigurationError` now, not at
the first message.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from .callables import fits
from .errors import ConfigurationError
from .keys import FromBody, FromHeader, key_text
from .message import Envelope, MessageType, message_type_for, wildcard_in
from .retry import Retry
from .store.inbox import MESSAGE_ID_KEY
from .transports.base import Source, Subscription

if TYPE_CHECKING:  # failures imports the plan, which imports this module
    from .failures import ErrorChannel

__all__ = [
    "MESSAGE_ID_KEY",
    "Context",
    "HandlerRegistry",
    "HandlerSpec",
    "Inbound",
    "build_spec",
    "factory_is_async",
]

KeyFn = Callable[[Any], object]


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


@dataclass(frozen=True)
class Inbound:
    """Where an inbound adapter's messages come from, and where their ids are."""

    source: Source
    message_id: FromHeader | FromBody | None = None
    """None: the broker's own id (AMQP ``message_id``, SQS ``MessageId``)."""


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
    dedup_key: KeyFn | FromHeader | None = None
    is_async: bool = False
    wants_session: bool = False
    wants_context: bool = False
    error_channel: ErrorChannel | None = None
    """Runs when this handler gives up (:mod:`outboxer.failures`); None: dead letter only."""
    transactional: bool = True
    """False: the handler runs outside any transaction, its inbox row written after it
    returns (:mod:`outboxer.untransacted`)."""
    inbound: Inbound | None = None
    """Set for an inbound adapter (:mod:`outboxer.adapters`): it reads its own queue."""

    def dedup_value(self, envelope: Envelope, event: Any) -> str:
        """The inbox key of ``event``: the business key if one is set (from the payload or a
        header), else the message id.

        A handler without a business key has message ids only in its inbox: the key is the
        id. A handler with one keeps the two kinds apart, so that no key ever stands for
        another message's id: a message without a key (None, or blank text) is recorded as
        ``message-id:<id>``, and a key that itself starts with ``message-id:`` gets that
        prefix once more. Raises :class:`DedupKeyError` for a value that is no identity
        (see :func:`key_text`), and whatever the key function raises.
        """
        fn = self.dedup_key
        if fn is None and self.message_type is not None:
            fn = self.message_type.dedup_key
        if fn is None:
            return str(envelope.message_id)
        value = fn.value(envelope.headers) if isinstance(fn, FromHeader) else fn(event)
        key = key_text(value, self.id)
        if key is None:
            return MESSAGE_ID_KEY + str(envelope.message_id)
        return MESSAGE_ID_KEY + key if key.startswith(MESSAGE_ID_KEY) else key

    def arguments(self, event: Any, session: Any, context: Context) -> dict[str, Any]:
        """The keyword arguments this handler asked for by name."""
        kwargs: dict[str, Any] = {}
        if self.wants_session:
            kwargs["session"] = session
        if self.wants_context:
            kwargs["context"] = context
        return kwargs

    def context(
        self, envelope: Envelope, consumer: str, attempt: int, redelivered: bool
    ) -> Context:
        """The :class:`Context` of one run of this handler."""
        return Context(
            message_id=envelope.message_id,
            message_type=envelope.type,
            consumer=consumer,
            handler=self.name,
            attempt=attempt,
            headers={k: v for k, v in envelope.headers.items() if not k.startswith("outboxer-")},
            correlation_id=envelope.correlation,
            causation_id=envelope.causation_id,
            occurred_at=envelope.occurred_at,
            key=envelope.key,
            redelivered=redelivered,
        )


class HandlerRegistry:
    """A consumer's handlers, by id and by message type."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.by_type: dict[str, list[HandlerSpec]] = {}
        """Handlers of outboxer's messages, by type (adapters are not among them)."""
        self.by_id: dict[str, HandlerSpec] = {}
        self.by_source: dict[str, HandlerSpec] = {}
        """Inbound adapters, by the queue they read."""

    def add(self, spec: HandlerSpec) -> None:
        if spec.id in self.by_id:
            raise ConfigurationError(
                f"consumer {self.consumer!r} already has a handler named {spec.name!r}; pass "
                "name=... to tell them apart (the name keys the inbox and retries)"
            )
        if spec.inbound is not None:
            self._check_source(spec, spec.inbound.source.queue)
            self.by_source[spec.inbound.source.queue] = spec
        else:
            taken = self.by_source.get(spec.destination)
            if taken is not None:
                raise ConfigurationError(
                    f"handler {spec.name!r} of consumer {self.consumer!r} reads destination "
                    f"{spec.destination!r}, which is the queue of adapter {taken.name!r}; an "
                    "adapter's queue carries other systems' messages only"
                )
            self.by_type.setdefault(spec.type_name, []).append(spec)
        self.by_id[spec.id] = spec

    def _check_source(self, spec: HandlerSpec, queue: str) -> None:
        taken = self.by_source.get(queue)
        if taken is not None:
            raise ConfigurationError(
                f"consumer {self.consumer!r}: adapters {taken.name!r} and {spec.name!r} both "
                f"read queue {queue!r}; give each adapter a queue of its own"
            )
        if queue == self.consumer or any(
            queue == other.destination for specs in self.by_type.values() for other in specs
        ):
            raise ConfigurationError(
                f"adapter {spec.name!r} of consumer {self.consumer!r} reads {queue!r}, which "
                "carries outboxer's own messages to this consumer; give the adapter a queue "
                "of its own"
            )

    def adapter_for(self, destination: str) -> HandlerSpec | None:
        """The inbound adapter whose queue ``destination`` is, if any."""
        return self.by_source.get(destination) if self.by_source else None

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def all(self) -> list[HandlerSpec]:
        return list(self.by_id.values())

    def subscription(self, queue: str, prefetch: int) -> Subscription:
        """The queue and bindings these handlers need from a broker."""
        bindings: list[tuple[str, str]] = []
        for spec in self.by_id.values():
            if spec.inbound is None and (spec.destination, spec.type_name) not in bindings:
                bindings.append((spec.destination, spec.type_name))
        sources = [spec.inbound.source for spec in self.by_source.values() if spec.inbound]
        return Subscription(queue=queue, bindings=bindings, prefetch=prefetch, sources=sources)


def build_spec(
    consumer: str,
    default_retry: Retry,
    consumer_is_async: bool,
    fn: Callable[..., Any],
    message: type | str,
    name: str | None,
    retry: Retry | None,
    dedup_key: str | KeyFn | FromHeader | None,
    destination: str | None,
) -> HandlerSpec:
    """The :class:`HandlerSpec` of ``fn``, or the ConfigurationError that says what is wrong."""
    handler_name = name or getattr(fn, "__name__", None)
    if not handler_name or not isinstance(handler_name, str) or len(handler_name) > 50:
        raise ConfigurationError(f"handler name must be 1-50 characters, got {handler_name!r}")
    if retry is not None and not isinstance(retry, Retry):
        raise ConfigurationError(
            f"handler {handler_name!r}: retry must be an outboxer.Retry, got {retry!r}"
        )
    if destination is not None and (not isinstance(destination, str) or not destination):
        raise ConfigurationError(
            f"handler {handler_name!r}: destination must be a name (a non-empty string), "
            f"got {destination!r}"
        )
    if isinstance(message, str):
        message_type = None
        type_name = message
        problem = wildcard_in(message)
        if problem is not None:
            raise ConfigurationError(
                f"handler {handler_name!r}: message type {message!r} {problem}"
            )
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
    if len(type_name) > 255:
        raise ConfigurationError(
            f"handler {handler_name!r}: a message type name is at most 255 characters"
        )
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigurationError(
            f"handler {handler_name!r} is a generator function (it has a yield in it): "
            "calling it would run nothing; make it a function that does the work itself"
        )
    if not fits(fn, consumer_is_async):
        is_async = not consumer_is_async
        kind = "an async def" if is_async else "a plain def"
        need = (
            "async_sessionmaker(..., class_=outboxer.AsyncOutboxSession)"
            if is_async
            else "sessionmaker(..., class_=outboxer.OutboxSession)"
        )
        raise ConfigurationError(
            f"handler {handler_name!r} is {kind} function but consumer {consumer!r} was "
            f"given a {'async' if consumer_is_async else 'sync'} session factory; use {need}"
        )
    wants_session, wants_context = _check_signature(fn, handler_name)
    key_fn: KeyFn | FromHeader | None
    if not (dedup_key is None or isinstance(dedup_key, (str, FromHeader)) or callable(dedup_key)):
        raise ConfigurationError(
            f"handler {handler_name!r}: dedup_key must be a field name, a function of the "
            f"event or outboxer.from_header(name), got {dedup_key!r}"
        )
    if isinstance(dedup_key, str):
        attribute = dedup_key
        if message_type is not None:
            fields = _field_names(message_type.cls)
            if fields is not None and attribute not in fields:
                raise ConfigurationError(
                    f"handler {handler_name!r}: dedup_key={attribute!r}, but "
                    f"{message_type.cls.__qualname__} has no field {attribute!r} (fields: "
                    f"{', '.join(sorted(fields)) or 'none'}); name one of them, or pass a "
                    "function of the event"
                )
        key_fn = lambda event: (  # noqa: E731
            event.get(attribute) if isinstance(event, Mapping) else getattr(event, attribute)
        )
    else:
        key_fn = dedup_key
    return HandlerSpec(
        name=handler_name,
        id=f"{consumer}:{handler_name}",
        fn=fn,
        type_name=type_name,
        message_type=message_type,
        destination=destination,
        retry=retry or default_retry,
        dedup_key=key_fn,
        is_async=consumer_is_async,
        wants_session=wants_session,
        wants_context=wants_context,
    )


def _field_names(cls: type) -> set[str] | None:
    """The fields of a dataclass or pydantic model; None for another kind of class."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    fields = getattr(cls, "model_fields", None)
    return set(fields) if isinstance(fields, Mapping) else None


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


def factory_is_async(factory: Callable[[], Any], name: str) -> bool:
    """Whether ``factory`` makes async sessions; ConfigurationError unless outbox sessions.

    The asyncio classes come from :mod:`outboxer.async_support`, so sync-only installs
    (no greenlet) never need SQLAlchemy's asyncio extension.
    """
    from sqlalchemy.orm import Session

    from .async_support import AsyncSession
    from .session import AsyncOutboxSession, OutboxMixin

    if not callable(factory):
        raise ConfigurationError(
            f"consumer {name!r}: session_factory must be a sessionmaker or async_sessionmaker "
            f"(sessionmaker(engine, class_=outboxer.OutboxSession)), got {factory!r}"
        )
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
