"""Two consumers of one event on AWS: through SNS each processes every message; sharing a
plain SQS queue they split them, and are warned at start-up."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.transports import Transport

from .models import Effect, OrderPlaced

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)

ORDERS = 6


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sns(moto_endpoint: str) -> Iterator[Transport]:
    with outboxer.transport_from_url(
        f"sns://?region=us-east-1&endpoint_url={moto_endpoint}"
    ) as transport:
        yield transport


@pytest.fixture
def sqs(moto_endpoint: str) -> Iterator[Transport]:
    with outboxer.transport_from_url(
        f"sqs://?region=us-east-1&endpoint_url={moto_endpoint}"
    ) as transport:
        yield transport


def consumers(
    Session: sessionmaker[outboxer.OutboxSession], destination: str
) -> list[outboxer.Consumer]:
    """billing and audit, both handling OrderPlaced from ``destination``."""
    made = []
    for role in ("billing", "audit"):
        consumer = outboxer.Consumer(Session, name=unique(role))

        def handle(event: OrderPlaced, session: Session, role: str = role) -> None:
            session.add(Effect(handler=role, message_key=str(event.order_id)))

        consumer.handler(OrderPlaced, destination=destination, name=f"record_{role}")(handle)
        made.append(consumer)
    return made


def effects(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(Effect.handler)).scalars())


def run_until(
    transport: Transport, team: list[outboxer.Consumer], done: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, "the consumers did not get there in time"
        for consumer in team:
            consumer.run(transport, once=True, idle_timeout=0.5)


@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
def test_two_consumers_through_sns_each_process_every_message(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    sns: Transport,
    fifo: bool,
) -> None:
    topic = unique("orders") + (".fifo" if fifo else "")
    team = consumers(Session, topic)
    for consumer in team:  # as outboxer-inbox does at start: queues, topics, subscriptions
        sns.receiver(consumer.subscription()).close()
    with Session.begin() as session:
        for order in range(ORDERS):
            session.publish(OrderPlaced(order_id=order), destination=topic, key=f"c{order % 2}")
    assert outboxer.Relay(engine, sns).run(once=True).sent == ORDERS
    run_until(sns, team, lambda: effects(engine) == {"billing": ORDERS, "audit": ORDERS})
    for consumer in team:
        assert consumer.run(sns, once=True, idle_timeout=0.5).messages == 0
    with engine.connect() as conn:
        keys = conn.execute(select(Effect.handler, Effect.message_key)).all()
    assert sorted(keys) == sorted(
        (role, str(order)) for role in ("billing", "audit") for order in range(ORDERS)
    )


def test_consumers_sharing_a_plain_sqs_queue_split_it_and_are_warned_once(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    sqs: Transport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = unique("orders")
    billing, audit = consumers(Session, queue)
    caplog.set_level(logging.WARNING, logger="outboxer")
    sqs.receiver(billing.subscription()).close()
    assert not [r for r in caplog.records if "sns://" in r.getMessage()]
    sqs.receiver(audit.subscription()).close()
    sqs.receiver(audit.subscription()).close()  # a restart or reconnection: no second line
    warnings = [r.getMessage() for r in caplog.records if "sns://" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"SQS queue {queue!r}" in warnings[0]
    assert repr(billing.name) in warnings[0] and "sns://" in warnings[0]
    with Session.begin() as session:
        for order in range(ORDERS):
            session.publish(OrderPlaced(order_id=order), destination=queue)
    assert outboxer.Relay(engine, sqs).run(once=True).sent == ORDERS
    run_until(sqs, [billing, audit], lambda: sum(effects(engine).values()) == ORDERS)
    # Point to point: each order went to one of them (which is what the warning is about).
    assert effects(engine)["billing"] + effects(engine)["audit"] == ORDERS
