"""A relay limited to destinations (a consumer's own relay) keeps the order of each key.

Rows of one key may go to different destinations: a consumer's replay keeps the key of the
original message, and the service may publish messages with that key elsewhere. A relay
limited to some destinations must neither send another destination's row nor send one of
its own rows ahead of an earlier row of its key that another relay has yet to send.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport
from outboxer.transports import Subscription

SessionFactory = sessionmaker[outboxer.OutboxSession]


def publish(Session: SessionFactory, *rows: tuple[int, str, str | None]) -> None:
    """One transaction per row, in order: (number, destination, key)."""
    for n, destination, key in rows:
        with Session.begin() as session:
            session.publish({"n": n}, type="test.seq", destination=destination, key=key)


def sent(broker: MemoryBroker) -> list[tuple[str, int]]:
    return [(e.destination, json.loads(e.payload)["n"]) for e in broker.published]


def transport() -> tuple[MemoryBroker, MemoryTransport]:
    broker = MemoryBroker()
    made = MemoryTransport(broker)
    made.receiver(Subscription(queue="all", bindings=[("orders", "#"), ("billing", "#")]))
    return broker, made


def test_a_consumer_relay_waits_behind_an_earlier_row_of_its_key_for_another_destination(
    engine: Engine, Session: SessionFactory
) -> None:
    publish(
        Session,
        (1, "orders", "k"),
        (2, "billing", "k"),
        (3, "billing", "k"),
        (4, "billing", None),
        (5, "orders", "k"),
    )
    broker, carrier = transport()
    billing = outboxer.Relay(engine, carrier, destinations=["billing"])
    assert billing.run(once=True).sent == 1
    assert sent(broker) == [("billing", 4)]  # 2 and 3 wait behind 1
    orders = outboxer.Relay(engine, carrier, destinations=["orders"])
    assert orders.run(once=True).sent == 1  # 1; then 5 waits behind 2 and 3
    assert billing.run(once=True).sent == 2
    assert orders.run(once=True).sent == 1
    assert sent(broker) == [
        ("billing", 4),
        ("orders", 1),
        ("billing", 2),
        ("billing", 3),
        ("orders", 5),
    ]


def test_a_consumer_relay_never_takes_a_due_row_of_another_destination_as_a_late_head(
    engine: Engine, Session: SessionFactory
) -> None:
    """Row 1 (orders) backed off, so it comes after row 2 (billing) in due order; both are
    due. The billing relay finds row 1 blocking its key: it must leave it to another relay."""
    publish(Session, (1, "orders", "k"), (2, "billing", "k"))
    outbox = outboxer.outbox
    with engine.begin() as conn:
        when = conn.execute(
            select(outbox.c.available_at).where(outbox.c.destination == "billing")
        ).scalar_one()
        conn.execute(
            update(outbox)
            .where(outbox.c.destination == "billing")
            .values(available_at=when - timedelta(seconds=30))
        )
        conn.execute(
            update(outbox)
            .where(outbox.c.destination == "orders")
            .values(available_at=when - timedelta(seconds=10))
        )
    broker, carrier = transport()
    billing = outboxer.Relay(engine, carrier, destinations=["billing"])
    assert billing.run(once=True).sent == 0
    assert sent(broker) == []
    assert outboxer.Relay(engine, carrier).run(once=True).sent == 2
    assert sent(broker) == [("orders", 1), ("billing", 2)]


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_consumer_relays_take_no_share_of_the_keys_from_the_full_relays(
    engine: Engine,
) -> None:
    """Relays share the keys by counting the live relays. A consumer's relay would never
    claim the keys of a share, so the full relays leave it out of their count."""
    _, carrier = transport()
    full = [outboxer.Relay(engine, carrier) for _ in range(2)]
    limited = [outboxer.Relay(engine, carrier, destinations=["billing"]) for _ in range(2)]
    relays = [*full, *limited]
    try:
        for _ in range(2):  # the second round sees everyone registered
            for relay in relays:
                relay.liveness.check()
        assert sorted(r.liveness.share or (-1, 0) for r in full) == [(0, 2), (1, 2)]
        assert [r.liveness.share for r in limited] == [None, None]
        full[1].liveness.stop()
        full[0].liveness.check()
        assert full[0].liveness.share is None  # alone among the full relays: every key
    finally:
        for relay in relays:
            relay.liveness.stop()
