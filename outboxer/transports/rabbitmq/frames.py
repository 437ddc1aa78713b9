"""AMQP 0-9-1 frames for ``basic.publish``, encoded by outboxer instead of pika, per batch.

pika builds a method, a header and a body frame object per message and marshals each
through generic code: for a batch of small messages that was most of the publishing
thread's time. Here the parts that do not change are encoded once (the ``basic.publish``
method frame per exchange and routing key, the constant properties), the rest with a few
``struct`` calls, and a batch goes to the socket in one write. pika still owns the
connection, the handshake, the channel and the confirms.

Every byte is the same as pika's encoder produces (tests/test_amqp_frames.py compares
them on generated messages): properties in the order and with the flags of
``BasicProperties.encode``, header values as AMQP long strings (``S``), bodies split into
frames of at most ``frame_max - 8`` bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache

from ..base import SendResult

__all__ = [
    "FrameTooLarge",
    "batch_frames",
    "body_frames",
    "encode_properties",
    "header_frame",
    "publish_frame",
]

FRAME_END = b"\xce"
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_HEADER_HEAD = struct.Struct(">BHIHHQ")  # type, channel, size, class 60, weight 0, body size
_BASIC_CLASS = 60
_LONGSTR = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">Q")

# BasicProperties flags (AMQP 0-9-1, the order pika encodes them in).
_CONTENT_TYPE = 1 << 15
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_CORRELATION_ID = 1 << 10
_MESSAGE_ID = 1 << 7
_TIMESTAMP_FLAG = 1 << 6
_TYPE = 1 << 5
_APP_ID = 1 << 3


class FrameTooLarge(ValueError):
    """A value does not fit its AMQP field (a short string over 255 bytes)."""


def _shortstr(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise FrameTooLarge(f"{text[:40]!r}... is {len(data)} bytes; AMQP short strings hold 255")
    return bytes((len(data),)) + data


@lru_cache(maxsize=1024)
def _table_key(name: str) -> bytes:
    """A header name as a table key followed by the long-string type tag (cached: outboxer's
    header names repeat in every message)."""
    return _shortstr(name) + b"S"


def encode_table(table: Mapping[str, str]) -> bytes:
    """An AMQP field table of string values (each a long string, ``S``)."""
    pieces = []
    for name, value in table.items():
        data = value.encode()
        pieces.append(_table_key(name))
        pieces.append(_LONGSTR.pack(len(data)))
        pieces.append(data)
    encoded = b"".join(pieces)
    return _LONGSTR.pack(len(encoded)) + encoded


def encode_properties(
    *,
    content_type: str | None,
    headers: Mapping[str, str],
    correlation_id: str | None,
    message_id: str,
    timestamp: int,
    type_: str,
    app_id: str = "outboxer",
) -> bytes:
    """The properties of a persistent message, as ``BasicProperties.encode`` joins them:
    the flag word, then content type, headers, delivery mode 2, correlation id, message
    id, timestamp, type and app id. Raises :class:`FrameTooLarge` for an overlong short
    string and :class:`struct.error` for a timestamp before 1970."""
    flags = _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP_FLAG | _TYPE | _APP_ID
    pieces = [b""]
    if content_type is not None:
        flags |= _CONTENT_TYPE
        pieces.append(_shortstr(content_type))
    pieces.append(encode_table(headers))
    pieces.append(b"\x02")
    if correlation_id is not None:
        flags |= _CORRELATION_ID
        pieces.append(_shortstr(correlation_id))
    pieces.append(_shortstr(message_id))
    pieces.append(_TIMESTAMP.pack(timestamp))
    pieces.append(_shortstr(type_))
    pieces.append(_shortstr(app_id))
    pieces[0] = struct.pack(">H", flags)
    return b"".join(pieces)


def publish_frame(channel: int, exchange: str, routing_key: str, mandatory: bool = True) -> bytes:
    """The method frame of ``basic.publish`` (ticket 0, never immediate)."""
    payload = b"".join(
        (
            struct.pack(">HHH", _BASIC_CLASS, 40, 0),
            _shortstr(exchange),
            _shortstr(routing_key),
            b"\x01" if mandatory else b"\x00",
        )
    )
    return _FRAME_HEAD.pack(1, channel, len(payload)) + payload + FRAME_END


def header_frame(channel: int, properties: bytes, body_size: int) -> bytes:
    """The content header frame of a message with these encoded ``properties``."""
    return (
        _HEADER_HEAD.pack(2, channel, 12 + len(properties), _BASIC_CLASS, 0, body_size)
        + properties
        + FRAME_END
    )


def body_frames(channel: int, body: bytes, max_length: int) -> list[bytes]:
    """The body frames of a message, ``max_length`` (``frame_max - 8``) bytes at most each;
    none for an empty body."""
    pack = _FRAME_HEAD.pack
    if len(body) <= max_length:
        return [pack(3, channel, len(body)) + body + FRAME_END] if body else []
    return [
        pack(3, channel, len(chunk)) + chunk + FRAME_END
        for chunk in (body[i : i + max_length] for i in range(0, len(body), max_length))
    ]


def batch_frames(
    outgoing: Sequence[tuple[int, str, str, bytes, bytes, str]],
    refused: Mapping[str, SendResult],
    results: list[SendResult | None],
    tag_index: list[int],
    channel: int,
    frame_max: int,
    max_body: int,
) -> tuple[bytes, int]:
    """A batch's frames, ready for one socket write, and how many frames they are.

    ``outgoing``: (index, exchange, routing key, body, encoded properties, message id) per
    message. A message for a ``refused`` exchange, or whose header frame exceeds
    ``frame_max``, gets its result in ``results`` and no frames; every other message's
    index is appended to ``tag_index`` in publish order (its delivery tag's offset).
    """
    methods: dict[tuple[str, str], bytes] = {}
    frames: list[bytes] = []
    count = 0
    body_head = _FRAME_HEAD.pack
    for index, exchange, routing_key, body, properties, _id in outgoing:
        if refused and exchange in refused:
            results[index] = refused[exchange]
            continue
        method = methods.get((exchange, routing_key))
        if method is None:
            method = methods[exchange, routing_key] = publish_frame(channel, exchange, routing_key)
        header = header_frame(channel, properties, len(body))
        if len(header) > frame_max:
            results[index] = SendResult.rejected(
                "message_too_large",
                f"the message's properties and headers are {len(header)} bytes; AMQP "
                f"carries them in one frame of at most {frame_max} bytes",
            )
            continue
        frames.append(method)
        frames.append(header)
        if 0 < len(body) <= max_body:
            frames.append(body_head(3, channel, len(body)) + body + FRAME_END)
            count += 3
        else:
            bodies = body_frames(channel, body, max_body or frame_max - 8)
            frames.extend(bodies)
            count += 2 + len(bodies)
        tag_index.append(index)
    return b"".join(frames), count
