"""Message types and the envelope every message travels in.

``@outboxer.message("orders.placed", destination="orders")`` registers a dataclass or
a pydantic v2 model as a message type: the type name goes on the wire, the class is
how Python code publishes and handles it. Plain dicts are published with an explicit
``type=``. This module is pure: no I/O, no SQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar, cast
from uuid import UUID

from pydantic import TypeAdapter
from pydantic.errors import PydanticUndefinedAnnotation
from pydantic_core import PydanticSerializationError, ValidationError, to_json

from .errors import ConfigurationError, DecodeError, SerializationError, UnknownMessageType
from .keys import FromHeader

__all__ = [
    "CONTENT_TYPE_JSON",
    "Envelope",
    "MessageType",
    "message",
    "message_type_for",
    "registered_type",
    "wildcard_in",
]

T = TypeVar("T")
TypeT = TypeVar("TypeT", bound=type[Any])

CONTENT_TYPE_JSON = "application/json"

KeyFn = Callable[[Any], object]

TOPIC_WILDCARDS = "*#"
"""Characters no message type name may hold: AMQP topic wildcards."""


def wildcard_in(type_name: str) -> str | None:
    """Why ``type_name`` cannot name a message type (the end of an error message), or None.

    On RabbitMQ a consumer's queue is bound to the destination's topic exchange with the
    type name as its binding key: a handler of ``orders.*`` would receive every
    ``orders.placed`` (and dead-letter it as ``unknown_type``), one of ``#`` everything.
    """
    for char in TOPIC_WILDCARDS:
        if char in type_name:
            return (
                f"holds {char!r}, an AMQP topic wildcard: RabbitMQ binds consumers' queues "
                "with the type name, so its handlers would receive messages of other types "
                "(and dead-letter them); use a name without '*' and '#'"
            )
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class MessageType(Generic[T]):
    """A registered message type: its wire name, Python class and defaults."""

    name: str
    cls: type[T]
    destination: str | None = None
    key: KeyFn | None = None
    """Default ordering key taken from the payload (an attribute name or a function)."""
    dedup_key: KeyFn | FromHeader | None = None
    """Business key handlers deduplicate on, instead of the message id (from the payload,
    or a header: :func:`outboxer.from_header`)."""
    _adapter: list[TypeAdapter[T]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def adapter(self) -> TypeAdapter[T]:
        if not self._adapter:
            self._adapter.append(_build_adapter(self.cls, self.name))
        return self._adapter[0]

    def serialize(self, payload: T) -> bytes:
        """JSON bytes for ``payload``; :class:`SerializationError` names the bad field."""
        try:
            return self.adapter.dump_json(payload, warnings="error")
        except PydanticSerializationError as exc:
            label = self.cls.__name__
            problem = _describe_wrong_type(self.adapter, payload, label)
            raise SerializationError(
                problem or describe_unserializable(payload, label, exc)
            ) from exc

    def decode(self, body: bytes) -> T:
        """Build the payload object from JSON; :class:`DecodeError` says what did not match."""
        try:
            return self.adapter.validate_json(body)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            raise DecodeError(
                f"payload does not match message type {self.name!r} ({self.cls.__qualname__}): "
                f"{problems}"
            ) from exc

    def key_of(self, payload: object) -> str | None:
        return None if self.key is None else _as_key(self.key(payload))


_registry_lock = threading.Lock()
_by_name: dict[str, MessageType[Any]] = {}


def message(
    name: str,
    *,
    destination: str | None = None,
    key: str | KeyFn | None = None,
    dedup_key: str | KeyFn | FromHeader | None = None,
) -> Callable[[TypeT], TypeT]:
    """Register a dataclass or pydantic model as the message type ``name``.

    ``destination`` is where messages of this type go unless ``publish()`` names another
    (a RabbitMQ exchange or an SQS queue). ``key`` gives the default ordering key: an
    attribute name or a function of the payload; messages with the same key reach the
    broker in commit order. ``dedup_key`` makes handlers deduplicate on a business key
    (a webhook id, an order id) instead of the message id: a field name, a function of
    the payload, or :func:`outboxer.from_header` for a header's value.

    The class must be a dataclass or a pydantic model whose fields pydantic can
    serialize; anything else fails here, at import time, not at the first publish.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"@outboxer.message needs a non-empty type name, got {name!r}")
    problem = wildcard_in(name)
    if problem is not None:
        raise ConfigurationError(f"@outboxer.message: message type {name!r} {problem}")

    def register(cls: TypeT) -> TypeT:
        if not (dataclasses.is_dataclass(cls) or hasattr(cls, "model_dump_json")):
            raise ConfigurationError(
                f"@outboxer.message({name!r}) decorates {cls.__qualname__}, which is neither a "
                "dataclass nor a pydantic model; put @outboxer.message above @dataclass, or "
                "derive the class from pydantic.BaseModel"
            )
        mt: MessageType[Any] = MessageType(
            name=name,
            cls=cls,
            destination=destination,
            key=_key_fn(key, cls, "key"),
            dedup_key=(
                dedup_key
                if isinstance(dedup_key, FromHeader)
                else _key_fn(dedup_key, cls, "dedup_key")
            ),
        )
        # A forward reference defined later in the module: the adapter is built at first use.
        with contextlib.suppress(PydanticUndefinedAnnotation):
            mt._adapter.append(_build_adapter(cls, name))
        with _registry_lock:
            existing = _by_name.get(name)
            if existing is not None and _qualified(existing.cls) != _qualified(cls):
                raise ConfigurationError(
                    f"message type {name!r} is already registered by "
                    f"{_qualified(existing.cls)}; {_qualified(cls)} must use another name"
                )
            _by_name[name] = mt
        setattr(cls, "__outboxer_message__", mt)  # noqa: B010 - a dynamic attribute
        return cls

    return register


def message_type_for(payload: object) -> MessageType[Any]:
    """The registered type of ``payload``'s class (or of a class passed itself)."""
    cls = payload if isinstance(payload, type) else type(payload)
    mt = cls.__dict__.get("__outboxer_message__")
    if mt is None:
        raise UnknownMessageType(
            f"{cls.__qualname__} is not a message type: decorate it with "
            f'@outboxer.message("some.type", destination="...") or publish a dict with type="..."'
        )
    return cast(MessageType[Any], mt)


def registered_type(name: str) -> MessageType[Any] | None:
    """The message type registered under ``name``, if any."""
    return _by_name.get(name)


@dataclasses.dataclass(frozen=True)
class Envelope:
    """One message as it is stored in the outbox and sent to a broker.

    The wire format (how each field travels in AMQP properties and SQS attributes) is
    documented in ``docs/wire-format.md``.
    """

    message_id: UUID
    type: str
    destination: str
    payload: bytes
    occurred_at: datetime
    key: str | None = None
    correlation_id: str | None = None
    """The conversation this message belongs to; None: it starts one (see :attr:`correlation`)."""
    causation_id: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    traceparent: str | None = None
    tracestate: str | None = None
    content_type: str = CONTENT_TYPE_JSON
    handler: str | None = None
    """Set on a retry or a replay: only this handler (``consumer.handler``) runs it."""
    attempt: int = 1
    """Which run of ``handler`` this delivery is (1 for ordinary messages)."""
    outbox_id: int | None = dataclasses.field(default=None, compare=False)
    """The outbox row this envelope was read from, when the relay sends it: every row is
    one send (the first publish, a retry, a replay), so brokers that deduplicate (SQS FIFO)
    key on it. Not part of the wire format."""

    @property
    def correlation(self) -> str:
        """The correlation id, defaulting to this message's own id."""
        return self.correlation_id or str(self.message_id)


def describe_unserializable(payload: object, type_label: str, exc: Exception) -> str:
    """Explain which field of ``payload`` cannot be serialized, and how to fix it."""
    found = _find_unserializable(payload, type_label)
    if found is not None:
        path, value = found
        return (
            f"cannot serialize {path}: a value of type {type(value).__qualname__} is not "
            "JSON-serializable (use str, int, float, bool, None, list, dict, a dataclass, a "
            "pydantic model, datetime, date, UUID, Decimal or Enum)"
        )
    detail = " ".join(str(exc).split())
    return f"cannot serialize {type_label}: {detail}"


def _describe_wrong_type(adapter: TypeAdapter[Any], payload: object, label: str) -> str | None:
    """Name the first field whose value does not match its declared type, and both types.

    pydantic only warns about such a field while serializing (with its own wording, which
    changes between versions); validating the serialized form strictly finds the field.
    """
    try:
        adapter.validate_json(adapter.dump_json(payload, warnings=False), strict=True)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        location = tuple(error["loc"])
    except Exception:
        return None
    else:
        return None
    if not location:
        return None
    path = label + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in location)
    expected = _declared_type(type(payload), location) or error["msg"]
    found = _value_at(payload, location)
    if found is _MISSING:
        return f"cannot serialize {path}: expected {expected} ({error['msg']})"
    got = type(found).__qualname__
    return f"cannot serialize {path}: expected {expected}, got {got} ({found!r})"


_MISSING = object()


def _value_at(value: object, location: tuple[int | str, ...]) -> object:
    for part in location:
        try:
            if isinstance(value, (set, frozenset)):
                value = list(value)[part]  # type: ignore[index]
            elif isinstance(part, int) or isinstance(value, Mapping):
                value = value[part]  # type: ignore[index]
            else:
                value = getattr(value, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return _MISSING
    return value


def _declared_type(cls: object, location: tuple[int | str, ...]) -> str | None:
    """The annotation at ``location`` in ``cls`` (dataclass and pydantic fields, lists,
    dicts), as a readable name; None when it cannot be followed."""
    current: Any = cls
    for part in location:
        origin, args = typing.get_origin(current), typing.get_args(current)
        if isinstance(part, str) and dataclasses.is_dataclass(current):
            current = typing.get_type_hints(current).get(part)
        elif isinstance(part, str) and hasattr(current, "model_fields"):
            info = current.model_fields.get(part)
            current = info.annotation if info is not None else None
        elif origin is tuple and args and not (len(args) == 2 and args[1] is ...):
            current = args[part] if isinstance(part, int) and part < len(args) else None
        elif origin in (list, set, frozenset, tuple) and args:
            current = args[0]
        elif origin is dict and len(args) == 2:
            current = args[1]
        else:
            return None
        if current is None:
            return None
    if isinstance(current, type):
        return current.__qualname__
    return str(current).replace("typing.", "")


def _find_unserializable(value: object, path: str, depth: int = 0) -> tuple[str, object] | None:
    if depth > 50:
        return None
    children: list[tuple[str, object]] = []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        children = [(f"{path}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif hasattr(type(value), "model_fields") and not isinstance(value, type):
        fields = getattr(type(value), "model_fields", {})
        children = [(f"{path}.{name}", getattr(value, name)) for name in fields]
    elif isinstance(value, Mapping):
        children = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        try:
            to_json(value)
        except (PydanticSerializationError, ValueError, TypeError):
            return path, value
        return None
    for child_path, child in children:
        found = _find_unserializable(child, child_path, depth + 1)
        if found is not None:
            return found
    return None


def _build_adapter(cls: type[T], name: str) -> TypeAdapter[T]:
    try:
        return TypeAdapter(cls)
    except PydanticUndefinedAnnotation:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"message type {name!r} ({cls.__qualname__}) has fields outboxer cannot serialize: "
            f"{str(exc).splitlines()[0]}"
        ) from exc


def _key_fn(spec: str | KeyFn | None, cls: type[Any], what: str) -> KeyFn | None:
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        attr = spec
        if dataclasses.is_dataclass(cls):
            names = {f.name for f in dataclasses.fields(cls)}
        else:
            names = set(getattr(cls, "model_fields", {}))
        if attr not in names:
            raise ConfigurationError(
                f"{what}={attr!r} on {cls.__qualname__}: the class has no field {attr!r} "
                f"(fields: {', '.join(sorted(names)) or 'none'})"
            )
        return lambda payload: getattr(payload, attr)
    raise ConfigurationError(f"{what} must be a field name or a function, got {spec!r}")


def _as_key(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _qualified(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class EnvelopeFacts:
    """What a failure report reads from its message's envelope (``Failure``,
    ``SendFailure``): a class with an ``envelope`` attribute gets these properties."""

    envelope: Envelope

    @property
    def message_id(self) -> UUID:
        return self.envelope.message_id

    @property
    def message_type(self) -> str:
        return self.envelope.type

    @property
    def headers(self) -> Mapping[str, str]:
        return self.envelope.headers
