"""A database outage under a long-running consumer: the deliveries it holds are kept and
tried again, not given back to the broker.

A give-back (``basic.nack`` with requeue) counts as a delivery. On a quorum queue with a
delivery limit (``?queue_type=quorum&delivery_limit=N``, the broker-side bound for a
message that keeps killing its consumer) a consumer that gave its deliveries back on every
try during a database outage had healthy messages parked in ``<queue>.poison`` after N
tries: a one-minute failover was enough. RabbitMQ 4 gives every quorum queue a limit of
20 by default.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as Session_
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.transports.rabbitmq import RabbitMQTransport

from . import test_consumer_outages
from .broker_rabbitmq import RabbitMQCase
from .models import Effect, OrderPlaced
from .services import RABBITMQ_URL
from .test_consumer_hostile import Running, effects, reserving_consumer
from .test_consumer_outages import Refusals

unpooled = test_consumer_outages.unpooled  # a fixture

SessionFactory = sessionmaker[outboxer.OutboxSession]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def poison_depth(rabbit: RabbitMQCase, queue: str) -> int:
    admin = rabbit.admin()
    try:
        return int(admin.channel.queue_declare(queue, passive=True).method.message_count)
    finally:
        admin.close()


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_an_outage_longer_than_the_delivery_limit_parks_nothing(
    engine: Engine, unpooled: Engine, rabbitmq_case: RabbitMQCase
) -> None:
    rabbit = rabbitmq_case
    transport = RabbitMQTransport.from_url(
        f"{RABBITMQ_URL}?queue_type=quorum&delivery_limit=1", connect_timeout=5
    )
    destination = rabbit.new_destination()
    consumer = reserving_consumer(
        sessionmaker(unpooled, class_=outboxer.OutboxSession), rabbit.unique("outage"), destination
    )
    rabbit.queues += [consumer.name, f"{consumer.name}.poison"]
    rabbit.exchanges += [consumer.name, f"{consumer.name}.poison"]
    refusals = Refusals(unpooled)
    try:
        transport.receiver(consumer.subscription()).close()  # the quorum queue, declared
        Session = sessionmaker(engine, class_=outboxer.OutboxSession)
        with Session.begin() as session:
            for i in range(3):
                session.publish(OrderPlaced(order_id=i), destination=destination)
        outboxer.Relay(engine, transport).run(once=True)
        refusals.next(8)  # the consumer's next eight connections are refused
        with Running(consumer, transport, concurrency=1):
            wait_until(lambda: refusals.pending == 0, 30, "the outage to be tried through")
            wait_until(lambda: len(effects(engine)) == 3, 30, "the three messages handled")
        assert poison_depth(rabbit, f"{consumer.name}.poison") == 0, "healthy messages parked"
        assert effects(engine) == {"0": 1, "1": 1, "2": 1}
    finally:
        transport.close()


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_message_that_drops_its_own_connection_is_not_kept_as_an_outage(
    engine: Engine, rabbitmq_case: RabbitMQCase
) -> None:
    """The database answers: the failure is the message's own, and it goes back to the
    broker (whose delivery limit parks it) instead of holding the worker forever."""
    rabbit = rabbitmq_case
    transport = RabbitMQTransport.from_url(
        f"{RABBITMQ_URL}?queue_type=quorum&delivery_limit=2", connect_timeout=5
    )
    destination = rabbit.new_destination()
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    consumer = outboxer.Consumer(Session, name=rabbit.unique("own-drop"))

    @consumer.handler(OrderPlaced, destination=destination)
    def reserve(event: OrderPlaced, session: Session_) -> None:
        if event.order_id == 0:  # this message makes the server drop its connection
            session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    rabbit.queues += [consumer.name, f"{consumer.name}.poison"]
    rabbit.exchanges += [consumer.name, f"{consumer.name}.poison"]
    try:
        transport.receiver(consumer.subscription()).close()
        with Session.begin() as session:
            for i in range(4):
                session.publish(OrderPlaced(order_id=i), destination=destination)
        outboxer.Relay(engine, transport).run(once=True)
        with Running(consumer, transport, concurrency=1):
            wait_until(lambda: len(effects(engine)) == 3, 30, "the three other messages")
            wait_until(
                lambda: poison_depth(rabbit, f"{consumer.name}.poison") == 1,
                30,
                "the broker to park the message that drops its connection",
            )
        assert effects(engine) == {"1": 1, "2": 1, "3": 1}
    finally:
        transport.close()
