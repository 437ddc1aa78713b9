"""Deduplication keys from headers (``outboxer.from_header``), on real brokers and PostgreSQL.

A webhook's id usually arrives as a header: the inbox deduplicates on its value, through
the broker, a delayed retry and a replay alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.keys import FromHeader

from .broker_cases import BrokerCase
from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .broker_sqs import SQSCase
from .models import Effect, OrderPlaced
from .services import port_open, require
from .test_consumer_brokers import Line

SessionFactory = sessionmaker[outboxer.OutboxSession]

WEBHOOK_ID = outboxer.from_header("X-Webhook-Id")


@outboxer.message("test.keys.webhook", destination="webhooks", dedup_key=WEBHOOK_ID)
@dataclass
class Webhook:
    amount: int


@pytest.fixture(params=["rabbitmq", "sqs"])
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    made: BrokerCase
    if request.param == "rabbitmq":
        require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
        made = RabbitMQCase()
    else:
        made = SQSCase(request.getfixturevalue("moto_endpoint"))
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def line(engine: Engine, Session: SessionFactory, case: BrokerCase) -> Line:
    return Line(engine, Session, case)


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_header_dedup_key_makes_different_messages_one(line: Line) -> None:
    @line.handler(dedup_key=outboxer.from_header("x-webhook-id"))
    def record(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        webhook = context.headers["x-webhook-id"]
        line.calls[webhook] += 1
        if webhook == "wh-2" and line.calls[webhook] == 1:
            raise ConnectionError("later, please")  # the delayed retry keeps the header
        session.add(Effect(handler="record", message_key=webhook))

    line.subscribe()
    with line.Session.begin() as session:
        for order_id, webhook in ((1, "wh-1"), (2, "wh-1"), (3, "wh-2")):
            session.publish(
                OrderPlaced(order_id=order_id),
                destination=line.destination,
                headers={"x-webhook-id": webhook},
            )
    line.deliver(
        until=lambda: line.effects()["record"] == 2 and line.consumer.stats.duplicates == 1
    )
    line.quiet()
    assert line.effects() == {"record": 2}
    # wh-2's first run fails. When wh-1 shared its batch (docs/consumers.md, Batching),
    # the batch was rolled back and wh-1's handler ran once more, one message at a time.
    assert line.calls["wh-2"] == 2 and line.calls["wh-1"] in (1, 2)
    assert line.dead() == []


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_header_dedup_key_on_the_message_type_survives_a_replay(line: Line) -> None:
    broken = {"yes": True}

    @line.consumer.handler(Webhook, destination=line.destination, retry=outboxer.Retry(1))
    def book(event: Webhook, session: Session) -> None:
        line.calls["book"] += 1
        if broken["yes"]:
            raise ValueError("ledger closed")
        session.add(Effect(handler="book", message_key=str(event.amount)))

    line.subscribe()
    with line.Session.begin() as session:
        session.publish(Webhook(5), destination=line.destination, headers={"x-webhook-id": "a"})
    line.deliver(until=lambda: bool(line.dead()))
    [letter] = line.dead()
    assert letter.headers["x-webhook-id"] == "a"
    broken["yes"] = False
    outboxer.DeadLetters(line.Session).replay(letter.id)
    line.deliver(until=lambda: line.effects()["book"] == 1)
    # The same webhook sent again (another message id): the inbox knows it by its header.
    with line.Session.begin() as session:
        session.publish(Webhook(5), destination=line.destination, headers={"X-WEBHOOK-ID": "a"})
    line.deliver(until=lambda: line.pending() == 0)
    line.quiet()
    assert line.calls["book"] == 2 and line.effects() == {"book": 1}


def test_from_header_reads_the_header_whatever_its_case() -> None:
    key = outboxer.from_header("x-webhook-id")
    assert key == FromHeader("x-webhook-id")
    assert key.value({"X-Webhook-ID": "w1"}) == "w1"
    assert key.value({"x-webhook-id": ""}) is None
    assert key.value({}) is None


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_header_keys_are_checked_at_registration(Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="keys")
    with pytest.raises(outboxer.ConfigurationError, match="from_header"):
        outboxer.from_header("")
    with pytest.raises(outboxer.ConfigurationError, match=r"dedup_key must be .*from_header"):
        bad: object = outboxer.from_body("order_id")
        consumer.handler(OrderPlaced, dedup_key=bad)(lambda e: None)  # type: ignore[arg-type]
