"""outboxer's own ``basic.publish`` framing (outboxer.transports.rabbitmq.frames) is byte
for byte what pika's encoder produces, for generated messages."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pika import frame, spec

from outboxer import wire
from outboxer.message import Envelope
from outboxer.transports.base import SendResult
from outboxer.transports.rabbitmq.amqp import _prepare
from outboxer.transports.rabbitmq.frames import (
    FrameTooLarge,
    body_frames,
    encode_properties,
    header_frame,
    publish_frame,
)

short = st.text(max_size=60)
names = st.text(min_size=1, max_size=40)


def pika_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: spec.BasicProperties,
    max_body: int,
) -> bytes:
    """What pika's Connection._send_message writes for one message."""
    out = [
        frame.Method(
            channel, spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
        ).marshal(),
        frame.Header(channel, len(body), properties).marshal(),
    ]
    for start in range(0, len(body), max_body):
        out.append(frame.Body(channel, body[start : start + max_body]).marshal())
    return b"".join(out)


@settings(max_examples=200, deadline=None)
@given(
    channel=st.integers(1, 2047),
    exchange=short,
    routing_key=short,
    body=st.binary(max_size=300),
    max_body=st.integers(1, 200),
    content_type=st.none() | short,
    correlation_id=st.none() | short,
    message_id=short,
    timestamp=st.integers(0, 2**40),
    type_=short,
    headers=st.dictionaries(names, st.text(max_size=80), max_size=8),
)
def test_frames_match_pikas_encoder(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    max_body: int,
    content_type: str | None,
    correlation_id: str | None,
    message_id: str,
    timestamp: int,
    type_: str,
    headers: dict[str, str],
) -> None:
    properties = spec.BasicProperties(
        content_type=content_type,
        delivery_mode=2,
        message_id=message_id,
        type=type_,
        correlation_id=correlation_id,
        timestamp=timestamp,
        app_id="outboxer",
        headers=headers,
    )
    encoded = encode_properties(
        content_type=content_type,
        headers=headers,
        correlation_id=correlation_id,
        message_id=message_id,
        timestamp=timestamp,
        type_=type_,
    )
    ours = (
        publish_frame(channel, exchange, routing_key)
        + header_frame(channel, encoded, len(body))
        + b"".join(body_frames(channel, body, max_body))
    )
    assert ours == pika_frames(channel, exchange, routing_key, body, properties, max_body)
    decoded = spec.BasicProperties()
    decoded.decode(encoded)
    assert decoded.headers == headers and decoded.message_id == message_id


def test_prepared_message_matches_pikas_properties() -> None:
    """The properties _prepare encodes for an envelope are those the relay sent with pika."""
    envelope = Envelope(
        message_id=uuid.UUID("0190a5a0-0000-7000-8000-000000000001"),
        type="orders.placed",
        destination="orders",
        payload=b'{"n": 1}',
        occurred_at=datetime(2026, 11, 29, 10, 0, tzinfo=timezone.utc),
        key="k1",
        headers={"tenant": "acme"},
    )
    item = _prepare(0, envelope, 1 << 20, 1 << 16)
    assert not isinstance(item, SendResult)
    index, exchange, routing_key, body, encoded, message_id = item
    headers = wire.encode_headers(envelope)
    expected = spec.BasicProperties(
        content_type=headers.pop(wire.CONTENT_TYPE),
        delivery_mode=2,
        message_id=headers.pop(wire.MESSAGE_ID),
        type=headers.pop(wire.TYPE),
        correlation_id=headers.pop(wire.CORRELATION_ID),
        timestamp=int(envelope.occurred_at.timestamp()),
        app_id="outboxer",
        headers=headers,
    )
    assert (index, exchange, routing_key, body) == (0, "orders", "orders.placed", b'{"n": 1}')
    assert message_id == str(envelope.message_id)
    assert frame.Header(1, len(body), expected).marshal() == header_frame(1, encoded, len(body))


def test_overlong_short_strings_are_refused() -> None:
    with pytest.raises(FrameTooLarge):
        encode_properties(
            content_type=None,
            headers={"x" * 256: "v"},
            correlation_id=None,
            message_id="m",
            timestamp=0,
            type_="t",
        )
    with pytest.raises(FrameTooLarge):
        publish_frame(1, "é" * 128, "rk")
