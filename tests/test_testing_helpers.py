"""outboxer.testing: the recorder of published messages, drain(), and the pytest fixtures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.testing import HandlerFailed, MemoryTransport, Published, drain, drain_async

from .broker_rabbitmq import RabbitMQCase
from .models import Base, Effect, Order


@outboxer.message("testing_helpers.placed", destination="shop", key="order_id")
@dataclass
class Placed:
    order_id: int
    customer: str


@outboxer.message("testing_helpers.charged", destination="payments")
@dataclass
class Charged:
    order_id: int


@pytest.fixture
def sqlite(tmp_path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path / 'app.sqlite'}")
    outboxer.create_all(engine)
    Base.metadata.create_all(engine)
    return engine


def effects(engine: Engine, handler: str) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                select(func.count()).select_from(Effect).where(Effect.handler == handler)
            ).scalar_one()
        )


def test_the_recorder_sees_what_commits_stored_and_nothing_rolled_back(
    sqlite: Engine, outboxer_published: Published
) -> None:
    Session = sessionmaker(sqlite, class_=outboxer.OutboxSession)
    with Session.begin() as session:
        session.add(Order(id=1))
        session.publish(Placed(order_id=1, customer="ada"))
        savepoint = session.begin_nested()
        session.publish(Placed(order_id=99, customer="gone"))
        savepoint.rollback()
    with Session() as session:
        session.publish(Placed(order_id=2, customer="bo"))
        session.rollback()

    assert outboxer_published.types == ["testing_helpers.placed"]
    assert outboxer_published.one(Placed) == Placed(order_id=1, customer="ada")
    outboxer_published.assert_published(Placed, key="1", customer="ada")
    outboxer_published.assert_published(Charged, count=0)
    with pytest.raises(AssertionError, match=r"no testing_helpers\.placed with"):
        outboxer_published.assert_published(Placed, customer="bo")


def test_the_recorder_sees_async_sessions_and_stops_recording(tmp_path: Path) -> None:
    import asyncio

    url = f"sqlite+aiosqlite:///{tmp_path / 'async.sqlite'}"
    outboxer.create_all(create_engine(url.replace("+aiosqlite", "")))

    async def publish(order_id: int) -> None:
        engine = create_async_engine(url)
        AsyncSession = async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession)
        async with AsyncSession.begin() as session:
            session.publish(Placed(order_id=order_id, customer="cy"))
        await engine.dispose()

    with Published() as published:
        asyncio.run(publish(1))
    asyncio.run(publish(2))
    assert [p.order_id for p in published.events(Placed)] == [1]


def test_drain_relays_and_consumes_until_nothing_moves(sqlite: Engine) -> None:
    Session = sessionmaker(sqlite, class_=outboxer.OutboxSession)
    shop = outboxer.Consumer(Session, name="testing-shop")
    payments = outboxer.Consumer(Session, name="testing-payments")

    @shop.handler(Placed)
    def charge(event: Placed, session: outboxer.OutboxSession) -> None:
        session.add(Effect(handler="charge", message_key=str(event.order_id)))
        session.publish(Charged(order_id=event.order_id))  # handled in the next round

    @payments.handler(Charged)
    def receipt(event: Charged, session: outboxer.OutboxSession) -> None:
        session.add(Effect(handler="receipt", message_key=str(event.order_id)))

    with Session.begin() as session:
        session.publish(Placed(order_id=1, customer="ada"))
        session.publish(Placed(order_id=2, customer="bo"))
    report = drain(sqlite, [shop, payments])
    assert (report.sent, report.messages, report.errors) == (4, 4, [])
    assert (effects(sqlite, "charge"), effects(sqlite, "receipt")) == (2, 2)
    assert drain(sqlite, [shop, payments]).sent == 0  # quiet: nothing left


def test_drain_raises_the_handlers_error_in_the_test(sqlite: Engine) -> None:
    Session = sessionmaker(sqlite, class_=outboxer.OutboxSession)
    shop = outboxer.Consumer(Session, name="testing-failing", retry=outboxer.Retry(max_attempts=1))

    @shop.handler(Placed)
    def charge(event: Placed) -> None:
        raise ValueError(f"card of {event.customer} declined")

    with Session.begin() as session:
        session.publish(Placed(order_id=1, customer="ada"))
    with pytest.raises(HandlerFailed, match="testing-failing:charge raised ValueError") as caught:
        drain(sqlite, [shop], MemoryTransport())
    assert isinstance(caught.value.__cause__, ValueError)

    with Session.begin() as session:
        session.publish(Placed(order_id=2, customer="bo"))
    report = drain(sqlite, [shop], fail_fast=False)
    assert [str(e) for _, e in report.errors] == ["card of bo declined"]
    assert len(outboxer.DeadLetters(Session).list()) == 2


async def test_drain_async_runs_async_consumers_in_the_tests_loop(tmp_path: Path) -> None:
    path = tmp_path / "async.sqlite"
    sync_engine = create_engine(f"sqlite:///{path}")
    outboxer.create_all(sync_engine)
    Base.metadata.create_all(sync_engine)
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}")
    AsyncSession = async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession)
    shop = outboxer.Consumer(AsyncSession, name="testing-async")

    @shop.handler(Placed)
    async def charge(event: Placed, session: outboxer.AsyncOutboxSession) -> None:
        session.add(Effect(handler="charge", message_key=str(event.order_id)))

    async with AsyncSession.begin() as session:
        session.publish(Placed(order_id=1, customer="ada"))
    report = await drain_async(sync_engine, [shop])
    assert (report.sent, report.messages) == (1, 1)
    assert effects(sync_engine, "charge") == 1
    await engine.dispose()


def test_drain_works_over_a_real_rabbitmq(sqlite: Engine, rabbitmq_case: RabbitMQCase) -> None:
    Session = sessionmaker(sqlite, class_=outboxer.OutboxSession)
    name = rabbitmq_case.unique("drain")
    shop = outboxer.Consumer(Session, name=name)
    rabbitmq_case.queues.append(name)
    rabbitmq_case.exchanges.extend([name, f"{name}-shop"])

    @shop.handler(Placed, destination=f"{name}-shop")
    def charge(event: Placed, session: outboxer.OutboxSession) -> None:
        session.add(Effect(handler="charge", message_key=str(event.order_id)))

    with Session.begin() as session:
        session.publish(Placed(order_id=1, customer="ada"), destination=f"{name}-shop")
    report = drain(sqlite, [shop], rabbitmq_case.transport)
    assert (report.sent, report.messages) == (1, 1)
    assert effects(sqlite, "charge") == 1


def test_drain_stops_a_handler_that_publishes_forever(sqlite: Engine) -> None:
    Session = sessionmaker(sqlite, class_=outboxer.OutboxSession)
    echo = outboxer.Consumer(Session, name="testing-echo")

    @echo.handler(Placed)
    def again(event: Placed, session: outboxer.OutboxSession) -> None:
        session.publish(Placed(order_id=event.order_id + 1, customer=event.customer))

    with Session.begin() as session:
        session.publish(Placed(order_id=1, customer="ada"))
    with pytest.raises(RuntimeError, match="still busy after 3 rounds"):
        drain(sqlite, [echo], max_rounds=3)
