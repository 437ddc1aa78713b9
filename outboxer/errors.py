"""Exceptions raised by outboxer.

Every exception outboxer raises derives from :class:`OutboxerError`; a driver or
broker error that caused one is kept in ``__cause__``. The docstring of each class
is its default message.

::

    OutboxerError
     ├── ConfigurationError        wrong set-up, found at start-up
     │    ├── NotAnOutboxSession   publish() on a plain Session
     │    └── RetryConfigError     an impossible Retry(...)
     ├── MessageError              a message that cannot be published
     │    ├── SerializationError   the payload is not JSON-serializable
     │    ├── UnknownMessageType   no @message(...) registered for a class or name
     │    ├── MissingDestination   neither the call nor the type gives a destination
     │    └── InvalidHeaders       header names/values that are not strings
     ├── DecodeError               an incoming message that cannot be decoded (dead-lettered)
     ├── HandlerSessionError       a handler committed the session outboxer gave it
     ├── TransportError            a broker could not be reached or refused a request
     └── DeadLetterNotFound        no dead letter with that id
"""

from __future__ import annotations

from typing import Any


class OutboxerError(Exception):
    """An outboxer operation failed."""

    def __init__(self, message: str | None = None, *args: Any) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip(), *args)


class ConfigurationError(OutboxerError):
    """outboxer is not configured correctly."""


class NotAnOutboxSession(ConfigurationError):
    """This Session cannot publish: it is not an outbox session.

    Create sessions with ``sessionmaker(engine, class_=outboxer.OutboxSession)`` (or
    ``outboxer.AsyncOutboxSession`` for asyncio), or mix ``outboxer.OutboxMixin`` into your
    own Session class.
    """


class RetryConfigError(ConfigurationError):
    """A Retry policy has an impossible setting."""


class MessageError(OutboxerError):
    """The message cannot be published."""


class SerializationError(MessageError):
    """The message payload cannot be serialized to JSON."""


class UnknownMessageType(MessageError):
    """The payload's class is not a registered message type."""


class MissingDestination(MessageError):
    """The message has no destination."""


class InvalidHeaders(MessageError):
    """Message headers must map strings to strings."""


class MessageTooLarge(MessageError):
    """The message is larger than the database accepts in one statement."""


class DecodeError(OutboxerError):
    """An incoming message cannot be decoded."""


class HandlerSessionError(OutboxerError):
    """A handler must not commit the session it is given: outboxer commits it, with the
    inbox row, when the handler returns. Raise an exception to roll back instead."""


class TransportError(OutboxerError):
    """The broker could not be reached or refused the request."""


class DeadLetterNotFound(OutboxerError):
    """No dead letter has that id."""
