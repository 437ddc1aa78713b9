"""The collector off (``outboxer_collector = False``): huge transactions with flat memory.

Messages go to the outbox table as they are published, in chunks, inside the innermost
transaction open at that moment, so the database keeps or drops them with it. What this
changes for per-key order is stated in docs/publishing.md and tested here.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer

from .models import Order, OrderPlaced
from .test_publish import stored_ids


class BulkSession(outboxer.OutboxSession):
    outboxer_collector = False
    outboxer_chunk_size = 100


def outbox_inserts(engine: Engine) -> list[str]:
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO outboxer_outbox"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    return statements


def test_collector_off_writes_messages_in_chunks_as_they_are_published(engine: Engine) -> None:
    inserts = outbox_inserts(engine)
    with BulkSession(engine) as session:
        ids = [session.publish(OrderPlaced(order_id=i)) for i in range(250)]
        assert len(inserts) == 2  # 200 written, 50 kept
        assert len(session.pending_messages()) == 50
        in_transaction = session.scalar(select(func.count()).select_from(outboxer.outbox))
        assert in_transaction == 200
        session.commit()
    assert len(inserts) == 3
    assert stored_ids(engine) == ids


def test_collector_off_savepoints_keep_or_drop_exactly_their_messages(engine: Engine) -> None:
    with BulkSession(engine) as session:
        outer = [session.publish(OrderPlaced(order_id=i)) for i in range(150)]  # 100 + 50 kept
        savepoint = session.begin_nested()  # writes the 50 outside the savepoint first
        for i in range(250):  # 200 written inside the savepoint, 50 kept
            session.publish(OrderPlaced(order_id=1000 + i))
        savepoint.rollback()
        with session.begin_nested():
            released = [session.publish(OrderPlaced(order_id=2000 + i)) for i in range(130)]
            with pytest.raises(ValueError), session.begin_nested():
                for i in range(120):
                    session.publish(OrderPlaced(order_id=3000 + i))
                raise ValueError("undo the inner savepoint")
        session.begin_nested()  # left open at commit
        last = [session.publish(OrderPlaced(order_id=4000 + i)) for i in range(101)]
        session.commit()
    assert stored_ids(engine) == outer + released + last


def test_collector_off_rollback_stores_nothing(engine: Engine) -> None:
    with BulkSession(engine) as session:
        session.add(Order(id=1))
        for i in range(350):
            session.publish(OrderPlaced(order_id=i))
        session.rollback()
    assert stored_ids(engine) == []


def test_collector_off_can_be_chosen_per_session(engine: Engine) -> None:
    inserts = outbox_inserts(engine)
    with outboxer.OutboxSession(engine) as session:
        session.outboxer_collector = False
        for i in range(600):
            session.publish(OrderPlaced(order_id=i))
        assert len(inserts) == 1  # the default chunk: 500 messages
        session.commit()
    assert len(stored_ids(engine)) == 600


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
async def test_async_collector_off_publishes_through_run_sync(engine: Engine, db_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from .services import async_url

    class AsyncBulk(outboxer.AsyncOutboxSession):
        sync_session_class = BulkSession

    async_engine = create_async_engine(async_url(db_url))
    try:
        async with AsyncBulk(async_engine) as session:
            with pytest.raises(outboxer.ConfigurationError, match="run_sync"):
                session.publish(OrderPlaced(order_id=1))

            def publish_many(sync_session: Any) -> list[Any]:
                return [sync_session.publish(OrderPlaced(order_id=i)) for i in range(250)]

            ids = await session.run_sync(publish_many)
            await session.commit()
    finally:
        await async_engine.dispose()
    assert stored_ids(engine) == ids


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_collector_off_publishes_60000_messages_in_one_transaction_with_flat_memory(
    engine: Engine,
) -> None:
    class Quiet(outboxer.OutboxSession):
        outboxer_collector = False

    with Quiet(engine) as session:
        for i in range(5_000):  # warm up: allocator pools, statement caches
            session.publish(OrderPlaced(order_id=i))
        before = rss_bytes()
        for i in range(55_000):
            session.publish(OrderPlaced(order_id=i))
        grown = rss_bytes() - before
        session.commit()
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(outboxer.outbox)) == 60_000
    # Kept in memory (the collector on), these 55,000 messages grow the process by about
    # 44 MB; written in chunks, by nothing measurable (0.0 MB on 2026-11-29).
    assert grown < 15 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_collector_off_keeps_commit_order_per_key_when_rows_are_locked_before_publishing(
    engine: Engine,
) -> None:
    """What holds: a transaction that takes its row locks (here: updates the order) before
    its first chunk is written gets outbox ids after every transaction that held those
    locks, so ids follow commit order for the key."""
    with engine.begin() as conn:
        conn.execute(Order.__table__.insert().values(id=1))
    Session = sessionmaker(engine, class_=BulkSession)
    first_locked, first_may_commit = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def transaction(name: str, wait: threading.Event | None) -> None:
        try:
            with Session.begin() as session:
                session.execute(update(Order).where(Order.id == 1).values(customer=name))
                if wait is None:
                    first_locked.set()
                for i in range(250):  # two chunks go out before the commit
                    session.publish(OrderPlaced(order_id=1, customer=name), key="order-1")
                    if wait is None and i == 200:
                        first_may_commit.wait(timeout=30)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    first = threading.Thread(target=transaction, args=("first", None))
    first.start()
    assert first_locked.wait(timeout=30)
    second = threading.Thread(target=transaction, args=("second", first_locked))
    second.start()  # blocks on the row lock until the first commits
    first_may_commit.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert not errors
    with engine.connect() as conn:
        customers = list(
            conn.scalars(select(outboxer.outbox.c.payload).order_by(outboxer.outbox.c.id))
        )
    names = [b'"first"' in payload for payload in customers]
    assert names == [True] * 250 + [False] * 250
