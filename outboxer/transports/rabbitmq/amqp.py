"""The AMQP mapping: outboxer's canonical header map to pika properties and table, and back.

See the package docstring for which header becomes which property. Sending, a message
that cannot be carried (too large, an overlong type or destination, a ``CC`` or ``BCC``
header) gets its result here
instead of being published; receiving, :func:`canonical_headers` rebuilds the exact map.
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone
from typing import Any

from pika import spec
from pika.spec import BasicProperties

from ... import wire
from ...message import Envelope
from ...publishing import BROKER_HEADERS
from ..base import SendResult
from .frames import FrameTooLarge, encode_properties

_SHORTSTR = 255

# One message ready to publish: (index in the batch, exchange, routing key, body, encoded
# properties (:func:`.frames.encode_properties`), message id).
_Outgoing = tuple[int, str, str, bytes, bytes, str]


def _prepare(
    index: int, envelope: Envelope, limit: int, max_table_bytes: int
) -> _Outgoing | SendResult:
    """The AMQP message for ``envelope``, or the result that keeps it from being sent.

    Text that is not UTF-8 (a lone surrogate in a header of a row an older version
    wrote) is this message's ``invalid_message``: raising would fail the whole batch,
    which the relay takes for an outage of the destination, and try again forever.
    """
    try:
        return _encode(index, envelope, limit, max_table_bytes)
    except UnicodeEncodeError as exc:
        problem = wire.unencodable(wire.encode_headers(envelope)) or (
            f"a field is not UTF-8 text ({exc})"
        )
        return SendResult.rejected(
            "invalid_message", f"the message cannot be encoded as AMQP: {problem}"
        )


def _encode(
    index: int, envelope: Envelope, limit: int, max_table_bytes: int
) -> _Outgoing | SendResult:
    for name, why in BROKER_HEADERS.items():
        if name in envelope.headers:
            # A row an older version (or SQL by hand) wrote: publish() refuses the name.
            return SendResult.rejected(
                "invalid_message",
                f"the message cannot be sent to RabbitMQ: header {name!r} {why}; rename "
                "the header and publish the message again",
            )
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
    message_id = headers.pop(wire.MESSAGE_ID)
    try:
        properties = encode_properties(
            content_type=content_type,
            headers=headers,
            correlation_id=correlation_id,
            message_id=message_id,
            timestamp=int(envelope.occurred_at.timestamp()),
            type_=type_,
        )
    except (FrameTooLarge, struct.error, OverflowError) as exc:
        return SendResult.rejected(
            "invalid_message", f"the message cannot be encoded as AMQP: {exc}"
        )
    return (index, envelope.destination, type_, body, properties, message_id)


def _utf8_over(text: str, limit: int) -> bool:
    # A str of n characters is at most 4n bytes of UTF-8: only long ones need encoding.
    return len(text) * 4 > limit and len(text.encode()) > limit


_MAX_TABLE_VALUE = 64 * 1024


def _text(value: object) -> str:
    """A property or table value as text; never raises (a delivery is not trusted)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return "<nested AMQP value>"  # outboxer's headers are flat strings
    try:
        return str(value)[:_MAX_TABLE_VALUE]
    except Exception:
        return f"<unreadable {type(value).__name__}>"


def canonical_headers(properties: BasicProperties) -> dict[str, str]:
    """The canonical header map of a delivered message: its table, then its properties.

    Whatever the delivery carries, this returns a map of strings: a property that is
    not UTF-8 is decoded with replacement characters, a timestamp no datetime can hold
    is left out (the message then has no occurred-at time and is dead-lettered).
    """
    headers: dict[str, str] = {}
    table = properties.headers
    if isinstance(table, dict):
        for name, value in table.items():
            headers[_text(name)] = _text(value)
    for name, value in (
        (wire.MESSAGE_ID, properties.message_id),
        (wire.TYPE, properties.type),
        (wire.CORRELATION_ID, properties.correlation_id),
        (wire.CONTENT_TYPE, properties.content_type),
    ):
        if value:
            headers[name] = _text(value)
    if wire.OCCURRED_AT not in headers and properties.timestamp is not None:
        # Another publisher's message: the property is all there is.
        try:
            occurred = datetime.fromtimestamp(properties.timestamp, timezone.utc)
        except (OverflowError, OSError, ValueError, TypeError):
            pass
        else:
            headers[wire.OCCURRED_AT] = occurred.isoformat()
    return headers


def source_headers(properties: BasicProperties) -> dict[str, str]:
    """:func:`canonical_headers` of a delivery from an inbound adapter's queue, with the
    AMQP ``message_id`` property (the only one) as the broker's message id."""
    headers = canonical_headers(properties)
    headers.pop(wire.BROKER_MESSAGE_ID, None)  # a header table cannot forge it
    if properties.message_id:
        headers[wire.BROKER_MESSAGE_ID] = _text(properties.message_id)
    return headers


class TolerantProperties(BasicProperties):
    """pika's BasicProperties, except that a header table pika cannot decode does not
    take the connection down.

    pika decodes a header table recursively; one nested a few thousand levels deep (or
    otherwise malformed) raises inside pika's frame decoder, which drops the connection,
    and the broker redelivers the message to the next connection: a loop no consumer
    gets out of. Here the table is skipped by its length prefix instead, the other
    properties are decoded as usual, and the headers say why
    (``x-outboxer-undecodable``), so the consumer dead-letters the delivery once.
    """

    def decode(self, encoded: bytes, offset: int = 0) -> Any:
        try:
            return super().decode(encoded, offset)
        except Exception as exc:  # RecursionError, struct.error, a bad type tag...
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        stripped = _without_headers(encoded, offset)
        if stripped is None:
            raise ValueError(f"undecodable AMQP properties ({reason})")
        super().decode(stripped, 0)
        self.headers = {UNDECODABLE_TABLE: f"the AMQP header table cannot be decoded ({reason})"}
        return self


UNDECODABLE_TABLE = wire.UNDECODABLE


def _without_headers(encoded: bytes, offset: int) -> bytes | None:
    """``encoded`` properties with the header table cut out (its flag cleared), or None."""
    try:
        (flags,) = struct.unpack_from(">H", encoded, offset)
        if flags & 1 or not flags & BasicProperties.FLAG_HEADERS:
            return None  # a second flag word (never sent by RabbitMQ), or no table at all
        position = offset + 2
        for flag in (BasicProperties.FLAG_CONTENT_TYPE, BasicProperties.FLAG_CONTENT_ENCODING):
            if flags & flag:
                position += 1 + encoded[position]
        (length,) = struct.unpack_from(">I", encoded, position)
        end = position + 4 + length
        if end > len(encoded):
            return None
        head = struct.pack(">H", flags & ~BasicProperties.FLAG_HEADERS)
        return head + encoded[offset + 2 : position] + encoded[end:]
    except (struct.error, IndexError):
        return None


def install_tolerant_properties() -> None:
    """Make pika decode content headers with :class:`TolerantProperties` (idempotent)."""
    spec.props[BasicProperties.INDEX] = TolerantProperties
