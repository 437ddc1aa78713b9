"""Envelope text: what ``publish()`` accepts, every consumer accepts.

A consumer dead-letters an envelope whose type, key or correlation id holds a control
character (``malformed_envelope``, docs/wire-format.md). ``publish()`` took such a key
anyway, so the message was committed, relayed, and dead-lettered by every consumer. And
the consumer's check was ``str.isprintable()``, which also refuses text that is no control
at all: a no-break space, a soft hyphen, the zero-width joiner inside an emoji
("👩‍💻"), a right-to-left mark. Such a key went out and was dead-lettered everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire
from outboxer.errors import MessageError
from outboxer.ids import uuid7
from outboxer.message import Envelope

from .relaying import SessionFactory, Target, rabbit

__all__ = ["rabbit"]

CONTROLS = ["\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9f"]  # NUL: test_relay_review_encoding.py

# Text that is no control character: what str.isprintable() refuses besides controls.
UNICODE_TEXT = [
    "woman-technologist-👩\u200d💻",  # zero-width joiner (Cf)
    "rue\u00a0de\u00a0la\u00a0Paix",  # no-break spaces (Zs)
    "Donau\u00addampf",  # soft hyphen (Cf)
    "\u200f\u05e9\u05dc\u05d5\u05dd",  # right-to-left mark (Cf), then Hebrew
    "line\u2028separator",  # Zl
]


@pytest.fixture
def sqlite_session(tmp_path: object) -> Iterator[SessionFactory]:
    engine = create_engine(f"sqlite:///{tmp_path}/app.sqlite")
    outboxer.create_all(engine)
    yield sessionmaker(engine, class_=outboxer.OutboxSession)
    engine.dispose()


@pytest.mark.parametrize("char", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
@pytest.mark.parametrize("field", ["key", "type", "correlation_id"])
def test_publish_refuses_text_every_consumer_would_dead_letter(
    sqlite_session: SessionFactory, field: str, char: str
) -> None:
    given = {"type": "test.t", "key": None, "correlation_id": None}
    given[field] = f"before{char}after"
    with pytest.raises(MessageError) as refused, sqlite_session.begin() as session:
        session.publish({"n": 1}, destination="orders", **given)  # type: ignore[arg-type]
    text = str(refused.value)
    assert field in text and "control character" in text and f"U+{ord(char):04X}" in text, text


@pytest.mark.parametrize("value", UNICODE_TEXT)
def test_unicode_text_that_is_no_control_is_published_and_decoded(
    sqlite_session: SessionFactory, value: str
) -> None:
    with sqlite_session.begin() as session:
        session.publish({"n": 1}, type=value, destination="d", key=value, correlation_id=value)
    envelope = Envelope(
        message_id=uuid7(),
        type=value,
        destination="d",
        payload=b'{"n": 1}',
        occurred_at=datetime.now(timezone.utc),
        key=value,
        correlation_id=value,
    )
    decoded = wire.decode(envelope.payload, wire.encode_headers(envelope), "d")
    assert (decoded.type, decoded.key, decoded.correlation_id) == (value, value, value)


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_such_text_crosses_rabbitmq_and_the_consumer_takes_it(
    Session: SessionFactory, rabbit: Target
) -> None:
    """Through the real relay and broker: every consumer decodes what was published."""
    with Session.begin() as session:
        for value in UNICODE_TEXT:
            session.publish(
                {"v": value}, type="test.unicode", destination=rabbit.destination, key=value
            )
    relay = outboxer.Relay(Session.kw["bind"], rabbit.transport)
    assert relay.run(once=True).sent == len(UNICODE_TEXT)
    deliveries = rabbit.collect(len(UNICODE_TEXT))
    keys = [wire.decode(d.body, d.headers, d.destination).key for d in deliveries]
    assert keys == UNICODE_TEXT
