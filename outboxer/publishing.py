"""Turning ``publish(event, ...)`` arguments into an :class:`~outboxer.message.Envelope`.

Shared by the ORM sessions and by Core's ``outboxer.publish(connection, ...)``. The payload
is serialized here, in the caller, so a bad payload raises before anything is stored.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from pydantic_core import PydanticSerializationError, to_json

from . import instrumentation
from .checks import MAX_DURATION
from .errors import (
    ConfigurationError,
    InvalidHeaders,
    MessageError,
    MissingDestination,
    SerializationError,
    UnknownMessageType,
)
from .ids import uuid7
from .message import (
    Envelope,
    describe_unserializable,
    message_type_for,
    registered_type,
    wildcard_in,
)
from .store import NewMessage
from .wire import control_at, surrogate_at

__all__ = [
    "NO_KEY",
    "BROKER_HEADERS",
    "RESERVED_HEADER_PREFIX",
    "NoKey",
    "build_message",
    "current_message",
    "handling",
]

RESERVED_HEADER_PREFIX = "outboxer-"
_RESERVED_HEADERS = frozenset({"traceparent", "tracestate", "content-type"})

_SENDER_SELECTED = (
    "is read by RabbitMQ as sender-selected distribution (extra routing keys), which "
    "must be an array: RabbitMQ closes the channel on a string, failing every message "
    "sent beside it"
)
BROKER_HEADERS = {"CC": _SENDER_SELECTED, "BCC": _SENDER_SELECTED}
"""User header names a broker interprets instead of carrying (case-sensitive), and why."""


class NoKey(enum.Enum):
    """The type of :data:`NO_KEY`."""

    NO_KEY = "NO_KEY"

    def __repr__(self) -> str:
        return "outboxer.NO_KEY"


NO_KEY = NoKey.NO_KEY
"""``publish(..., key=outboxer.NO_KEY)``: no ordering key, even for a type that has one.

``key=None`` (the default) means "the type's key". A message without a key holds nothing
back: a delayed one (``delay=``) does not make later messages of its key wait.
"""

Key = str | int | NoKey | None
"""What ``publish(key=...)`` takes: a str or an int, :data:`NO_KEY`, or None (the type's)."""

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
    key: Key = None,
    headers: Mapping[str, str] | None = None,
    delay: float | timedelta | None = None,
    message_id: UUID | str | None = None,
    correlation_id: str | UUID | None = None,
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
        problem = wildcard_in(type)
        if problem is not None:
            raise UnknownMessageType(f"type {type!r} {problem}")
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
    if not target and isinstance(event, Mapping):
        registered = registered_type(type_name)
        declared = registered.destination if registered is not None else None
        raise MissingDestination(
            f"a dict published as {type_name!r} has no destination: pass destination=... to "
            "publish()"
            + (
                f" (a dict does not take the destination {declared!r} declared for "
                f"{registered.cls.__qualname__}: publish a {registered.cls.__qualname__} "
                "instead, or pass destination=" + repr(declared) + ")"
                if registered is not None and declared
                else ""
            )
        )
    if not target:
        raise MissingDestination(
            f"message {type_name!r} has no destination: pass destination=... to publish(), "
            f'or declare it with @outboxer.message("{type_name}", destination="...")'
        )
    if not isinstance(target, str):
        raise MissingDestination(f"destination must be a string, got {target!r}")
    # The outbox columns hold 255 characters; longer fails at commit on MariaDB/PostgreSQL.
    for what, value in (("type", type_name), ("destination", target)):
        if len(value) > 255:
            raise ConfigurationError(f"{what} is {len(value)} characters long; the limit is 255")
    delay_seconds = _delay_seconds(delay)
    clean_headers = _check_headers(headers)
    resolved_key = default_key if key is None else _key(key)
    if resolved_key is not None and len(resolved_key) > 255:
        raise ConfigurationError(f"key is {len(resolved_key)} characters long; the limit is 255")
    mid = uuid7() if message_id is None else _message_id(message_id)
    correlation_id = _correlation_id(correlation_id)
    incoming = _current.get()
    if correlation_id is None and incoming is not None:
        correlation_id = incoming.correlation_id or str(incoming.message_id)
    causation_id = str(incoming.message_id) if incoming is not None else None
    for what, text in (
        ("type", type_name),
        ("destination", target),
        ("key", resolved_key),
        ("correlation_id", correlation_id),
        ("causation_id", causation_id),
    ):
        if text is not None:
            problem = _unstorable(text)
            if problem is None and what in _ENVELOPE_TEXT:
                problem = _control(text)
            if problem is not None:
                raise MessageError(f"{what} {text!r} {problem}")
    # correlation_id None: this message starts its conversation (it correlates to itself).
    envelope = Envelope(
        message_id=mid,
        type=type_name,
        destination=target,
        payload=payload,
        occurred_at=datetime.now(timezone.utc),
        key=resolved_key,
        correlation_id=correlation_id,
        causation_id=causation_id,
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


def _key(key: Key) -> str | None:
    if isinstance(key, NoKey):
        return None
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ConfigurationError(
            f"key must be a str or an int (or outboxer.NO_KEY for none), got "
            f"{key.__class__.__name__} {key!r}: pass str(...) of what identifies the entity"
        )
    return key if isinstance(key, str) else str(key)


def _message_id(message_id: object) -> UUID:
    if isinstance(message_id, UUID):
        return message_id
    if isinstance(message_id, str):
        try:
            return UUID(message_id)
        except ValueError:
            pass
    raise ConfigurationError(f"message_id must be a uuid.UUID or its text form, got {message_id!r}")


def _correlation_id(correlation_id: object) -> str | None:
    if correlation_id is None or isinstance(correlation_id, str):
        value = correlation_id
    elif isinstance(correlation_id, UUID):
        value = str(correlation_id)
    else:
        raise ConfigurationError(
            f"correlation_id must be a str (or a uuid.UUID), got {correlation_id!r}"
        )
    if value is not None and len(value) > 255:
        raise ConfigurationError(
            f"correlation_id is {len(value)} characters long; the limit is 255"
        )
    return value


def _delay_seconds(delay: float | timedelta | None) -> float:
    if delay is None:
        return 0.0
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ConfigurationError(f"delay must be seconds or a timedelta, got {delay!r}")
    if not math.isfinite(seconds):
        raise ConfigurationError(f"delay must be a finite number of seconds, got {delay!r}")
    if seconds < 0:
        raise ConfigurationError(f"delay cannot be negative, got {delay!r}")
    if seconds > MAX_DURATION:
        # Past this the database's date arithmetic overflows: the application's COMMIT
        # failed with a driver error (SQLite OverflowError, MariaDB 1441, PostgreSQL
        # "interval out of range") and the business transaction rolled back.
        raise ConfigurationError(
            f"delay is at most 100 years ({MAX_DURATION:.0f} seconds, 36500 days), got {delay!r}"
        )
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
        if name in BROKER_HEADERS:
            raise InvalidHeaders(
                f"header {name!r} {BROKER_HEADERS[name]}: rename the header (RabbitMQ "
                f"matches the name exactly: {name.lower()!r} or 'x-{name.lower()}' is an "
                "ordinary header)"
            )
        problem = _unstorable(name)
        if problem is not None:
            raise InvalidHeaders(f"header name {name!r} {problem}")
        problem = _unstorable(value)
        if problem is not None:
            raise InvalidHeaders(f"the value of header {name!r} ({value!r:.80}) {problem}")
        clean[name] = value
    return clean


_ENVELOPE_TEXT = ("type", "key", "correlation_id")
"""What a consumer reads as envelope text, and dead-letters if it holds a control character."""


def _control(text: str) -> str | None:
    where = control_at(text)
    if where is None:
        return None
    return (
        f"holds a control character (U+{ord(text[where]):04X} at position {where}), which "
        "every consumer refuses (it would dead-letter the message as malformed_envelope): "
        "remove it"
    )


def _unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored or sent (the end of an error message), or None.

    A NUL character is refused by PostgreSQL's text columns and by SQS; a lone surrogate
    (``"caf\\udce9"``, from bytes decoded with ``errors="surrogateescape"``) is not
    Unicode text: no driver stores it and no broker carries it. Either would fail the
    application's COMMIT (or, in the headers, stop the relay), so ``publish()`` refuses
    it here, before anything is kept.
    """
    if "\x00" in text:
        return (
            f"holds a NUL character (U+0000) at position {text.index(chr(0))}, which "
            "databases (PostgreSQL) and brokers (SQS) refuse: remove it"
        )
    where = surrogate_at(text)
    if where is not None:
        return (
            f"is not UTF-8 text: it holds a lone surrogate ({text[where]!r} at position "
            f"{where}), which UTF-8 cannot encode (bytes decoded with "
            "errors='surrogateescape'?): decode the bytes with their real encoding, or "
            "leave the character out"
        )
    return None
