"""Exceptions raised by outboxer.

Every exception outboxer raises derives from :class:`OutboxerError`; a driver or
broker error that caused one is kept in ``__cause__``. The docstring of each class
is its default message.

::

    OutboxerError
     ├── ConfigurationError        wrong set-up, found at start-up
     │    ├── NotAnOutboxSession   publish() on a plain Session
     │    ├── RetryConfigError     an impossible Retry(...)
     │    ├── InvalidURL*          a database or broker URL that cannot be used (masked)
     │    └── InvalidName          a destination or consumer name the broker would refuse
     ├── MessageError              a message that cannot be published
     │    ├── SerializationError   the payload is not JSON-serializable
     │    ├── UnknownMessageType   no @message(...) registered for a class or name
     │    ├── MissingDestination   neither the call nor the type gives a destination
     │    └── InvalidHeaders       header names/values that are not strings
     ├── DecodeError               an incoming message that cannot be decoded (dead-lettered)
     ├── HandlerMisuse             a handler broke its call's contract (never retried)
     │    └── HandlerSessionError  a handler committed the session outboxer gave it
     ├── TransportError            a broker could not be reached or refused a request
     │    └── BrokerUnavailable*   cannot connect: refused, timed out, unknown host    7
     │         └── BrokerAccessDenied*   the broker refused the credentials          8
     ├── OperatorError             a failure the operator fixes outside the code     1
     │    ├── InvalidURL*          (also a ConfigurationError)                       3
     │    ├── DatabaseUnavailable  cannot connect: refused, timed out, no database   4
     │    │    └── DatabaseAccessDenied   the database refused the credentials       5
     │    ├── TablesMissing        the database lacks outboxer's tables (db upgrade) 6
     │    └── BrokerUnavailable*   (also a TransportError)                           7
     └── DeadLetterNotFound        no dead letter with that id

``*``: two parents. An :class:`OperatorError` carries the ``exit_code`` shown on the right:
the command line prints its one-line message (which names the fix) and exits with it;
docs/operations.md has the table. :mod:`outboxer.diagnosis` turns driver errors (psycopg,
PyMySQL, sqlite3, pika, botocore) into them, in one place; the driver's error stays in
``__cause__``.
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


class HandlerMisuse(OutboxerError):
    """A handler broke the contract of its call (it returned a coroutine it was not awaited
    for, or ended the transaction outboxer gave it): every run would do the same, so the
    message is dead-lettered at once."""


class HandlerSessionError(HandlerMisuse):
    """A handler must not commit, roll back or close the session it is given: outboxer
    commits it, with the inbox row, when the handler returns. Raise an exception to roll
    back instead."""


class TransportError(OutboxerError):
    """The broker could not be reached or refused the request."""


class OperatorError(OutboxerError):
    """A failure the operator fixes outside the code; the CLI exits with ``exit_code``."""

    exit_code = 1


class InvalidURL(ConfigurationError, OperatorError):
    """The URL cannot be used; its secrets are masked in this message."""

    exit_code = 3


class InvalidName(ConfigurationError):
    """The broker would refuse this destination or consumer name."""


class DatabaseUnavailable(OperatorError):
    """The database cannot be reached."""

    exit_code = 4


class DatabaseAccessDenied(DatabaseUnavailable):
    """The database refused the credentials."""

    exit_code = 5


class TablesMissing(OperatorError):
    """The outboxer tables are missing: run `outboxer db upgrade`."""

    exit_code = 6


class BrokerUnavailable(TransportError, OperatorError):
    """The broker cannot be reached."""

    exit_code = 7


class BrokerAccessDenied(BrokerUnavailable):
    """The broker refused the credentials."""

    exit_code = 8


class DeadLetterNotFound(OutboxerError):
    """No dead letter has that id."""
