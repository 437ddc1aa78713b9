"""Async consumers: error channels (before and instead of the dead letter, a raising one)
and handlers without a transaction, as for sync ones."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.testing import MemoryBroker, MemoryTransport

from .models import Effect, OrderPlaced
from .services import async_url
from .test_error_channels import PaymentFailed

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)

ONCE = outboxer.Retry(max_retries=0)


@pytest.fixture
async def async_engine(engine: Engine, db_url: str) -> AsyncIterator[AsyncEngine]:
    aengine = create_async_engine(async_url(db_url))
    yield aengine
    await aengine.dispose()


@pytest.fixture
def AsyncSession(async_engine: AsyncEngine) -> async_sessionmaker[outboxer.AsyncOutboxSession]:
    return async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession)


async def deliver(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    consumer: outboxer.Consumer,
    *events: object,
) -> None:
    transport = MemoryTransport(MemoryBroker())
    transport.receiver(consumer.subscription())
    with Session.begin() as session:
        for event in events:
            session.publish(event)
    relay = outboxer.Relay(engine, transport)
    for _ in range(5):  # the message, then what its handlers and channels published
        relay.run(once=True)
        await consumer.run_async(transport, once=True, idle_timeout=0.05)


def table(engine: Engine, column: object) -> list[object]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(column)).scalars())  # type: ignore[call-overload]


async def test_an_async_error_channel_publishes_a_compensation_before_the_dead_letter(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    failures: list[outboxer.Failure] = []
    released: list[int] = []

    async def compensate(failure: outboxer.Failure, session: outboxer.AsyncOutboxSession) -> None:
        failures.append(failure)
        session.add(Effect(handler="compensate", message_key=str(failure.event.order_id)))
        session.publish(PaymentFailed(order_id=failure.event.order_id, reason="declined"))

    consumer = outboxer.Consumer(AsyncSession, name="async-pay", retry=ONCE, on_failure=compensate)

    @consumer.handler(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        raise ConnectionError("declined")

    @consumer.handler(PaymentFailed)
    async def release(event: PaymentFailed) -> None:
        released.append(event.order_id)

    await deliver(engine, Session, consumer, OrderPlaced(order_id=1))
    assert [(f.handler, f.attempts, f.reason) for f in failures] == [("charge", 1, "exhausted")]
    assert released == [1]
    assert table(engine, Effect.handler) == ["compensate"]
    assert table(engine, outboxer.dead_letter.c.handler) == ["charge"]


async def test_an_async_error_channel_instead_of_the_dead_letter_and_a_raising_one(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    async def takes_over(failure: outboxer.Failure) -> None:
        pass

    async def broken(failure: outboxer.Failure) -> None:
        raise RuntimeError("pager down")

    consumer = outboxer.Consumer(AsyncSession, name="async-over", retry=ONCE)

    @consumer.handler(OrderPlaced, on_failure=outboxer.ErrorChannel(takes_over, dead_letter=False))
    async def charge(event: OrderPlaced) -> None:
        raise ConnectionError("declined")

    @consumer.handler(OrderPlaced, on_failure=broken)
    async def ship(event: OrderPlaced) -> None:
        raise ConnectionError("no carrier")

    await deliver(engine, Session, consumer, OrderPlaced(order_id=1))
    assert table(engine, outboxer.inbox.c.handler) == ["async-over:charge"]
    [letter] = outboxer.DeadLetters(Session).list()
    assert letter.handler == "ship"
    assert "error channel broken raised: RuntimeError: pager down" in letter.error_message


async def test_an_async_handler_without_a_transaction_runs_once(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    calls: list[bool] = []
    consumer = outboxer.Consumer(AsyncSession, name="async-mail")

    @consumer.handler(OrderPlaced, transactional=False)
    async def send_receipt(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
        calls.append(session.in_transaction())
        session.add(Effect(handler="send_receipt", message_key=str(event.order_id)))

    await deliver(engine, Session, consumer, OrderPlaced(order_id=1))
    message_id = table(engine, outboxer.inbox.c.message_id)[0]
    await deliver(engine, Session, consumer, OrderPlaced(order_id=1))  # another message
    with Session.begin() as session:  # and the first one again
        session.publish(OrderPlaced(order_id=1), message_id=message_id)  # type: ignore[arg-type]
    await deliver(engine, Session, consumer)
    assert calls == [False, False]
    assert table(engine, Effect.handler) == ["send_receipt", "send_receipt"]
    assert len(table(engine, outboxer.inbox.c.handler)) == 2


async def test_the_plain_default_channel_serves_an_async_consumer(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    AsyncSession: async_sessionmaker[outboxer.AsyncOutboxSession],
) -> None:
    def report(failure: outboxer.Failure, session: outboxer.OutboxSession) -> None:
        session.publish(PaymentFailed(order_id=failure.event.order_id, reason="reported"))

    released: list[int] = []
    consumer = outboxer.Consumer(AsyncSession, name="async-default", retry=ONCE)

    @consumer.handler(OrderPlaced)
    async def charge(event: OrderPlaced) -> None:
        raise ConnectionError("declined")

    @consumer.handler(PaymentFailed)
    async def release(event: PaymentFailed) -> None:
        released.append(event.order_id)

    outboxer.set_default_on_failure(report)
    try:
        await deliver(engine, Session, consumer, OrderPlaced(order_id=9))
    finally:
        outboxer.set_default_on_failure(None)
    assert released == [9]
    assert table(engine, outboxer.dead_letter.c.handler) == ["charge"]
