"""Batching: one transaction per handler for several deliveries, on each database.

A batch commits once for all its messages; a failing message rolls its batch back and
the batch goes one message at a time, so retries, dead letters and effects are those of
one message at a time (each scenario runs with ``batch_size`` 1 and 20 and expects the
same). Real brokers: acknowledging a batch (one multiple-ack on RabbitMQ,
DeleteMessageBatch on SQS), and a batch redelivered after a crash before its ack.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer import instrumentation
from outboxer.batching import Batcher
from outboxer.tracing import OpenTelemetryInstrumentation
from outboxer.transports.base import Delivery, acknowledge
from outboxer.transports.rabbitmq.receiver import _ack_tags

from .broker_cases import BrokerCase
from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .broker_sqs import SQSCase
from .consumer_line import POISON, QUICK, Line, envelope_of
from .models import Effect, Order, OrderPlaced
from .services import port_open, require
from .test_consumer import RefundRequested
from .test_tracing import Otel

SessionFactory = sessionmaker[outboxer.OutboxSession]


def test_a_batch_commits_once_for_all_its_messages(engine: Engine, Session: Any) -> None:
    line = Line(engine, Session, batch_size=20)

    @line.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    line.commits = 0
    stats = line.consume()
    assert (stats.messages, stats.processed) == (10, 10)
    assert line.commits == 1
    assert line.effects() == {str(i): 1 for i in range(10)}
    assert line.broker.queue_depth("billing") == 0


def _poison_handler(line: Line, failure: str) -> None:
    @line.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls[event.order_id] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        session.flush()
        if event.order_id != POISON:
            return
        if failure == "retryable":
            raise ConnectionError("payment gateway timed out")
        if failure == "commit":
            session.commit()
        raise KeyError("not retryable")  # Retry(retry_on=...) below does not cover it

    if failure != "retryable":
        spec = line.consumer.registry.by_id["billing:reserve"]
        spec.retry = outboxer.Retry(max_attempts=3, retry_on=(ConnectionError,))


@pytest.mark.parametrize("failure", ["retryable", "not-retryable", "commit"])
def test_a_poison_message_in_a_batch_is_retried_and_dead_lettered_as_alone(
    line: Line, failure: str
) -> None:
    _poison_handler(line, failure)
    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    attempts = 3 if failure == "retryable" else 1
    assert (dead.handler, dead.attempts) == ("reserve", attempts)
    expected_type = {
        "retryable": "ConnectionError",
        "not-retryable": "KeyError",
        "commit": "outboxer.errors.HandlerSessionError",
    }[failure]
    assert dead.error_type == expected_type
    # The poison message's handler ran once per attempt, batched or not.
    assert line.calls[POISON] == attempts
    # Every other message's effect happened exactly once (a batch rolled back runs its
    # other messages again, one at a time: their handlers run at most twice).
    assert line.effects() == {str(i): 1 for i in range(10) if i != POISON}
    assert all(line.calls[i] in (1, 2) for i in range(10) if i != POISON)
    assert line.consume().messages == 0


def test_a_write_that_fails_late_is_blamed_on_its_own_message(line: Line) -> None:
    """Message 5 inserts order 1 again; its INSERT is sent only when message 6's handler
    autoflushes. The failure is message 5's (dead-lettered), never message 6's."""

    @line.consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=1))
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls[event.order_id] += 1
        session.get(Order, event.order_id + 100)  # autoflushes the previous message's rows
        session.add(Order(id=1 if event.order_id == POISON else event.order_id))
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(1, 10)))
    line.deliver(until=lambda: bool(line.dead()))
    [dead] = line.dead()
    assert json.loads(dead.payload)["order_id"] == POISON
    assert dead.attempts == 1
    assert line.effects() == {str(i): 1 for i in range(1, 10) if i != POISON}
    assert line.consume().messages == 0


def test_duplicates_in_and_across_batches_have_each_effect_once(line: Line) -> None:
    @line.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls[event.order_id] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    @line.consumer.handler(RefundRequested)  # dedup_key="order_id"
    def refund(event: RefundRequested, session: Session) -> None:
        session.add(Effect(handler="refund", message_key=f"refund-{event.order_id}"))

    first = [envelope_of(OrderPlaced(order_id=i)) for i in range(4)]
    line.inject(*first)
    assert line.consume().processed == 4
    again = envelope_of(OrderPlaced(order_id=9))
    refunds = [envelope_of(RefundRequested(order_id=7)) for _ in range(3)]
    line.inject(first[1], again, first[2], again, *refunds, first[3])
    stats = line.consume()
    assert (stats.messages, stats.processed, stats.duplicates) == (8, 2, 6)
    assert line.calls == {0: 1, 1: 1, 2: 1, 3: 1, 9: 1}
    assert line.effects() == {**{str(i): 1 for i in (0, 1, 2, 3, 9)}, "refund-7": 1}


def test_what_a_handler_publishes_in_a_batch_is_caused_by_its_own_message(
    engine: Engine, Session: Any
) -> None:
    line = Line(engine, Session, batch_size=20)

    @line.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: outboxer.OutboxSession) -> None:
        session.publish(RefundRequested(order_id=event.order_id))

    sent = [envelope_of(OrderPlaced(order_id=i)) for i in range(6)]
    line.inject(*sent)
    line.commits = 0
    assert line.consume().processed == 6
    assert line.commits == 1
    with engine.connect() as conn:
        rows = conn.execute(select(outboxer.outbox.c.payload, outboxer.outbox.c.causation_id))
        caused = {json.loads(payload)["order_id"]: cause for payload, cause in rows}
    assert caused == {i: str(envelope.message_id) for i, envelope in enumerate(sent)}


def test_a_handler_that_raises_keyboardinterrupt_in_a_batch_stops_and_gives_back(
    engine: Engine, Session: Any
) -> None:
    line = Line(engine, Session, batch_size=20)

    @line.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        if event.order_id == POISON:
            raise KeyboardInterrupt

    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(10)))
    stats = line.consume()
    assert stats.processed < 10
    assert line.broker.queue_depth("billing") == 10 - stats.processed
    assert len(line.effects()) == stats.processed


def test_a_multiple_ack_covers_only_the_acknowledged_tags() -> None:
    sent: list[tuple[int, bool]] = []

    class Channel:
        def basic_ack(self, tag: int, multiple: bool = False) -> None:
            sent.append((tag, multiple))

    unacked = {1, 2, 3, 4, 5, 7}
    _ack_tags(Channel(), unacked, [3, 1, 2, 5])  # type: ignore[arg-type]
    assert sent == [(3, True), (5, False)]
    assert unacked == {4, 7}
    sent.clear()
    _ack_tags(Channel(), unacked, [7])  # type: ignore[arg-type]
    assert sent == [(7, False)]
    assert unacked == {4}


# Real brokers ---------------------------------------------------------------------------


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


def _broker_consumer(
    case: BrokerCase, Session: SessionFactory, poison: int | None = POISON
) -> tuple[Any, str, Counter[int]]:
    destination = case.new_destination()
    name = case.unique("billing")
    if isinstance(case, RabbitMQCase):
        case.queues.append(name)
        case.exchanges.append(name)
    consumer = outboxer.Consumer(Session, name=name, retry=QUICK, batch_size=20)
    calls: Counter[int] = Counter()

    @consumer.handler(OrderPlaced, destination=destination)
    def reserve(event: OrderPlaced, session: Session) -> None:
        calls[event.order_id] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        if event.order_id == poison:
            raise KeyError("not retryable")

    spec = consumer.registry.by_id[f"{name}:reserve"]
    spec.retry = outboxer.Retry(max_attempts=3, retry_on=(ConnectionError,))
    case.transport.receiver(consumer.subscription()).close()
    return consumer, destination, calls


def _receive(receiver: Any, count: int) -> list[Delivery]:
    deliveries: list[Delivery] = []
    deadline = time.monotonic() + 30
    while len(deliveries) < count and time.monotonic() < deadline:
        deliveries += receiver.receive(count - len(deliveries), 1.0)
    assert len(deliveries) == count
    return deliveries


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_batch_redelivered_after_a_crash_before_its_ack_has_its_effects_once(
    case: BrokerCase, engine: Engine, Session: SessionFactory
) -> None:
    consumer, destination, calls = _broker_consumer(case, Session, poison=None)
    case.transport.send([envelope_of(OrderPlaced(order_id=i), destination) for i in range(8)])
    receiver = case.transport.receiver(consumer.subscription())
    deliveries = _receive(receiver, 8)
    outcomes = Batcher(consumer.processor(), case.transport.description).process(deliveries)
    assert all(isinstance(o, outboxer.MessageReport) for o in outcomes)
    receiver.close()  # the crash: committed, never acknowledged
    for delivery in deliveries:
        delivery.release()  # SQS: visible again at once (RabbitMQ: the closed channel did it)
    deadline = time.monotonic() + 30
    seen = 0
    while seen < 8 and time.monotonic() < deadline:
        stats = consumer.run(case.transport, once=True, idle_timeout=1.0)
        seen += stats.messages
        assert stats.processed == 0
    assert seen == 8
    with engine.connect() as conn:
        effects = Counter(conn.execute(select(Effect.message_key)).scalars())
    assert effects == {str(i): 1 for i in range(8)}
    assert calls == dict.fromkeys(range(8), 1)
    assert consumer.run(case.transport, once=True, idle_timeout=1.0).messages == 0


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_a_batch_with_a_poison_message_is_settled_on_the_broker(
    case: BrokerCase, engine: Engine, Session: SessionFactory
) -> None:
    consumer, destination, calls = _broker_consumer(case, Session)
    case.transport.send([envelope_of(OrderPlaced(order_id=i), destination) for i in range(30)])
    seen = 0
    deadline = time.monotonic() + 30
    while seen < 30 and time.monotonic() < deadline:
        seen += consumer.run(case.transport, once=True, idle_timeout=1.0).messages
    assert seen == 30
    [dead] = outboxer.DeadLetters(Session).list()
    assert (dead.error_type, dead.attempts, calls[POISON]) == ("KeyError", 1, 1)
    with engine.connect() as conn:
        effects = Counter(conn.execute(select(Effect.message_key)).scalars())
    assert effects == {str(i): 1 for i in range(30) if i != POISON}
    # Every delivery was acknowledged: nothing comes back.
    assert consumer.run(case.transport, once=True, idle_timeout=2.0).messages == 0


def test_acknowledge_groups_deliveries_by_class() -> None:
    acked: list[str] = []

    class One(Delivery):
        def __init__(self, name: str) -> None:
            self.name = name

        def ack(self) -> None:
            acked.append(self.name)

        def release(self) -> None:
            raise AssertionError("not released")

    class Many(One):
        @classmethod
        def ack_many(cls, deliveries: Any) -> None:
            acked.append("+".join(d.name for d in deliveries))

    acknowledge([One("a"), Many("b"), One("c"), Many("d")])
    assert acked == ["a", "c", "b+d"]


def test_sqs_deletes_a_batch_in_calls_of_ten(sqs_case: SQSCase) -> None:
    import boto3

    destination = sqs_case.new_destination()
    receiver = sqs_case.subscribe(destination)
    sqs_case.transport.send([envelope_of(OrderPlaced(order_id=i), destination) for i in range(25)])
    deliveries = _receive(receiver, 25)
    deliveries[0].ack()  # already settled: left out of the batch
    client = deliveries[0]._client  # type: ignore[attr-defined]
    calls: Counter[str] = Counter()
    for operation in ("DeleteMessage", "DeleteMessageBatch"):
        client.meta.events.register(
            f"before-call.sqs.{operation}",
            lambda operation=operation, **_: calls.update([operation]),
        )
    acknowledge(deliveries)
    acknowledge(deliveries[:5])  # settled: nothing more is sent
    assert calls == {"DeleteMessageBatch": 3}
    sqs = boto3.client("sqs", endpoint_url=sqs_case.endpoint, region_name="us-east-1")
    url = sqs.get_queue_url(QueueName=destination)["QueueUrl"]
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
    assert [attributes[name] for name in names] == ["0", "0"]
    receiver.close()


def test_a_batch_that_breaks_unexpectedly_goes_back_to_the_broker(
    engine: Engine, Session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = Line(engine, Session, batch_size=20)

    @line.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    broken = {"yes": True}
    process = Batcher.process

    def breaks_once(self: Batcher, deliveries: Any) -> Any:
        if broken.pop("yes", False):
            raise RuntimeError("a bug in batching")
        return process(self, deliveries)

    monkeypatch.setattr(Batcher, "process", breaks_once)
    line.inject(*(envelope_of(OrderPlaced(order_id=i)) for i in range(5)))
    stats = line.consume()
    assert (stats.failed_deliveries, stats.processed) == (5, 5)
    assert line.effects() == {str(i): 1 for i in range(5)}


@pytest.fixture
def otel() -> Iterator[Otel]:
    setup = Otel()
    previous = instrumentation.install(
        OpenTelemetryInstrumentation(
            tracer_provider=setup.provider, meter_provider=setup.meter_provider
        )
    )
    yield setup
    instrumentation.install(previous)


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_each_message_of_a_batch_has_its_own_spans_in_its_own_trace(
    engine: Engine, Session: Any, otel: Otel
) -> None:
    line = Line(engine, Session, batch_size=20)

    @line.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    sent = [envelope_of(OrderPlaced(order_id=i)) for i in range(5)]
    with otel.tracer.start_as_current_span("publish") as parent:
        context = parent.get_span_context()
        traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    sent = [dataclasses.replace(e, traceparent=traceparent) for e in sent]
    line.inject(*sent)
    line.commits = 0
    assert line.consume().processed == 5
    assert line.commits == 1
    handles = [s for s in otel.spans() if s.name == "handle billing:reserve"]
    processes = [s for s in otel.spans() if s.name.startswith("process ")]
    assert len(handles) == len(processes) == 5
    assert {s.context.trace_id for s in handles} == {context.trace_id}
    for span in handles:
        attributes = span.attributes or {}
        assert attributes["outboxer.batch.size"] == 5
        assert attributes["outboxer.handler.outcome"] == "processed"
