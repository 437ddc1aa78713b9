"""Inbound adapters: handlers for messages that outboxer did not publish.

    @consumer.adapter(PaymentReceived, queue="webhooks",
                      message_id=outboxer.from_header("x-webhook-id"))
    def record(event: PaymentReceived, session) -> None: ...

An adapter binds one handler to a queue of plain messages (another system's events,
webhooks forwarded to a queue): a named queue (RabbitMQ or SQS), or, on RabbitMQ, an
exchange and routing key that a queue of the adapter's own is bound to. The body is the
payload, decoded as the adapter's type. The message id is the broker's own id (AMQP
``message_id``, SQS ``MessageId``), or a header or body field the adapter names. A
message id that is not a UUID becomes ``uuid5(INBOUND_NAMESPACE, id)``: the same id
gives the same message id, so a redelivery finds its inbox row.

From there it is one of the consumer's handlers: the inbox, instant retries and the
dead-letter table. Its dead letters replay back to it, through the consumer's own queue
(the replay is an outboxer message addressed to that handler). Delayed retries are
refused at registration: they travel through the outbox back to their source, and an
adapter has no source it could send to.

:func:`take_in` is the adapter's intake, the counterpart of :func:`outboxer.intake.prepare`:
nothing a delivery carries raises out of it; what cannot be used is a
:class:`~outboxer.intake.Rejected` with the reason (no message id, a body that is not
JSON, the wrong shape).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from functools import partial
from typing import Any
from uuid import UUID, uuid5

from . import wire
from .errors import ConfigurationError, DecodeError
from .handlers import HandlerSpec, Inbound, build_spec
from .intake import Prepared, Rejected, malformed_dead_letter
from .keys import FromBody, FromHeader
from .message import Envelope
from .redaction import one_line
from .retry import Retry
from .times import aware_utc
from .transports.base import Source

__all__ = ["INBOUND_NAMESPACE", "build_adapter", "message_id_of", "take_in"]

INBOUND_NAMESPACE = UUID("6f0e5d2a-6a57-4c1e-9d3b-5f1f8b6a0a11")
"""The namespace of the UUIDs made from message ids that are not UUIDs."""

_ID_LIMIT = 1024
"""A longer message id is refused: no broker or webhook sends one; it is an attack."""


def build_adapter(
    consumer: str,
    default_retry: Retry,
    consumer_is_async: bool,
    fn: Callable[..., Any],
    message: type | str,
    *,
    queue: str | None,
    exchange: str | None,
    routing_key: str,
    message_id: FromHeader | FromBody | None,
    name: str | None,
    retry: Retry | None,
    dedup_key: str | Callable[[Any], object] | FromHeader | None,
) -> HandlerSpec:
    """The :class:`HandlerSpec` of an adapter, or the ConfigurationError that names the fix."""
    label = name or getattr(fn, "__name__", "?")
    if not (queue or exchange):
        raise ConfigurationError(
            f"adapter {label!r} of consumer {consumer!r} reads nothing: pass queue=... (a queue "
            "to read) or, on RabbitMQ, exchange=... and routing_key=... (bound to a queue of "
            "its own)"
        )
    for what, value in (("queue", queue), ("exchange", exchange), ("routing_key", routing_key)):
        if value is not None and (not isinstance(value, str) or not value or len(value) > 255):
            raise ConfigurationError(
                f"adapter {label!r}: {what} must be a name of 1-255 characters, got {value!r}"
            )
    if message_id is not None and not isinstance(message_id, (FromHeader, FromBody)):
        raise ConfigurationError(
            f"adapter {label!r}: message_id must be outboxer.from_header(name) or "
            f"outboxer.from_body(field) (or left out: the broker's id), got {message_id!r}"
        )
    policy = retry if retry is not None else _instant_only(default_retry)
    if isinstance(policy, Retry) and policy.max_attempts > policy.instant + 1:
        n = policy.max_attempts
        raise ConfigurationError(
            f"adapter {label!r} of consumer {consumer!r}: retry={policy!r} delays retries "
            f"{policy.instant + 2}-{n} through the outbox, and an adapter has no source channel "
            "to reschedule them into (its messages come from another system's queue); use "
            f"instant retries only: outboxer.Retry(max_attempts={n}, instant={n - 1})"
        )
    source = Source(queue or f"{consumer}.{label}", exchange, routing_key)
    spec = build_spec(
        consumer,
        default_retry,
        consumer_is_async,
        fn,
        message,
        name,
        policy,
        dedup_key,
        source.queue,
    )
    return dataclasses.replace(spec, destination=source.queue, inbound=Inbound(source, message_id))


def _instant_only(retry: Retry) -> Retry:
    """The consumer's policy without its delayed retries (an adapter's default)."""
    if retry.max_attempts <= retry.instant + 1:
        return retry
    return Retry(max_attempts=retry.instant + 1, retry_on=retry.retry_on, instant=retry.instant)


def take_in(
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
    consumer: str,
    spec: HandlerSpec,
) -> Prepared | Rejected:
    """Build the envelope of a plain message for adapter ``spec``; any problem is a Rejected."""
    assert spec.inbound is not None
    inbound = spec.inbound

    def reject(error_type: str, reason: str, envelope: Envelope | None = None) -> Rejected:
        # With an envelope, its replay comes back to this adapter alone.
        handler = spec.name if envelope is not None else None
        letter = malformed_dead_letter(
            body, headers, destination, consumer, error_type, reason, envelope, handler
        )
        return Rejected(letter, f"adapter {spec.id}: {reason}")

    undecodable = headers.get(wire.UNDECODABLE)
    if undecodable:
        return reject("malformed_delivery", f"the broker client could not decode it: {undecodable}")
    try:
        source_id = _source_id(inbound, body, headers)
    except Exception as exc:  # a body that is not JSON, nested too deep...
        return reject("payload_mismatch", f"the body is not a JSON object: {one_line(exc)}")
    where = str(inbound.message_id) if inbound.message_id else "the broker's message id"
    if source_id is None:
        return reject(
            "missing_message_id",
            f"the message has no id: the adapter takes it from {where}, which it does not carry",
        )
    if len(source_id) > _ID_LIMIT:
        return reject(
            "missing_message_id",
            f"the message id from {where} is {len(source_id)} characters long; "
            f"the limit is {_ID_LIMIT}",
        )
    envelope = _envelope(spec, source_id, body, headers, destination)
    try:
        decode = json.loads if spec.message_type is None else spec.message_type.decode
        event = decode(body)
    except DecodeError as exc:
        return reject("payload_mismatch", str(exc), envelope)
    except Exception as exc:  # not JSON, nested too deep, not UTF-8...
        return reject("payload_mismatch", f"the body is not JSON: {one_line(exc)}", envelope)
    return Prepared(envelope, [spec], {spec.id: event}, decoders={spec.id: partial(decode, body)})


def _source_id(inbound: Inbound, body: bytes, headers: Mapping[str, str]) -> str | None:
    rule = inbound.message_id
    if rule is None:
        # As a header's or a body's: a blank id would make every message with it one.
        found = headers.get(wire.BROKER_MESSAGE_ID)
        return found if found and found.strip() else None
    if isinstance(rule, FromHeader):
        return rule.value(headers)
    return rule.value(body)


def message_id_of(source_id: str) -> UUID:
    """The message id of an adapter's message whose own id is ``source_id``."""
    try:
        return UUID(source_id)
    except ValueError:
        return uuid5(INBOUND_NAMESPACE, source_id)


def _envelope(
    spec: HandlerSpec,
    source_id: str,
    body: bytes,
    headers: Mapping[str, str],
    destination: str,
) -> Envelope:
    traceparent = headers.get(wire.TRACEPARENT) or None
    tracestate = headers.get(wire.TRACESTATE) or None
    if traceparent is None or not wire.valid_traceparent(traceparent):
        traceparent = tracestate = None
    else:
        traceparent = traceparent[:55]
        if tracestate is not None and (len(tracestate) > 512 or not tracestate.isprintable()):
            tracestate = None
    return Envelope(
        message_id=message_id_of(source_id),
        type=spec.type_name,
        destination=destination,
        payload=body,
        occurred_at=_occurred_at(headers),
        headers={k: v for k, v in headers.items() if not _envelope_header(k)},
        traceparent=traceparent,
        tracestate=tracestate,
    )


def _occurred_at(headers: Mapping[str, str]) -> datetime:
    """The sender's time (RabbitMQ's ``timestamp`` property, as the receiver maps it), in
    UTC; now when it has none that outboxer takes (:mod:`outboxer.times`): another
    system's message is handled all the same, its time being for information only."""
    return aware_utc(headers.get(wire.OCCURRED_AT)) or datetime.now(timezone.utc)


def _envelope_header(name: str) -> bool:
    """Envelope fields and receiver marks: not the sender's headers to keep."""
    lowered = name.lower()
    return (
        name in wire.RESERVED
        or lowered.startswith(("outboxer-", "x-outboxer-"))
        or lowered in ("content-type", "traceparent", "tracestate")
    )
