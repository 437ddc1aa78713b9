"""Outbox rows that outboxer did not write: the relay never stalls or dies on one.

The outbox is a table: rows may come from SQL of the application's own (a data
migration, a trigger, a hand-made fix). A row whose ``headers`` are not a JSON object
(not JSON at all, a JSON list, nested beyond the parser's depth) used to raise out of the
claim (``outboxer relay --once`` died; a running relay retried the claim forever), or
made the transport fail the whole batch as "unavailable", which holds every row of it
forever. So did values that are not text (``{"x-tenant": 5}``), which RabbitMQ's
encoder refuses with a TypeError for the whole batch. Such a row is dead-lettered with the
reason; the rows beside it are sent.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport
from outboxer.transports import Subscription

from .models import OrderPlaced
from .relaying import Target, outbox_count, payloads
from .test_relay import SessionFactory, dead_letters, outbox_rows, publish

BROKEN_HEADERS = {
    "not JSON": "{not json",
    "a JSON list": "[1, 2]",
    "a JSON string": '"x-tenant"',
    "nested too deep to parse": "[" * 100_000 + "]" * 100_000,
    "a number for a value": '{"x-tenant": 5}',
    "an object for a value": '{"x-tenant": {"id": [1]}}',
}


def insert_row(engine: Engine, key: str, **values: Any) -> None:
    now = datetime.now(timezone.utc)
    row = {
        "message_id": uuid.uuid4(),
        "message_type": "test.order_placed",
        "destination": "orders",
        "message_key": key,
        "payload": b'{"order_id": 9}',
        "headers": "{}",
        "occurred_at": now,
        "available_at": now,
        **values,
    }
    with engine.begin() as conn:
        conn.execute(insert(outboxer.outbox).values(**row))


@pytest.mark.parametrize("headers", list(BROKEN_HEADERS))
@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_row_with_broken_headers_is_dead_lettered_and_the_others_are_sent(
    engine: Engine, Session: SessionFactory, headers: str
) -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.receiver(Subscription(queue="billing", bindings=[("orders", "#")]))
    publish(Session, OrderPlaced(order_id=1))
    insert_row(engine, "1", headers=BROKEN_HEADERS[headers])  # same key, behind order 1
    publish(Session, OrderPlaced(order_id=1))
    publish(Session, OrderPlaced(order_id=2))
    stats = outboxer.Relay(engine, transport).run(once=True)
    assert (stats.sent, stats.dead_lettered) == (3, 1)
    assert outbox_rows(engine) == []
    [dead] = dead_letters(engine)
    assert dead["error_type"] == "malformed_row"
    assert "headers" in dead["error_message"] and "JSON object" in dead["error_message"]
    assert dead["payload"] == b'{"order_id": 9}'
    assert json.loads(dead["headers"])["outboxer-malformed-headers"] == BROKEN_HEADERS[headers]
    assert [json.loads(e.payload)["order_id"] for e in broker.published] == [1, 1, 2]


def test_a_row_with_a_header_value_that_is_not_text_does_not_hold_the_batch_on_a_broker(
    engine: Engine, Session: SessionFactory, target: Target
) -> None:
    """On RabbitMQ the encoder raised a TypeError for the whole batch: every row of it
    was "unavailable", sent again, and failed again, forever."""
    with Session.begin() as session:
        session.publish({"n": 1}, type="test.ok", destination=target.destination)
    insert_row(
        engine, "k", destination=target.destination, message_type="test.ok",
        headers='{"x-tenant": 5}', payload=b'{"n": 2}',
    )  # fmt: skip
    with Session.begin() as session:
        session.publish({"n": 3}, type="test.ok", destination=target.destination)
    stats = outboxer.Relay(engine, target.transport).run(once=True)
    assert (stats.sent, stats.dead_lettered) == (2, 1)
    [letter] = outboxer.DeadLetters(Session).list()
    assert (
        letter.error_type == "malformed_row"
        and "'x-tenant' is int, not text" in letter.error_message
    )
    assert sorted(p["n"] for p in payloads(target.collect(2))) == [1, 3]
    assert outbox_count(engine) == 0


@pytest.mark.parametrize(
    ("column", "value"),
    [("message_key", "a\tb"), ("message_type", "orders\nplaced"), ("correlation_id", "c\x1bd")],
)
@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_row_with_a_control_character_in_envelope_text_is_a_replayable_relay_dead_letter(
    engine: Engine, column: str, value: str
) -> None:
    """A row an older outboxer (or other SQL) wrote with a control character in its key,
    type or correlation id: every consumer dead-letters it as malformed_envelope, without
    its message id, so that letter could never be replayed. The relay keeps it instead, as
    a relay dead letter with its envelope."""
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.receiver(Subscription(queue="billing", bindings=[("orders", "#")]))
    insert_row(engine, "k", **{column: value})
    stats = outboxer.Relay(engine, transport).run(once=True)
    assert (stats.sent, stats.dead_lettered) == (0, 1)
    assert broker.published == []
    [dead] = dead_letters(engine)
    assert dead["error_type"] == "invalid_message"
    assert dead["message_id"] is not None and dead[column] == value
    assert "control character" in dead["error_message"]
