"""Outbox rows that outboxer did not write: the relay never stalls or dies on one.

The outbox is a table: rows may come from SQL of the application's own (a data
migration, a trigger, a hand-made fix). A row whose ``headers`` are not a JSON object
(not JSON at all, a JSON list, nested beyond the parser's depth) used to raise out of the
claim (``outboxer relay --once`` died; a running relay retried the claim forever), or
made the transport fail the whole batch as "unavailable", which holds every row of it
forever. Such a row is dead-lettered with the reason; the rows beside it are sent.
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
from .test_relay import SessionFactory, dead_letters, outbox_rows, publish

BROKEN_HEADERS = {
    "not JSON": "{not json",
    "a JSON list": "[1, 2]",
    "a JSON string": '"x-tenant"',
    "nested too deep to parse": "[" * 100_000 + "]" * 100_000,
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
    assert [json.loads(e.payload)["order_id"] for e in broker.published] == [1, 1, 2]
