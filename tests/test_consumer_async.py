"""Async handlers with AsyncOutboxSession: the same inbox rules as sync ones."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire
from outboxer.testing import MemoryBroker, MemoryTransport

from .models import Effect, OrderPlaced
from .services import async_url


@pytest.fixture
async def async_engine(engine: Engine, db_url: str) -> AsyncIterator[AsyncEngine]:
    aengine = create_async_engine(async_url(db_url))
    yield aengine
    await aengine.dispose()


@pytest.fixture
def AsyncSession(async_engine: AsyncEngine) -> async_sessionmaker[outboxer.AsyncOutboxSession]:
    return async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession)


def effects(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(Effect.handler)).scalars())


async def test_async_handlers_retry_alone_and_skip_duplicates(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    consumer = outboxer.Consumer(
        AsyncSession,
        name="async-billing",
        retry=outboxer.Retry(max_attempts=3, initial_delay=0.05, max_delay=0.05),
    )
    calls: Counter[str] = Counter()

    @consumer.handler(OrderPlaced)
    async def reserve(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
        calls["reserve"] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        session.publish({"order_id": event.order_id}, type="test.reserved", destination="stock")

    @consumer.handler(OrderPlaced)
    async def charge(
        event: OrderPlaced, session: outboxer.AsyncOutboxSession, context: outboxer.Context
    ) -> None:
        calls["charge"] += 1
        await asyncio.sleep(0)
        if context.attempt == 1:
            raise ConnectionError("gateway down")
        session.add(Effect(handler="charge", message_key=str(event.order_id)))

    transport.receiver(consumer.subscription())
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1))
    relay = outboxer.Relay(engine, transport)
    for _ in range(100):
        relay.run(once=True)
        await consumer.run_async(transport, once=True, idle_timeout=0.05)
        if calls["charge"] == 2:
            break
        await asyncio.sleep(0.02)
    relay.run(once=True)
    assert calls == {"reserve": 1, "charge": 2}
    assert effects(engine) == {"reserve": 1, "charge": 1}
    reserved = broker.messages(type="test.reserved")
    assert len(reserved) == 1 and reserved[0].causation_id is not None

    placed = broker.messages(type="test.order_placed")[0]
    report = await consumer.process_async(
        placed.payload, wire.encode_headers(placed), destination="orders"
    )
    assert report.outcomes == {"reserve": "duplicate", "charge": "duplicate"}


async def test_async_handler_that_always_fails_is_dead_lettered(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    consumer = outboxer.Consumer(
        AsyncSession, name="async-dl", retry=outboxer.Retry(max_attempts=1)
    )

    @consumer.handler(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        raise ValueError("nope")

    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.receiver(consumer.subscription())
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=3))
    outboxer.Relay(engine, transport).run(once=True)
    stats = await consumer.run_async(transport, once=True, idle_timeout=0.05)
    assert stats.dead_lettered == 1
    [letter] = outboxer.DeadLetters(Session).list()
    assert (letter.origin, letter.consumer, letter.handler, letter.error_type) == (
        "handler",
        "async-dl",
        "charge",
        "ValueError",
    )


async def test_an_async_adapter_takes_plain_messages_once_and_its_replay_comes_back(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    consumer = outboxer.Consumer(AsyncSession, name="async-webhooks")
    broken = {"yes": True}

    @consumer.adapter(
        "test.webhook", queue="async-hooks", message_id=outboxer.from_header("x-webhook-id")
    )
    async def hook(event: dict[str, object], session: outboxer.AsyncOutboxSession) -> None:
        if event["n"] == 2 and broken["yes"]:
            raise ValueError("not yet")
        session.add(Effect(handler="hook", message_key=str(event["n"])))

    transport.receiver(consumer.subscription())
    for n, webhook in ((1, "w1"), (1, "w1"), (2, "w2")):
        broker.inject("async-hooks", f'{{"n": {n}}}'.encode(), {"x-webhook-id": webhook})
    stats = await consumer.run_async(transport, once=True, idle_timeout=0.05)
    assert (stats.processed, stats.duplicates, stats.dead_lettered) == (1, 1, 1)
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    assert letter.handler == "hook"
    broken["yes"] = False
    dead.replay(letter.id)
    await asyncio.to_thread(outboxer.Relay(engine, transport).run, once=True)
    await consumer.run_async(transport, once=True, idle_timeout=0.05)
    assert effects(engine) == {"hook": 2}


async def test_an_async_channel_raising_cancelled_error_of_its_own_is_a_failure(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    """A channel whose client library raised ``CancelledError`` (its own timeout), the task
    not being cancelled: dead-lettered like any failing channel. Before: taken for a
    shutdown, the delivery went back, and handler and channel ran again forever."""
    calls: Counter[str] = Counter()

    async def pager(failure: outboxer.Failure) -> None:
        calls["channel"] += 1
        raise asyncio.CancelledError("the pager's client timed out")

    consumer = outboxer.Consumer(
        AsyncSession, name="async-cancel", retry=outboxer.Retry(max_attempts=1), on_failure=pager
    )

    @consumer.handler(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        calls["handler"] += 1
        raise ValueError("nope")

    report = await consumer.process_async(ORDER_1, one_order_headers(), destination="orders")
    assert report.outcomes == {"charge": "dead_lettered"}
    assert calls == {"handler": 1, "channel": 1}
    [letter] = outboxer.DeadLetters(Session).list()
    assert "error channel pager raised" in letter.error_message


def one_order_headers() -> dict[str, str]:
    """The headers of an OrderPlaced message for order 1 (its body: ``ORDER_1``)."""
    return wire.encode_headers(
        outboxer.Envelope(
            message_id=outboxer.uuid7(),
            type="test.order_placed",
            destination="orders",
            payload=ORDER_1,
            occurred_at=datetime.now(timezone.utc),
        )
    )


ORDER_1 = b'{"order_id": 1}'


def _logged(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)  # the coroutine, for the consumer to await

    return wrapper


async def test_an_async_handler_behind_a_plain_decorator_runs_on_an_async_consumer(
    engine: Engine,
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    """Before 2026-11-30 such a handler was refused on an async consumer ("a plain def")."""
    consumer = outboxer.Consumer(AsyncSession, name="async-logged")

    async def reserve(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    consumer.handler(OrderPlaced, name="reserve")(_logged(reserve))
    report = await consumer.process_async(ORDER_1, one_order_headers(), destination="orders")
    assert report.outcomes == {"reserve": "processed"}
    assert effects(engine) == {"reserve": 1}
