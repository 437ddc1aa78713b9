"""AsyncOutboxSession: the same storage rules as the sync session, on asyncio drivers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

import outboxer

from .models import Order, OrderPlaced
from .services import async_url
from .test_publish import stored_ids


@pytest.fixture
async def async_engine(engine: Engine, db_url: str) -> AsyncIterator[AsyncEngine]:
    aengine = create_async_engine(async_url(db_url))
    yield aengine
    await aengine.dispose()


@pytest.fixture
def AsyncSession(async_engine: AsyncEngine) -> async_sessionmaker[outboxer.AsyncOutboxSession]:
    return async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession)


async def test_async_commit_stores_and_rollback_drops(
    engine: Engine, AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession]
) -> None:
    async with AsyncSession.begin() as session:
        session.add(Order(id=1))
        kept = session.publish(OrderPlaced(order_id=1))  # no await: publish does no I/O
    with pytest.raises(RuntimeError):
        async with AsyncSession.begin() as session:
            session.add(Order(id=2))
            session.publish(OrderPlaced(order_id=2))
            raise RuntimeError("boom")
    assert stored_ids(engine) == [kept]


async def test_async_rolled_back_savepoint_drops_only_its_messages(
    engine: Engine, AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession]
) -> None:
    async with AsyncSession.begin() as session:
        first = session.publish(OrderPlaced(order_id=1))
        savepoint = await session.begin_nested()
        session.publish(OrderPlaced(order_id=2))
        await savepoint.rollback()
        async with session.begin_nested():
            inner = session.publish(OrderPlaced(order_id=3))
        last = session.publish(OrderPlaced(order_id=4))
    assert stored_ids(engine) == [first, inner, last]


async def test_async_session_closed_without_commit_stores_nothing(
    engine: Engine, AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession]
) -> None:
    session = AsyncSession()
    session.publish(OrderPlaced(order_id=1))
    await session.close()
    assert stored_ids(engine) == []


async def test_async_publish_errors_fail_in_the_caller(
    engine: Engine, AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession]
) -> None:
    async with AsyncSession() as session:
        with pytest.raises(outboxer.SerializationError, match="order_id"):
            session.publish(OrderPlaced(order_id="x"))  # type: ignore[arg-type]
        await session.commit()
    assert stored_ids(engine) == []


async def test_core_publish_on_an_async_connection_through_run_sync(
    engine: Engine, async_engine: AsyncEngine
) -> None:
    async with async_engine.begin() as conn:
        kept = await conn.run_sync(outboxer.publish, OrderPlaced(order_id=1))
    async with async_engine.connect() as conn:
        with pytest.raises(outboxer.ConfigurationError, match="run_sync"):
            outboxer.publish(conn, OrderPlaced(order_id=2))  # type: ignore[arg-type]
    assert stored_ids(engine) == [kept]


async def test_async_context_manager_exit_with_open_savepoints_stores_every_message(
    engine: Engine, AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession]
) -> None:
    async with AsyncSession.begin() as session:
        session.add(Order(id=1))
        outer = session.publish(OrderPlaced(order_id=1))
        await session.begin_nested()  # left open
        inside = session.publish(OrderPlaced(order_id=2))
        await session.begin_nested()  # left open
        deepest = session.publish(OrderPlaced(order_id=3))
    assert stored_ids(engine) == [outer, inside, deepest]


async def test_async_explicit_commit_with_an_open_savepoint_stores_every_message(
    engine: Engine, AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession]
) -> None:
    async with AsyncSession() as session:
        outer = session.publish(OrderPlaced(order_id=1))
        savepoint = await session.begin_nested()
        inside = session.publish(OrderPlaced(order_id=2))
        await session.begin_nested()
        deepest = session.publish(OrderPlaced(order_id=3))
        await savepoint.commit()  # releases the inner one too
        await session.commit()
    assert stored_ids(engine) == [outer, inside, deepest]
