"""The collector switched off mid-transaction, and the recorder with the collector off.

A message is stored if and only if its (sub)transaction commits, whatever the moment the
collector is switched; ``outboxer.testing.Published`` records exactly what committed
transactions stored, collector on or off, savepoints respected.
"""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.engine import Engine

import outboxer
from outboxer.testing import Published

from .models import OrderPlaced
from .test_publish import stored_ids


class BulkSession(outboxer.OutboxSession):
    outboxer_collector = False
    outboxer_chunk_size = 100


def recorded_ids(published: Published) -> list[uuid.UUID]:
    return [e.message_id for e in published.envelopes]


# The collector switched mid-transaction ---------------------------------------------------


def test_switching_the_collector_off_inside_a_savepoint_keeps_the_messages_outside_it(
    engine: Engine,
) -> None:
    with outboxer.OutboxSession(engine) as session:
        outer = session.publish(OrderPlaced(order_id=1))  # collector on: kept in memory
        savepoint = session.begin_nested()
        session.outboxer_collector = False  # the bulk part starts here
        for n in range(499):  # the 500th kept message: a chunk is written
            session.publish(OrderPlaced(order_id=1000 + n))
        savepoint.rollback()  # the bulk part is abandoned
        session.commit()
    assert stored_ids(engine) == [outer]


def test_switching_the_collector_off_in_a_released_savepoint_stores_everything(
    engine: Engine,
) -> None:
    with outboxer.OutboxSession(engine) as session:
        outer = [session.publish(OrderPlaced(order_id=n)) for n in range(3)]
        with session.begin_nested():
            session.outboxer_chunk_size = 100
            session.outboxer_collector = False
            inner = [session.publish(OrderPlaced(order_id=1000 + n)) for n in range(250)]
        after = [session.publish(OrderPlaced(order_id=2000 + n)) for n in range(150)]
        session.commit()
    assert sorted(stored_ids(engine)) == sorted(outer + inner + after)


def test_switching_the_collector_off_in_a_savepoint_keeps_the_publish_order(
    engine: Engine,
) -> None:
    """A key's messages get outbox ids (the relay's order) in publish order. Found by
    attacking the first fix: it wrote the savepoint's chunks first and the message of the
    transaction around it at the commit, after them (ids inner0, inner1, inner2, first)."""
    with outboxer.OutboxSession(engine) as session:
        published = [session.publish(OrderPlaced(order_id=7))]
        with session.begin_nested():
            session.outboxer_chunk_size = 1
            session.outboxer_collector = False
            published += [session.publish(OrderPlaced(order_id=7)) for _ in range(3)]
        published += [session.publish(OrderPlaced(order_id=7)) for _ in range(2)]
        session.commit()
    assert stored_ids(engine) == published


def test_switching_the_collector_off_two_savepoints_deep_drops_only_the_rolled_back_ones(
    engine: Engine,
) -> None:
    with outboxer.OutboxSession(engine) as session:
        session.outboxer_chunk_size = 100
        outer = session.publish(OrderPlaced(order_id=1))
        with session.begin_nested():
            middle = session.publish(OrderPlaced(order_id=2))
            inner = session.begin_nested()
            session.outboxer_collector = False
            for n in range(150):
                session.publish(OrderPlaced(order_id=1000 + n))
            inner.rollback()
            kept = [session.publish(OrderPlaced(order_id=3000 + n)) for n in range(120)]
        session.commit()
    assert sorted(stored_ids(engine)) == sorted([outer, middle, *kept])


def test_switching_the_collector_back_on_inside_a_savepoint_still_drops_its_messages(
    engine: Engine,
) -> None:
    with BulkSession(engine) as session:
        outer = session.publish(OrderPlaced(order_id=1))
        savepoint = session.begin_nested()
        for n in range(150):  # 100 written inside the savepoint, 50 kept
            session.publish(OrderPlaced(order_id=1000 + n))
        session.outboxer_collector = True
        session.publish(OrderPlaced(order_id=5000))
        savepoint.rollback()
        last = session.publish(OrderPlaced(order_id=2))
        session.commit()
    assert stored_ids(engine) == [outer, last]


# The recorder, collector on or off ----------------------------------------------------------


def test_the_recorder_sees_every_message_a_collector_off_commit_stored(engine: Engine) -> None:
    with Published() as published, BulkSession(engine) as session:
        ids = [session.publish(OrderPlaced(order_id=n)) for n in range(1200)]
        session.commit()
    assert stored_ids(engine) == ids
    assert recorded_ids(published) == ids


def test_the_recorder_respects_savepoints_with_the_collector_off(engine: Engine) -> None:
    with Published() as published, BulkSession(engine) as session:
        session.publish(OrderPlaced(order_id=1))
        with session.begin_nested():
            session.publish(OrderPlaced(order_id=2))
        dropped = session.begin_nested()
        for n in range(250):  # 200 written inside the savepoint, then dropped
            session.publish(OrderPlaced(order_id=1000 + n))
        dropped.rollback()
        session.commit()
    assert [e.key for e in published.envelopes] == ["1", "2"]
    assert recorded_ids(published) == stored_ids(engine)


def test_the_recorder_records_nothing_of_a_rolled_back_collector_off_transaction(
    engine: Engine,
) -> None:
    with Published() as published, BulkSession(engine) as session:
        for n in range(250):
            session.publish(OrderPlaced(order_id=n))
        session.rollback()
        kept = session.publish(OrderPlaced(order_id=7))
        session.commit()
    assert stored_ids(engine) == [kept]
    assert recorded_ids(published) == [kept]


def test_the_recorder_matches_the_outbox_when_the_collector_is_switched_mid_transaction(
    engine: Engine,
) -> None:
    with Published() as published, outboxer.OutboxSession(engine) as session:
        session.publish(OrderPlaced(order_id=1))
        savepoint = session.begin_nested()
        session.outboxer_collector = False
        for n in range(499):
            session.publish(OrderPlaced(order_id=1000 + n))
        savepoint.rollback()
        with session.begin_nested():
            for n in range(600):
                session.publish(OrderPlaced(order_id=2000 + n))
        session.commit()
    assert len(published.envelopes) == 601
    assert sorted(recorded_ids(published)) == sorted(stored_ids(engine))


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_the_recorder_records_each_commit_once_for_two_transactions_of_a_session(
    engine: Engine,
) -> None:
    with Published() as published, BulkSession(engine) as session:
        first = [session.publish(OrderPlaced(order_id=n)) for n in range(150)]
        session.commit()
        second = [session.publish(OrderPlaced(order_id=500 + n)) for n in range(30)]
        session.commit()
    assert recorded_ids(published) == first + second == stored_ids(engine)
