"""The AMQP mapping: outboxer's canonical header map to pika properties and table, and back.

See the package docstring for which header becomes which property. Sending, a message
that cannot be carried (too large, an overlong type or destination) gets its result here
instead of being published; receiving, :func:`canonical_headers` rebuilds the exact map.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pika.spec import BasicProperties

from ... import wire
from ...message import Envelope
from ..base import SendResult

_SHORTSTR = 255
_PERSISTENT: Literal[2] = 2

# One message ready to publish: (index in the batch, exchange, routing key, body, properties).
_Outgoing = tuple[int, str, str, bytes, BasicProperties]


def _prepare(
    index: int, envelope: Envelope, limit: int, max_table_bytes: int
) -> _Outgoing | SendResult:
    """The AMQP message for ``envelope``, or the result that keeps it from being sent."""
    headers = wire.encode_headers(envelope)
    body = envelope.payload
    table_chars = sum(map(len, headers)) + sum(map(len, headers.values()))
    if len(body) + table_chars * 4 > limit or table_chars * 4 > max_table_bytes:
        table_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in headers.items())
        size = len(body) + table_bytes
        if size > limit:
            return SendResult.rejected(
                "message_too_large",
                f"the message is {size} bytes (body and headers); the limit is {limit} "
                "bytes (RabbitMQ's max_message_size; set max_message_bytes to match it)",
            )
        if table_bytes > max_table_bytes:
            return SendResult.rejected(
                "message_too_large",
                f"the headers are {table_bytes} bytes; AMQP carries them in one frame, so "
                f"the limit is {max_table_bytes} bytes",
            )
    type_ = headers.pop(wire.TYPE)
    if _utf8_over(type_, _SHORTSTR) or _utf8_over(envelope.destination, _SHORTSTR):
        return SendResult.rejected(
            "invalid_message",
            "the message type and the destination must be at most 255 bytes each (the "
            "AMQP limit for routing keys and exchange names)",
        )
    # Properties are AMQP short strings; an overlong one stays in the table instead.
    correlation = headers[wire.CORRELATION_ID]
    correlation_id = None if _utf8_over(correlation, _SHORTSTR) else correlation
    if correlation_id is not None:
        del headers[wire.CORRELATION_ID]
    content_type: str | None = headers[wire.CONTENT_TYPE]
    if _utf8_over(headers[wire.CONTENT_TYPE], _SHORTSTR):
        content_type = None
    else:
        del headers[wire.CONTENT_TYPE]
    properties = BasicProperties(
        content_type=content_type,
        delivery_mode=_PERSISTENT,
        message_id=headers.pop(wire.MESSAGE_ID),
        type=type_,
        correlation_id=correlation_id,
        timestamp=int(envelope.occurred_at.timestamp()),
        app_id="outboxer",
        headers=headers,
    )
    return (index, envelope.destination, type_, body, properties)


def _utf8_over(text: str, limit: int) -> bool:
    # A str of n characters is at most 4n bytes of UTF-8: only long ones need encoding.
    return len(text) * 4 > limit and len(text.encode()) > limit


def _table_value(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def canonical_headers(properties: BasicProperties) -> dict[str, str]:
    """The canonical header map of a delivered message: its table, then its properties."""
    headers: dict[str, str] = {}
    table = properties.headers
    if table:
        for name, value in table.items():
            headers[str(name)] = _table_value(value)
    if properties.message_id:
        headers[wire.MESSAGE_ID] = properties.message_id
    if properties.type:
        headers[wire.TYPE] = properties.type
    if properties.correlation_id:
        headers[wire.CORRELATION_ID] = properties.correlation_id
    if properties.content_type:
        headers[wire.CONTENT_TYPE] = properties.content_type
    if wire.OCCURRED_AT not in headers and properties.timestamp is not None:
        # Another publisher's message: the property is all there is.
        occurred = datetime.fromtimestamp(properties.timestamp, timezone.utc)
        headers[wire.OCCURRED_AT] = occurred.isoformat()
    return headers
