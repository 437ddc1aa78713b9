"""Whatever commits, its messages commit with it: every legal way a transaction can end.

Context managers, explicit ``commit()``, SAVEPOINTs left open, released or rolled back in
any order, sessions joined to an external connection (each ``join_transaction_mode``), and
Core connections. The domain rows are checked beside the outbox: a message may never be
missing from a transaction whose rows committed, nor present in one whose rows did not.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

import outboxer

from .models import Order, OrderPlaced
from .test_publish import stored, stored_ids

SessionFactory = sessionmaker[outboxer.OutboxSession]


def order_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(select(Order.id).order_by(Order.id)))


def test_context_manager_exit_with_an_open_savepoint_stores_the_outer_messages(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        session.add(Order(id=1))
        outer = session.publish(OrderPlaced(order_id=1))
        session.begin_nested()  # a helper opened a savepoint and returned
        session.add(Order(id=2))
    assert order_ids(engine) == [1, 2]
    assert stored_ids(engine) == [outer]


def test_context_manager_exit_stores_messages_published_inside_open_savepoints(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        session.add(Order(id=1))
        outer = session.publish(OrderPlaced(order_id=1))
        session.begin_nested()
        session.add(Order(id=2))
        inside = session.publish(OrderPlaced(order_id=2))
        session.begin_nested()
        session.add(Order(id=3))
        deepest = session.publish(OrderPlaced(order_id=3))
    assert order_ids(engine) == [1, 2, 3]
    assert stored_ids(engine) == [outer, inside, deepest]


def test_explicit_commit_with_open_savepoints_stores_every_message(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session() as session:
        first = session.publish(OrderPlaced(order_id=1))
        session.begin_nested()
        session.add(Order(id=2))
        second = session.publish(OrderPlaced(order_id=2))
        session.begin_nested()
        third = session.publish(OrderPlaced(order_id=3))
        session.commit()
    assert order_ids(engine) == [2]
    assert stored_ids(engine) == [first, second, third]


def test_releasing_an_outer_savepoint_with_an_inner_one_open_keeps_both_for_the_commit(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        outer_savepoint = session.begin_nested()
        first = session.publish(OrderPlaced(order_id=1))
        session.begin_nested()  # left open; releasing the outer one releases it too
        second = session.publish(OrderPlaced(order_id=2))
        outer_savepoint.commit()
        third = session.publish(OrderPlaced(order_id=3))
    assert stored_ids(engine) == [first, second, third]


def test_savepoint_context_manager_exit_with_an_inner_savepoint_open_then_rollback_of_outer(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        kept = session.publish(OrderPlaced(order_id=1))
        dropped_scope = session.begin_nested()
        with session.begin_nested():
            session.publish(OrderPlaced(order_id=2))
            session.begin_nested()  # left open inside the released savepoint
            session.publish(OrderPlaced(order_id=3))
        dropped_scope.rollback()
    assert stored_ids(engine) == [kept]


def test_a_failed_savepoint_release_drops_only_its_messages_and_the_outer_transaction_commits(
    engine: Engine, Session: SessionFactory
) -> None:
    with Session.begin() as session:
        session.add(Order(id=1))
        kept = session.publish(OrderPlaced(order_id=1))
        with pytest.raises(IntegrityError), session.begin_nested():
            session.publish(OrderPlaced(order_id=1, customer="twice"))
            session.add(Order(id=1))  # fails when the savepoint is released
        after = session.publish(OrderPlaced(order_id=2))
    assert order_ids(engine) == [1]
    assert stored_ids(engine) == [kept, after]


def test_commit_with_many_open_savepoints_stores_every_message(
    engine: Engine, Session: SessionFactory
) -> None:
    expected = []
    with Session.begin() as session:
        for i in range(1, 41):
            session.begin_nested()
            expected.append(session.publish(OrderPlaced(order_id=i)))
    assert stored_ids(engine) == expected


# Sessions joined to an external connection --------------------------------------------

JOIN_MODES = ["conditional_savepoint", "create_savepoint", "rollback_only", "control_fully"]


@pytest.mark.parametrize("mode", JOIN_MODES)
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_session_on_an_external_transaction_follows_that_transaction(
    engine: Engine, mode: Any, outcome: str
) -> None:
    published: list[uuid.UUID] = []
    with engine.connect() as conn:
        conn.begin()
        session = outboxer.OutboxSession(bind=conn, join_transaction_mode=mode)
        session.add(Order(id=1))
        published.append(session.publish(OrderPlaced(order_id=1)))
        session.begin_nested()  # left open: the session's commit releases it
        published.append(session.publish(OrderPlaced(order_id=2)))
        session.commit()
        session.close()
        if conn.in_transaction():  # control_fully: the session's commit ended it
            getattr(conn, outcome)()
        committed = mode == "control_fully" or outcome == "commit"
    # The rule itself: the messages are stored exactly when the domain rows are.
    assert stored_ids(engine) == (published if order_ids(engine) else [])
    if not (engine.dialect.name == "sqlite" and mode == "create_savepoint"):
        # (pysqlite emits no BEGIN for the external transaction, so its RELEASE of the
        # session's SAVEPOINT commits: SQLAlchemy documents this driver quirk.)
        assert order_ids(engine) == ([1] if committed else [])


@pytest.mark.parametrize("mode", JOIN_MODES)
def test_session_inside_an_external_savepoint_follows_the_external_transaction(
    engine: Engine, mode: Any
) -> None:
    with engine.connect() as conn:
        conn.begin()
        kept = outboxer.publish(conn, OrderPlaced(order_id=1))
        external_savepoint = conn.begin_nested()
        with outboxer.OutboxSession(bind=conn, join_transaction_mode=mode) as session:
            session.add(Order(id=2))
            session.publish(OrderPlaced(order_id=2))
            session.commit()
        if external_savepoint.is_active:
            external_savepoint.rollback()  # drops what the session stored inside it
        conn.commit()
    assert order_ids(engine) == ([2] if mode == "control_fully" else [])
    if mode == "control_fully":  # the session took the savepoint over and released it
        assert len(stored_ids(engine)) == 2
    else:
        assert stored_ids(engine) == [kept]


# Core ---------------------------------------------------------------------------------


def test_core_commit_with_an_open_savepoint_stores_the_messages_inside_it(engine: Engine) -> None:
    with engine.begin() as conn:
        first = outboxer.publish(conn, OrderPlaced(order_id=1))
        conn.begin_nested()
        second = outboxer.publish(conn, OrderPlaced(order_id=2))
    assert stored_ids(engine) == [first, second]


def test_messages_published_by_a_before_commit_listener_commit_with_the_transaction(
    engine: Engine,
) -> None:
    """Domain-event collectors publish from their own before_commit listener, which runs
    after outboxer's (listeners run in registration order)."""

    class CollectingSession(outboxer.OutboxSession):
        pass

    def publish_collected(session: Any) -> None:
        events = session.info.pop("domain_events", [])
        for event_ in events:
            session.publish(event_)

    def record(session: outboxer.OutboxSession, order_id: int) -> None:
        session.add(Order(id=order_id))
        session.info.setdefault("domain_events", []).append(OrderPlaced(order_id=order_id))

    event.listen(CollectingSession, "before_commit", publish_collected)
    Session = sessionmaker(engine, class_=CollectingSession)
    with Session.begin() as session:
        direct = session.publish(OrderPlaced(order_id=99))
        record(session, 1)
    with Session.begin() as session:
        record(session, 2)
        session.begin_nested()  # left open: the write happens later in this commit
        record(session, 3)
    rows = [json.loads(r["payload"])["order_id"] for r in stored(engine)]
    assert stored_ids(engine)[0] == direct
    assert rows == [99, 1, 2, 3]


def test_messages_published_by_a_before_flush_listener_commit_with_the_transaction(
    engine: Engine,
) -> None:
    """Another common collector: events of new entities, published as they are flushed
    (the commit's own flush included)."""

    class FlushPublishingSession(outboxer.OutboxSession):
        pass

    def publish_new_orders(session: Any, flush_context: Any, instances: Any) -> None:
        for order in [o for o in session.new if isinstance(o, Order)]:
            session.publish(OrderPlaced(order_id=order.id))

    event.listen(FlushPublishingSession, "before_flush", publish_new_orders)
    Session = sessionmaker(engine, class_=FlushPublishingSession)
    with Session.begin() as session:
        session.add(Order(id=1))
    with Session.begin() as session:
        session.add(Order(id=2))
        session.begin_nested()  # flushes Order 2; left open
        session.add(Order(id=3))
    with Session() as session:
        session.add(Order(id=4))
        session.commit()
    rows = [json.loads(r["payload"])["order_id"] for r in stored(engine)]
    assert rows == [1, 2, 3, 4]
    assert order_ids(engine) == [1, 2, 3, 4]


class Interrupted(BaseException):
    """Stands for a KeyboardInterrupt arriving while the outbox is written."""


def commit_again(session: outboxer.OutboxSession) -> None:
    """A caller that caught the commit's error and commits again (legal, if unusual):
    it must fail again, or store everything; never commit the rows without the messages."""
    try:
        session.commit()
    except (Exception, Interrupted):
        session.rollback()


def test_a_commit_interrupted_at_the_outbox_insert_then_retried_loses_nothing(
    engine: Engine, Session: SessionFactory
) -> None:
    armed = [True]

    def interrupt_once(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed[0] and statement.startswith("INSERT INTO outboxer_outbox"):
            armed[0] = False
            raise Interrupted

    event.listen(engine, "before_cursor_execute", interrupt_once)
    with Session() as session:
        session.add(Order(id=1))
        published = [session.publish(OrderPlaced(order_id=i)) for i in range(3)]
        with pytest.raises(Interrupted):
            session.commit()
        commit_again(session)
    assert stored_ids(engine) == (published if order_ids(engine) else [])


def test_a_commit_whose_outbox_insert_failed_then_retried_loses_nothing(
    engine: Engine, Session: SessionFactory
) -> None:
    """A statement error leaves the transaction open on MariaDB and SQLite, so the caller
    may commit again; here the INSERT fails once before it reaches the database."""
    armed = [True]

    def fail_once(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed[0] and statement.startswith("INSERT INTO outboxer_outbox"):
            armed[0] = False
            raise RuntimeError("the INSERT failed")

    event.listen(engine, "before_cursor_execute", fail_once)
    with Session() as session:
        session.add(Order(id=1))
        published = [session.publish(OrderPlaced(order_id=i)) for i in range(3)]
        with pytest.raises(RuntimeError, match="INSERT failed"):
            session.commit()
        commit_again(session)
    assert stored_ids(engine) == (published if order_ids(engine) else [])
