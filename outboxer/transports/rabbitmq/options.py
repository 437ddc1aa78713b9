"""The transport's options: defaults, validation, and parsing an ``amqp://`` URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import pika
from pika.connection import Parameters

from ...errors import ConfigurationError
from ...secrets import mask_url, unencoded_credentials

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""RabbitMQ 4's default ``max_message_size``."""

_URL_OPTIONS: dict[str, type] = {
    "confirm_timeout": float,
    "max_message_bytes": int,
    "connect_timeout": float,
    "connection_name": str,
    "queue_type": str,
    "delivery_limit": int,
}


def _parse_url(url: str, options: dict[str, Any]) -> tuple[Parameters, dict[str, Any]]:
    """pika's parameters and outboxer's options of :meth:`RabbitMQTransport.from_url`."""
    safe = _redact(url)
    if unencoded_credentials(url):
        raise ConfigurationError(
            f"invalid RabbitMQ URL {safe!r}: percent-encode '/', '?', '#' and '@' in the user "
            "name and password (%2F, %3F, %23, %40)"
        )
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an amqp:// or amqps:// URL: {safe!r}")
    kwargs: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for name, raw in parse_qsl(parts.query, keep_blank_values=True):
        kind = _URL_OPTIONS.get(name)
        if kind is None:
            rest.append((name, raw))
            continue
        try:
            kwargs[name] = kind(raw)
        except ValueError:
            expected = "a whole number" if kind is int else "a number"
            raise ConfigurationError(
                f"RabbitMQ URL option {name} must be {expected}, got {raw!r} (in {safe!r})"
            ) from None
    unknown = set(options) - set(_URL_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown RabbitMQ option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(sorted(unknown))}; use {', '.join(sorted(_URL_OPTIONS))}"
        )
    kwargs.update(options)
    pika_url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
    try:
        parameters = pika.URLParameters(pika_url)
    except (ValueError, TypeError, SyntaxError) as exc:
        reason = _scrub(str(exc), parts.password)
        raise ConfigurationError(f"invalid RabbitMQ URL {safe!r}: {reason}") from None
    return parameters, kwargs


def _positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(
            f"RabbitMQ option {name} must be a number of seconds above 0, got {value!r}"
        )
    return float(value)


def _redact(url: str) -> str:
    return mask_url(url)


def _scrub(text: str, password: str | None) -> str:
    if password:
        for secret in {password, unquote(password)}:
            text = text.replace(secret, "***")
    return text


def _queue_arguments(queue_type: str | None, delivery_limit: int | None) -> dict[str, object]:
    """The arguments consumer queues are declared with (see RabbitMQTransport)."""
    if queue_type not in (None, "classic", "quorum"):
        raise ConfigurationError(
            f"RabbitMQ option queue_type must be classic or quorum, got {queue_type!r}"
        )
    if delivery_limit is not None:
        if (
            isinstance(delivery_limit, bool)
            or not isinstance(delivery_limit, int)
            or delivery_limit < 1
        ):
            raise ConfigurationError(
                "RabbitMQ option delivery_limit must be a whole number >= 1, "
                f"got {delivery_limit!r}"
            )
        if queue_type != "quorum":
            raise ConfigurationError(
                "RabbitMQ option delivery_limit needs queue_type=quorum (classic queues do not "
                "count deliveries)"
            )
    arguments: dict[str, object] = {}
    if queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    return arguments
