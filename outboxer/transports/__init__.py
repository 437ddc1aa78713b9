"""Brokers behind one interface: RabbitMQ (pika), Amazon SQS and SNS (boto3), in-process memory.

``transport_from_url`` picks one from a URL:

* ``amqp://user:pass@host:5672/vhost`` (or ``amqps://``): RabbitMQ;
* ``sqs://?region=eu-west-1&endpoint_url=http://127.0.0.1:4566``: SQS (credentials from
  the usual boto3 sources, or ``sqs://KEY:SECRET@?region=...``), point to point;
* ``sns://?region=...`` (the same options): SNS topics for fan-out, each consumer's SQS
  queue subscribed to the topics of the types it handles;
* ``memory://`` or ``memory://name``: the in-process broker of that name.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigurationError, InvalidURL
from ..secrets import mask_url
from .base import (
    Delivery,
    Outcome,
    Receiver,
    SendResult,
    Source,
    Subscription,
    Transport,
    TransportDescription,
)
from .memory import MemoryBroker, MemoryTransport

__all__ = [
    "Delivery",
    "MemoryBroker",
    "MemoryTransport",
    "Outcome",
    "Receiver",
    "SendResult",
    "Source",
    "Subscription",
    "Transport",
    "TransportDescription",
    "redact_url",
    "transport_from_url",
]

SCHEMES = ("amqp", "amqps", "sqs", "sns", "memory")


def transport_from_url(url: str, **options: Any) -> Transport:
    """The transport a broker URL names; ``options`` go to the transport's constructor.

    A URL that cannot be used raises :class:`~outboxer.errors.ConfigurationError`
    (:class:`~outboxer.errors.InvalidURL` when it cannot be parsed), its secrets masked.
    """
    if not isinstance(url, str):
        raise InvalidURL(
            "a broker URL is a string such as 'amqp://user:pass@host:5672/', got "
            f"{type(url).__name__}"
        )
    try:
        return _transport_from_url(url, **options)
    except ValueError:  # urlsplit on a broken host or port, int() on an option...
        # Not the ValueError's text: a password with an unencoded '/' is "the port" to it.
        raise InvalidURL(
            f"invalid broker URL {mask_url(url)!r}: check the host, port and options, and "
            "percent-encode '/', '#', '@' and '?' in the user name and password"
        ) from None


def _transport_from_url(url: str, **options: Any) -> Transport:
    scheme = urlsplit(url).scheme.lower()
    if scheme in ("amqp", "amqps"):
        try:
            from .rabbitmq import RabbitMQTransport
        except ImportError as exc:
            raise ConfigurationError(
                "RabbitMQ needs pika: pip install 'outboxer[rabbitmq]'"
            ) from exc
        return RabbitMQTransport.from_url(url, **options)
    if scheme == "sqs":
        try:
            from .sqs import SQSTransport
        except ImportError as exc:
            raise ConfigurationError("SQS needs boto3: pip install 'outboxer[sqs]'") from exc
        return SQSTransport.from_url(url, **options)
    if scheme == "sns":
        try:
            from .sns import SNSTransport
        except ImportError as exc:
            raise ConfigurationError("SNS needs boto3: pip install 'outboxer[sqs]'") from exc
        return SNSTransport.from_url(url, **options)
    if scheme == "memory":
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        broker_options: dict[str, Any] = {}
        if "mandatory" in query:
            broker_options["mandatory"] = query["mandatory"].lower() in ("1", "true", "yes")
        if "max_message_bytes" in query:
            broker_options["max_message_bytes"] = int(query["max_message_bytes"])
        name = parts.netloc or parts.path.strip("/") or "default"
        return MemoryTransport(MemoryBroker.named(name, **broker_options))
    raise InvalidURL(
        f"unknown broker URL scheme {scheme!r} in {mask_url(url)!r}; use one of "
        f"{', '.join(s + '://' for s in SCHEMES)}"
    )


def redact_url(url: str) -> str:
    """``url`` with every secret masked, for logs (see :func:`outboxer.secrets.mask_url`)."""
    return mask_url(url)
