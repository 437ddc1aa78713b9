"""outboxer: reliable asynchronous messaging for SQLAlchemy applications.

Publish inside your transaction, relay to RabbitMQ or SQS, consume through an
idempotent inbox. See ``docs/`` for the guides and ``docs/guarantees.md`` for what is
promised and what happens on failure.
"""

from __future__ import annotations

from .consumer import Consumer, ConsumerStats, MessageReport
from .dead_letters import DeadLetter, DeadLetters
from .errors import (
    ConfigurationError,
    DeadLetterNotFound,
    DecodeError,
    InvalidHeaders,
    MessageError,
    MessageTooLarge,
    MissingDestination,
    NotAnOutboxSession,
    OutboxerError,
    RetryConfigError,
    SerializationError,
    TransportError,
    UnknownMessageType,
)
from .failures import ErrorChannel, Failure, set_default_on_failure
from .handlers import Context
from .ids import uuid7
from .keys import FromBody, FromHeader, from_body, from_header
from .message import Envelope, MessageType, message
from .publishing import NO_KEY, NoKey
from .relay import Relay, RelayStats, SendFailure, relay_engine
from .retry import Backoff, Retry
from .scheduling import Tick
from .session import AsyncOutboxSession, OutboxMixin, OutboxSession, publish
from .tables import create_all, dead_letter, drop_all, inbox, metadata, outbox, sent
from .transports import transport_from_url

__version__ = "0.1.0"

__all__ = [
    "NO_KEY",
    "AsyncOutboxSession",
    "Backoff",
    "ConfigurationError",
    "Consumer",
    "ConsumerStats",
    "Context",
    "DeadLetter",
    "DeadLetters",
    "DeadLetterNotFound",
    "DecodeError",
    "Envelope",
    "ErrorChannel",
    "Failure",
    "FromBody",
    "FromHeader",
    "InvalidHeaders",
    "MessageError",
    "MessageReport",
    "MessageTooLarge",
    "MessageType",
    "MissingDestination",
    "NoKey",
    "NotAnOutboxSession",
    "OutboxMixin",
    "OutboxSession",
    "OutboxerError",
    "Relay",
    "RelayStats",
    "Retry",
    "RetryConfigError",
    "SendFailure",
    "SerializationError",
    "Tick",
    "TransportError",
    "UnknownMessageType",
    "create_all",
    "dead_letter",
    "drop_all",
    "from_body",
    "from_header",
    "inbox",
    "message",
    "metadata",
    "outbox",
    "publish",
    "relay_engine",
    "sent",
    "set_default_on_failure",
    "transport_from_url",
    "uuid7",
]

# OpenTelemetry hooks, when the API is installed (no-op otherwise; OUTBOXER_TRACING=off opts out).
from . import tracing as _tracing

_tracing.install_if_available()
