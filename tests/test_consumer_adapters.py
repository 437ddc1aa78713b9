"""Inbound adapters: plain messages another system published, on real brokers and PostgreSQL.

A raw pika or boto3 client publishes plain JSON; the adapter's handler runs through the
inbox (a redelivery is a duplicate), its failure is dead-lettered, and the replay comes
back to the same handler. Hostile input is dead-lettered with its reason while the
consumer keeps going.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.adapters import message_id_of
from outboxer.transports import Delivery, Receiver

from .broker_cases import BrokerCase
from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .broker_sqs import SQSCase
from .models import Effect
from .relaying import OUTBOXER, spawn, stop, wait_for
from .services import RABBITMQ_URL, port_open, require
from .test_consumer_brokers import Line

SessionFactory = sessionmaker[outboxer.OutboxSession]


@outboxer.message("test.adapters.payment_received")
@dataclass
class PaymentReceived:
    payment_id: str
    amount_cents: int


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


class Outside:
    """Another system: it owns a queue and publishes plain JSON with a raw client."""

    def __init__(self, case: BrokerCase) -> None:
        self.case = case
        self.queue = case.unique("webhooks")
        if isinstance(case, RabbitMQCase):
            case.queues.append(self.queue)
            admin = case.admin()
            try:
                admin.channel.queue_declare(self.queue, durable=True)
            finally:
                admin.close()
        else:
            assert isinstance(case, SQSCase)
            self.sqs().create_queue(QueueName=self.queue)

    def sqs(self) -> Any:
        import boto3

        assert isinstance(self.case, SQSCase)
        return boto3.client("sqs", endpoint_url=self.case.endpoint, region_name="us-east-1")

    def publish(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        exchange: str = "",
        routing_key: str | None = None,
    ) -> None:
        if isinstance(self.case, RabbitMQCase):
            admin = self.case.admin()
            try:
                properties = pika.BasicProperties(
                    message_id=message_id,
                    headers=dict(headers or {}),
                    content_type="application/json",
                    delivery_mode=2,
                )
                admin.channel.basic_publish(
                    exchange, routing_key or self.queue, body, properties=properties
                )
            finally:
                admin.close()
        else:
            assert message_id is None, "SQS gives every message its own id"
            client = self.sqs()
            url = client.get_queue_url(QueueName=self.queue)["QueueUrl"]
            attributes = {
                name: {"DataType": "String", "StringValue": value}
                for name, value in (headers or {}).items()
            }
            client.send_message(
                QueueUrl=url, MessageBody=body.decode(), MessageAttributes=attributes
            )


@pytest.fixture
def line(engine: Engine, Session: SessionFactory, case: BrokerCase) -> Line:
    return Line(engine, Session, case)


@pytest.fixture
def outside(case: BrokerCase) -> Outside:
    return Outside(case)


pytestmark = pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)


def payment(payment_id: str, amount: int = 100) -> bytes:
    return f'{{"payment_id": "{payment_id}", "amount_cents": {amount}}}'.encode()


def test_an_adapter_handles_a_raw_message_once_even_when_the_broker_redelivers_it(
    line: Line, outside: Outside
) -> None:
    seen: list[outboxer.Context] = []

    @line.consumer.adapter(PaymentReceived, queue=outside.queue)
    def record(event: PaymentReceived, session: Session, context: outboxer.Context) -> None:
        seen.append(context)
        session.add(Effect(handler="record", message_key=event.payment_id))

    line.subscribe()
    if isinstance(line.case, RabbitMQCase):
        outside.publish(payment("p-1"), message_id="evt-1", headers={"x-tenant": "acme"})
    else:
        outside.publish(payment("p-1"), headers={"x-tenant": "acme"})
    # The first delivery is processed, then given back as if its ack was lost.
    receiver = line.case.transport.receiver(line.consumer.subscription())
    try:
        deliveries = wait_for_deliveries(receiver)
        [delivery] = deliveries
        assert delivery.destination == outside.queue
        report = line.consumer.process(
            delivery.body, delivery.headers, destination=delivery.destination
        )
        assert report.outcomes == {"record": "processed"}
        delivery.release()
    finally:
        receiver.close()
    line.deliver(until=lambda: line.consumer.stats.duplicates == 1)
    line.quiet()
    assert line.effects() == {"record": 1}
    [context] = seen
    assert context.headers == {"x-tenant": "acme"}
    assert context.message_type == "test.adapters.payment_received"
    if isinstance(line.case, RabbitMQCase):
        assert context.message_id == message_id_of("evt-1")
    assert line.dead() == []


def test_an_adapters_failure_is_dead_lettered_and_replays_back_to_it(
    line: Line, outside: Outside
) -> None:
    broken = {"yes": True}
    failures: list[outboxer.Failure] = []

    @line.consumer.adapter(
        PaymentReceived,
        queue=outside.queue,
        message_id=outboxer.from_header("X-Webhook-Id"),
        retry=outboxer.Retry(max_attempts=2, instant=1),
        on_failure=failures.append,  # the error channel, before the dead letter
    )
    def record(event: PaymentReceived, session: Session) -> None:
        line.calls["record"] += 1
        if broken["yes"]:
            raise ConnectionError("ledger unavailable")
        session.add(Effect(handler="record", message_key=event.payment_id))

    line.subscribe()
    outside.publish(payment("p-7"), headers={"x-webhook-id": "wh-7"})
    line.deliver(until=lambda: bool(line.dead()))
    [letter] = line.dead()
    assert (letter.origin, letter.consumer, letter.handler) == ("handler", line.name, "record")
    assert letter.attempts == 2 and line.calls["record"] == 2  # instant retries, no delay
    assert letter.message_id == message_id_of("wh-7")
    assert letter.headers["x-webhook-id"] == "wh-7"
    assert line.pending() == 0  # no delayed retry went through the outbox
    [failure] = failures
    assert (failure.handler, failure.attempts, failure.event) == (
        "record",
        2,
        PaymentReceived("p-7", 100),
    )

    broken["yes"] = False
    outboxer.DeadLetters(line.Session).replay(letter.id)
    line.deliver(until=lambda: line.effects()["record"] == 1)
    # The sender retries its webhook: the same id, a duplicate.
    outside.publish(payment("p-7"), headers={"x-webhook-id": "wh-7"})
    line.deliver(until=lambda: line.consumer.stats.duplicates == 1)
    line.quiet()
    assert line.calls["record"] == 3 and line.effects() == {"record": 1}
    assert line.dead() == []


def test_hostile_messages_to_an_adapter_are_dead_lettered_with_their_reason(
    line: Line, outside: Outside
) -> None:
    @line.consumer.adapter(
        PaymentReceived, queue=outside.queue, message_id=outboxer.from_header("x-webhook-id")
    )
    def record(event: PaymentReceived, session: Session) -> None:
        session.add(Effect(handler="record", message_key=event.payment_id))

    line.subscribe()
    outside.publish(payment("p-1"))  # no id
    outside.publish(b"{not json", headers={"x-webhook-id": "wh-2"})
    outside.publish(b'{"payment_id": 3}', headers={"x-webhook-id": "wh-3"})  # wrong shape
    outside.publish(b"[" * 100_000, headers={"x-webhook-id": "wh-4"})  # nested too deep
    outside.publish(payment("p-5"), headers={"x-webhook-id": "x" * 5000})  # an id too long
    outside.publish(payment("p-6"), headers={"x-webhook-id": "wh-6"})  # a good one
    line.deliver(until=lambda: line.effects()["record"] == 1 and len(line.dead()) == 5)
    line.quiet()
    letters = {d.payload[:20]: d for d in line.dead()}
    assert {d.origin for d in letters.values()} == {"consumer"}
    reasons = sorted((d.error_type, d.message_id is not None) for d in letters.values())
    assert reasons == [
        ("missing_message_id", False),
        ("missing_message_id", False),
        ("payload_mismatch", True),
        ("payload_mismatch", True),
        ("payload_mismatch", True),
    ]
    missing = letters[payment("p-1")[:20]]
    assert "from header 'x-webhook-id', which it does not carry" in missing.error_message
    shape = letters[b'{"payment_id": 3}']
    assert "amount_cents" in shape.error_message and shape.handler == "record"


def wait_for_deliveries(receiver: Receiver) -> list[Delivery]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        deliveries = receiver.receive(10, 1.0)
        if deliveries:
            return deliveries
    raise AssertionError("nothing was delivered")


def test_an_adapter_binds_a_queue_of_its_own_to_another_systems_exchange(
    line: Line, case: BrokerCase
) -> None:
    if not isinstance(case, RabbitMQCase):
        pytest.skip("exchanges are RabbitMQ's")
    exchange = case.new_destination()
    admin = case.admin()
    try:
        admin.declare_exchange(exchange)
    finally:
        admin.close()

    @line.consumer.adapter(PaymentReceived, exchange=exchange, routing_key="payment.*")
    def record(event: PaymentReceived, session: Session) -> None:
        session.add(Effect(handler="record", message_key=event.payment_id))

    case.queues.append(f"{line.name}.record")
    line.subscribe()
    outside = Outside.__new__(Outside)
    outside.case, outside.queue = case, ""
    outside.publish(payment("p-1"), message_id="m-1", exchange=exchange, routing_key="payment.ok")
    outside.publish(payment("p-2"), message_id="m-2", exchange=exchange, routing_key="refund.ok")
    line.deliver(until=lambda: line.effects()["record"] == 1)
    line.quiet()
    assert line.effects() == {"record": 1}


def test_an_adapter_refuses_delayed_retries_and_other_impossible_settings(
    Session: SessionFactory, case: BrokerCase
) -> None:
    consumer = outboxer.Consumer(Session, name="payments")

    def handle(event: PaymentReceived) -> None:
        pass

    def refused(match: str, **options: Any) -> None:
        with pytest.raises(outboxer.ConfigurationError, match=match):
            consumer.adapter(PaymentReceived, **options)(handle)

    refused(
        r"delays retries 2-5 through the outbox.*Retry\(max_attempts=5, instant=4\)",
        queue="webhooks",
        retry=outboxer.Retry(max_attempts=5),
    )
    refused("reads nothing: pass queue=", message_id=outboxer.from_header("x-id"))
    refused("message_id must be outboxer.from_header", queue="webhooks", message_id="id")
    refused("carries outboxer's own messages", queue="payments")
    consumer.adapter(PaymentReceived, queue="webhooks")(handle)
    refused("both read queue 'webhooks'", queue="webhooks", name="again")
    with pytest.raises(outboxer.ConfigurationError, match="which is the queue of adapter"):
        consumer.handler("test.other", destination="webhooks", name="other")(handle)
    # The consumer's instant retries are an adapter's default; its delayed ones are not.
    patient = outboxer.Consumer(Session, name="p", retry=outboxer.Retry(max_attempts=9, instant=2))
    patient.adapter(PaymentReceived, queue="w")(handle)
    [spec] = patient.handlers
    assert (spec.retry.max_attempts, spec.retry.instant) == (3, 2)
    if isinstance(case, SQSCase):
        on_exchange = outboxer.Consumer(Session, name=case.unique("sqs"))
        on_exchange.adapter(PaymentReceived, exchange="partners")(handle)
        with pytest.raises(outboxer.ConfigurationError, match="SQS has no exchanges"):
            case.transport.receiver(on_exchange.subscription())


def test_an_adapter_on_the_memory_broker_takes_injected_messages(Session: SessionFactory) -> None:
    broker = outboxer.transports.MemoryBroker()
    consumer = outboxer.Consumer(Session, name="payments")
    done: list[str] = []

    @consumer.adapter(PaymentReceived, queue="webhooks")
    def record(event: PaymentReceived, context: outboxer.Context) -> None:
        done.append(event.payment_id)

    transport = outboxer.transports.MemoryTransport(broker)
    transport.receiver(consumer.subscription()).close()
    broker.inject("webhooks", payment("p-1"), {})
    broker.inject("webhooks", b"nope", {})
    stats = consumer.run(transport, once=True, idle_timeout=0.1)
    assert done == ["p-1"] and (stats.processed, stats.rejected) == (1, 1)


def test_an_adapters_unusable_message_stays_addressed_to_it_through_replays(
    engine: Engine, Session: SessionFactory
) -> None:
    broker = outboxer.transports.MemoryBroker()
    transport = outboxer.transports.MemoryTransport(broker)
    consumer = outboxer.Consumer(Session, name="payments")

    @consumer.adapter(PaymentReceived, queue="webhooks")
    def record(event: PaymentReceived) -> None:
        pass

    transport.receiver(consumer.subscription()).close()
    broker.inject("webhooks", b'{"payment_id": "p-1"}', {})  # no amount_cents
    consumer.run(transport, once=True, idle_timeout=0.1)
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    assert (letter.origin, letter.handler, letter.error_type) == (
        "consumer",
        "record",
        "payload_mismatch",
    )
    dead.replay(letter.id)  # the code is not fixed yet: it fails again, the same way
    outboxer.Relay(engine, transport).run(once=True)
    consumer.run(transport, once=True, idle_timeout=0.1)
    [again] = dead.list()
    assert (again.origin, again.handler, again.error_type) == (
        "consumer",
        "record",
        "payload_mismatch",
    )
    assert again.message_id == letter.message_id and again.id != letter.id


@pytest.mark.slow
def test_outboxer_inbox_runs_an_adapter_through_hostile_input_a_failure_and_its_replay(
    line: Line, outside: Outside, case: BrokerCase, db_url: str, tmp_path: Path
) -> None:
    if isinstance(case, SQSCase):
        broker_url = f"sqs://?region=us-east-1&endpoint_url={case.endpoint}"
    else:
        broker_url = RABBITMQ_URL
    fixed = tmp_path / "fixed"
    env = {
        **os.environ,
        "APP_DB": db_url,
        "APP_CONSUMER": line.name,
        "APP_QUEUE": outside.queue,
        "APP_FIXED": str(fixed),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    inbox = str(Path(OUTBOXER).parent / "outboxer-inbox")
    process = spawn([inbox, "tests.adapter_app:consumer", "--broker", broker_url], env=env)
    try:
        outside.publish(payment("p-1"))  # no id
        outside.publish(b"{not json", headers={"x-webhook-id": "wh-2"})
        outside.publish(b'{"payment_id": 3}', headers={"x-webhook-id": "wh-3"})
        outside.publish(b"[" * 100_000, headers={"x-webhook-id": "wh-4"})
        outside.publish(payment("p-5", -100), headers={"x-webhook-id": "wh-5"})  # it fails
        outside.publish(payment("p-6"), headers={"x-webhook-id": "wh-6"})
        wait_for(
            lambda: line.effects()["record"] == 1 and len(line.dead()) == 5,
            60,
            "the good payment, and five dead letters",
        )
        [failed] = [d for d in line.dead() if d.origin == "handler"]
        assert failed.handler == "record" and "negative amount" in failed.error_message
        fixed.touch()  # the fix is deployed
        outboxer.DeadLetters(line.Session).replay(failed.id)
        # outboxer-inbox's own relay sends the replay back to its queue, to the adapter.
        wait_for(lambda: line.effects()["record"] == 2, 60, "the replayed payment")
        assert process.poll() is None, "outboxer-inbox exited"
    finally:
        log = stop(process)
    assert sorted(d.error_type for d in line.dead()) == [
        "missing_message_id",
        "payload_mismatch",
        "payload_mismatch",
        "payload_mismatch",
    ]
    assert "Traceback" not in log
