"""Turning ``publish(event, ...)`` arguments into an :class:`~outboxer.message.Envelope`.

Shared by the ORM sessions and by Core's ``outboxer.publish(connection, ...)``. The payload
is serialized here, in the caller, so a bad payload raises before anything is stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from pydantic_core import PydanticSerializationError, to_json

from . import instrumentation
from .errors import (
    ConfigurationError,
    InvalidHeaders,
    MissingDestination,
    SerializationError,
    UnknownMessageType,
)
from .ids import uuid7
from .message import Envelope, describe_unserializable, message_type_for
from .store import NewMessage

__all__ = ["RESERVED_HEADER_PREFIX", "build_message", "current_message", "handling"]

RESERVED_HEADER_PREFIX = "outboxer-"
_RESERVED_HEADERS = frozenset({"traceparent", "tracestate", "content-type"})

_current: ContextVar[Envelope | None] = ContextVar("outboxer_current_message", default=None)


def current_message() -> Envelope | None:
    """The message being handled in this thread or task, if a handler is running."""
    return _current.get()


@contextlib.contextmanager
def handling(envelope: Envelope) -> Iterator[None]:
    """Mark ``envelope`` as the message being handled: what is published meanwhile is
    caused by it and shares its correlation id."""
    token = _current.set(envelope)
    try:
        yield
    finally:
        _current.reset(token)


def build_message(
    event: Any,
    *,
    type: str | None = None,
    destination: str | None = None,
    key: object = None,
    headers: Mapping[str, str] | None = None,
    delay: float | timedelta | None = None,
    message_id: UUID | None = None,
    correlation_id: str | None = None,
) -> NewMessage:
    """Validate and serialize one ``publish()`` call; raises :class:`MessageError` subclasses."""
    if isinstance(event, Mapping):
        if not type:
            raise UnknownMessageType(
                "publishing a dict needs an explicit type: "
                'session.publish({...}, type="orders.placed", destination="orders")'
            )
        if not isinstance(type, str):
            raise UnknownMessageType(f"type= must be a string, got {type!r}")
        type_name = type
        default_destination = None
        default_key = None
        try:
            payload = to_json(event)
        except PydanticSerializationError as exc:
            raise SerializationError(describe_unserializable(event, "payload", exc)) from exc
    else:
        mt = message_type_for(event)
        if type is not None and type != mt.name:
            raise UnknownMessageType(
                f"{mt.cls.__qualname__} is registered as {mt.name!r}; "
                f"type={type!r} cannot override it (publish a dict to choose the type freely)"
            )
        type_name = mt.name
        default_destination = mt.destination
        default_key = mt.key_of(event)
        payload = mt.serialize(event)

    target = destination or default_destination
    if not target:
        raise MissingDestination(
            f"message {type_name!r} has no destination: pass destination=... to publish(), "
            f'or declare it with @outboxer.message("{type_name}", destination="...")'
        )
    if not isinstance(target, str):
        raise MissingDestination(f"destination must be a string, got {target!r}")
    delay_seconds = _delay_seconds(delay)
    clean_headers = _check_headers(headers)
    resolved_key = default_key if key is None else str(key)
    if resolved_key is not None and len(resolved_key) > 255:
        raise ConfigurationError(f"key is {len(resolved_key)} characters long; the limit is 255")

    mid = message_id if message_id is not None else uuid7()
    if not isinstance(mid, UUID):
        raise ConfigurationError(f"message_id must be a uuid.UUID, got {mid!r}")
    incoming = _current.get()
    if correlation_id is None and incoming is not None:
        correlation_id = incoming.correlation_id or str(incoming.message_id)
    # correlation_id None: this message starts its conversation (it correlates to itself).
    envelope = Envelope(
        message_id=mid,
        type=type_name,
        destination=target,
        payload=payload,
        occurred_at=datetime.now(timezone.utc),
        key=resolved_key,
        correlation_id=correlation_id,
        causation_id=str(incoming.message_id) if incoming is not None else None,
        headers=clean_headers,
    )
    tracer = instrumentation.get()
    if tracer.enabled:
        trace = tracer.create(envelope)
        if trace:
            envelope = replace(
                envelope, traceparent=trace.get("traceparent"), tracestate=trace.get("tracestate")
            )
    return NewMessage(envelope, delay_seconds)


def _delay_seconds(delay: float | timedelta | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ConfigurationError(f"delay must be seconds or a timedelta, got {delay!r}")
    if seconds < 0:
        raise ConfigurationError(f"delay cannot be negative, got {delay!r}")
    return float(seconds)


def _check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    if not headers:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidHeaders(f"headers must be a mapping of str to str, got {headers!r}")
    clean: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidHeaders(f"header names must be non-empty strings, got {name!r}")
        if not isinstance(value, str):
            raise InvalidHeaders(
                f"header {name!r} has a value of type {value.__class__.__name__} ({value!r}); "
                f"header values must be strings: use str(value), or put structured data in "
                "the payload"
            )
        lowered = name.lower()
        if lowered.startswith(RESERVED_HEADER_PREFIX) or lowered in _RESERVED_HEADERS:
            raise InvalidHeaders(
                f"header {name!r} is reserved for outboxer's envelope; choose another name"
            )
        clean[name] = value
    return clean
