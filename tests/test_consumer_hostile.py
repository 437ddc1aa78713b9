"""Hostile publishers and unusual handlers (issue 9): one test per defect, on real services.

Every test here was written first and seen failing on the consumer before the fix; the
failure each showed is in its docstring.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pika
import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer import wire
from outboxer.cli import main as cli_main
from outboxer.message import Envelope
from outboxer.store import dead_letters as dead_letter_store
from outboxer.testing import MemoryBroker, MemoryTransport

from .broker_rabbitmq import RabbitMQCase
from .broker_sqs import SQSCase
from .models import Effect, OrderPlaced
from .services import RABBITMQ_URL

SessionFactory = sessionmaker[outboxer.OutboxSession]
ONCE = outboxer.Retry(max_attempts=1)


def good_headers(type_: str = "test.order_placed", **extra: str) -> dict[str, str]:
    headers = {
        wire.MESSAGE_ID: str(outboxer.uuid7()),
        wire.TYPE: type_,
        wire.OCCURRED_AT: datetime.now(timezone.utc).isoformat(),
        wire.CORRELATION_ID: "c-1",
        wire.CONTENT_TYPE: "application/json",
    }
    headers.update(extra)
    return headers


def effects(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(Effect.message_key)).scalars())


def dead(Session: SessionFactory) -> list[outboxer.DeadLetter]:
    return outboxer.DeadLetters(Session).list(limit=1000)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def reserving_consumer(Session: SessionFactory, name: str, destination: str) -> outboxer.Consumer:
    consumer = outboxer.Consumer(Session, name=name, retry=ONCE)

    @consumer.handler(OrderPlaced, destination=destination)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    return consumer


class Running:
    """A consumer's run() in a thread, stopped on exit."""

    def __init__(self, consumer: outboxer.Consumer, transport: Any, **options: Any) -> None:
        self.consumer = consumer
        self.result: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.result = consumer.run(transport, **options)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the consumer did not stop"


# Defect 1: one message kills the process --------------------------------------------------


@pytest.fixture
def rabbit(rabbitmq_case: RabbitMQCase) -> RabbitMQCase:
    return rabbitmq_case


def raw_publish(exchange: str, body: bytes, properties: pika.BasicProperties) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        connection.channel().basic_publish(exchange, "anything", body, properties)
    finally:
        connection.close()


def subscribed(case: RabbitMQCase, consumer: outboxer.Consumer) -> None:
    case.queues.append(consumer.name)
    case.exchanges.append(consumer.name)
    case.transport.receiver(consumer.subscription()).close()


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_rabbitmq_deliveries_that_cannot_be_decoded_are_dead_lettered_and_the_consumer_lives(
    engine: Engine, Session: SessionFactory, rabbit: RabbitMQCase
) -> None:
    """Old code: ``OverflowError: timestamp out of range`` escaped ``run()`` (the process died)."""
    consumer = reserving_consumer(Session, rabbit.unique("hostile"), rabbit.new_destination())
    subscribed(rabbit, consumer)
    raw_publish(
        consumer.name,
        b'{"order_id": 1}',
        pika.BasicProperties(
            message_id=str(outboxer.uuid7()), type="test.order_placed", timestamp=2**62
        ),
    )
    raw_publish(
        consumer.name,
        b'{"order_id": 2}',
        pika.BasicProperties(message_id=b"\xff\xfe-not-utf-8", type="test.order_placed"),
    )
    good = good_headers()
    raw_publish(
        consumer.name,
        b'{"order_id": 3}',
        pika.BasicProperties(
            message_id=good.pop(wire.MESSAGE_ID), type=good.pop(wire.TYPE), headers=good
        ),
    )
    stats = consumer.run(rabbit.transport, once=True, idle_timeout=2.0)
    assert stats.messages == 3 and stats.processed == 1
    assert effects(engine) == {"3": 1}
    letters = dead(Session)
    assert len(letters) == 2
    assert all(letter.origin == "consumer" and letter.error_message for letter in letters)


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_an_sqs_attribute_nested_50000_deep_is_dead_lettered_and_the_consumer_lives(
    engine: Engine, Session: SessionFactory, moto_endpoint: str
) -> None:
    """Old code: ``RecursionError`` escaped ``run()`` from attributes.py."""
    case = SQSCase(moto_endpoint)
    try:
        destination = case.new_destination()
        consumer = reserving_consumer(Session, case.unique("hostile"), destination)
        case.transport.receiver(consumer.subscription()).close()
        headers = good_headers()
        attributes = {
            name: {"DataType": "String", "StringValue": value} for name, value in headers.items()
        }
        attributes["outboxer-headers"] = {"DataType": "String", "StringValue": "[" * 50_000}
        client = case.transport.client
        url = client.get_queue_url(QueueName=destination)["QueueUrl"]
        client.send_message(
            QueueUrl=url, MessageBody='{"order_id": 1}', MessageAttributes=attributes
        )
        stats = consumer.run(case.transport, once=True, idle_timeout=1.0)
        assert stats.messages == 1
        [letter] = dead(Session)
        assert letter.origin == "consumer" and "outboxer-headers" in letter.error_message
    finally:
        case.close()


# Defect 2: dead letters that cannot be written ---------------------------------------------

LONG = "x" * 300
UNKNOWN = "test.nobody_handles_this"

UNWRITABLE: dict[str, tuple[bytes, dict[str, str]]] = {
    "type over 255 characters": (b"{}", good_headers("t" * 300)),
    "type with a NUL": (b"{}", good_headers("bad\x00type")),
    "content type over 100 characters": (
        b"{}",
        good_headers(UNKNOWN, **{wire.CONTENT_TYPE: "application/" + LONG}),
    ),
    "traceparent over 64 characters": (
        b"{}",
        good_headers(UNKNOWN, traceparent="00-" + "a" * 100),
    ),
    "naive occurred-at": (
        b"{}",
        good_headers(UNKNOWN, **{wire.OCCURRED_AT: "2026-01-01T00:00:00"}),
    ),
    "correlation id over 255 characters": (
        b"{}",
        good_headers(UNKNOWN, **{wire.CORRELATION_ID: LONG}),
    ),
    "key over 255 characters": (b"{}", good_headers(UNKNOWN, **{wire.KEY: LONG})),
    "NUL in a user header": (b"{}", good_headers(UNKNOWN, tenant="a\x00b")),
    "nested JSON for a dict handler": (b"[" * 100_000, good_headers("test.dicts")),
}


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
@pytest.mark.parametrize("case", sorted(UNWRITABLE))
def test_a_message_whose_fields_break_the_columns_is_still_dead_lettered(
    engine: Engine, Session: SessionFactory, case: str
) -> None:
    """Old code: ``process()`` raised (``StringDataRightTruncation``, ``RecursionError``,
    ``ValueError: naive datetime``), so the delivery went back and the loop backed off."""
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)

    @consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced) -> None:
        pass

    @consumer.handler("test.dicts", destination="dicts")
    def dicts(event: dict[str, Any]) -> None:
        pass

    body, headers = UNWRITABLE[case]
    report = consumer.process(body, headers, destination="orders")
    assert report.rejected
    [letter] = dead(Session)
    assert letter.origin == "consumer" and letter.error_message


@pytest.mark.parametrize("db_kind", ["mariadb"], indirect=True)
def test_a_body_larger_than_the_database_takes_is_quarantined_instead_of_looping(
    engine: Engine, Session: SessionFactory
) -> None:
    """Found attacking the fix: a body over MariaDB's max_allowed_packet breaks the
    connection ("server has gone away"), which looked like an outage: the delivery went
    back and came again, forever."""
    with engine.connect() as conn:
        limit = int(conn.exec_driver_sql("SELECT @@max_allowed_packet").scalar_one())
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)

    @consumer.handler("test.dicts", destination="dicts")
    def dicts(event: dict[str, Any]) -> None:
        pass

    body = b'{"a": "' + b"x" * (limit + 1024) + b'"}'
    report = consumer.process(body, good_headers(UNKNOWN), destination="dicts")
    assert report.rejected
    [letter] = dead(Session)
    assert letter.error_type == "quarantined" and "unknown_type" in letter.error_message
    assert letter.payload == body[: len(letter.payload)] and len(letter.payload) > 0


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_forged_first_failed_at_does_not_keep_a_handler_failure_from_its_dead_letter(
    engine: Engine, Session: SessionFactory
) -> None:
    """Old code: ``ValueError: Invalid isoformat string: 'yesterday'`` out of ``process()``."""
    consumer = outboxer.Consumer(Session, name="billing", retry=outboxer.Retry(max_attempts=2))

    @consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced) -> None:
        raise ValueError("card declined")

    headers = good_headers(
        **{
            wire.HANDLER: "billing:charge",
            wire.ATTEMPT: "2",
            "outboxer-first-failed-at": "yesterday",
        }
    )
    report = consumer.process(b'{"order_id": 1}', headers, destination="billing")
    assert report.outcomes == {"charge": "dead_lettered"}
    [letter] = dead(Session)
    assert letter.handler == "charge" and "card declined" in letter.error_message


# Defect 3: a header table pika cannot decode ---------------------------------------------


def nested(depth: int) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for _ in range(depth):
        table = {"a": table}
    return table


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_header_table_pika_cannot_decode_is_dead_lettered_once_not_redelivered_forever(
    engine: Engine, Session: SessionFactory, rabbit: RabbitMQCase
) -> None:
    """Old code: pika dropped the connection on each delivery (about 7 a second), nothing
    was dead-lettered and the good message behind it never ran."""
    consumer = reserving_consumer(Session, rabbit.unique("hostile"), rabbit.new_destination())
    subscribed(rabbit, consumer)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:  # pika's encoder recurses too: give the publisher room
        headers = good_headers()
        raw_publish(
            consumer.name,
            b'{"order_id": 1}',
            pika.BasicProperties(
                message_id=headers.pop(wire.MESSAGE_ID),
                type=headers.pop(wire.TYPE),
                headers={**headers, "deep": nested(3000)},
            ),
        )
    finally:
        sys.setrecursionlimit(limit)
    good = good_headers()
    raw_publish(
        consumer.name,
        b'{"order_id": 2}',
        pika.BasicProperties(
            message_id=good.pop(wire.MESSAGE_ID), type=good.pop(wire.TYPE), headers=good
        ),
    )
    with Running(consumer, rabbit.transport, concurrency=2):
        wait_until(lambda: effects(engine) == {"2": 1} and len(dead(Session)) == 1, 20, "both")
        time.sleep(1.0)  # a redelivery loop would show up as more letters or a second run
    [letter] = dead(Session)
    assert "header" in letter.error_message and consumer.name in letter.error_message
    assert effects(engine) == {"2": 1}


def test_a_quorum_queue_with_a_delivery_limit_parks_a_message_that_keeps_coming_back(
    rabbit: RabbitMQCase,
) -> None:
    """The broker-side bound for any delivery that keeps failing before it is settled."""
    from outboxer.transports.rabbitmq import RabbitMQTransport

    queue = rabbit.unique("quorum")
    rabbit.queues += [queue, f"{queue}.poison"]
    rabbit.exchanges += [queue, f"{queue}.poison"]
    transport = RabbitMQTransport.from_url(
        f"{RABBITMQ_URL}?queue_type=quorum&delivery_limit=2", connect_timeout=5
    )
    try:
        receiver = transport.receiver(outboxer.transports.Subscription(queue=queue))
        raw_publish(queue, b"poison", pika.BasicProperties(message_id="m-1"))
        deliveries = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            got = receiver.receive(1, 0.5)
            for delivery in got:
                deliveries += 1
                delivery.release()  # as a connection dropped on it would
            if not got and deliveries:
                break
        receiver.close()
        assert deliveries == 3, deliveries  # the first delivery, then two more at most
        admin = rabbit.admin()
        try:
            _, _, body = admin.channel.basic_get(f"{queue}.poison", auto_ack=True)
        finally:
            admin.close()
        assert body == b"poison"
    finally:
        transport.close()


# Defect 4: BaseException from handlers ----------------------------------------------------


class Boom(BaseException):
    """Not an Exception: a library's own BaseException subclass."""


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_handler_raising_a_base_exception_is_a_failure_and_its_delivery_is_settled(
    engine: Engine, Session: SessionFactory, rabbit: RabbitMQCase
) -> None:
    """Old code: the deliveries were never acknowledged and nothing was dead-lettered;
    with prefetch 2, nothing more arrived."""
    consumer = outboxer.Consumer(Session, name=rabbit.unique("boom"), retry=ONCE, prefetch=2)
    destination = rabbit.new_destination()

    @consumer.handler(OrderPlaced, destination=destination)
    def explode(event: OrderPlaced) -> None:
        raise Boom(f"order {event.order_id}")

    subscribed(rabbit, consumer)
    with Session.begin() as session:
        for i in range(5):
            session.publish(OrderPlaced(order_id=i), destination=destination)
    outboxer.Relay(engine, rabbit.transport).run(once=True)
    with Running(consumer, rabbit.transport, concurrency=1):
        wait_until(lambda: len(dead(Session)) == 5, 20, "five dead letters")
    assert {letter.error_type for letter in dead(Session)} == {Boom.__qualname__} or all(
        letter.error_type.endswith("Boom") for letter in dead(Session)
    )


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
@pytest.mark.parametrize("signal_type", [KeyboardInterrupt, SystemExit])
def test_a_handler_raising_a_shutdown_signal_stops_the_consumer_cleanly_and_loses_nothing(
    engine: Engine, Session: SessionFactory, rabbit: RabbitMQCase, signal_type: type
) -> None:
    """Old code: the consumer kept running with the delivery unsettled."""
    consumer = outboxer.Consumer(Session, name=rabbit.unique("signal"), retry=ONCE)
    destination = rabbit.new_destination()
    interrupt = {"yes": True}

    @consumer.handler(OrderPlaced, destination=destination)
    def reserve(event: OrderPlaced, session: Session) -> None:
        if interrupt["yes"]:
            raise signal_type()
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    subscribed(rabbit, consumer)
    with Session.begin() as session:
        session.publish(OrderPlaced(order_id=1), destination=destination)
    outboxer.Relay(engine, rabbit.transport).run(once=True)
    running = Running(consumer, rabbit.transport)
    running.thread.start()
    running.thread.join(15)
    assert not running.thread.is_alive(), "the consumer did not stop"
    assert running.error is None, repr(running.error)
    assert dead(Session) == [] and effects(engine) == {}
    interrupt["yes"] = False
    consumer.run(rabbit.transport, once=True, idle_timeout=2.0)
    assert effects(engine) == {"1": 1}


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
async def test_async_handlers_raising_cancelled_error_or_committing_are_dead_lettered(
    engine: Engine, Session: SessionFactory, db_url: str
) -> None:
    """Old code: ``CancelledError`` escaped ``process_async`` (the delivery was never
    settled); ``await session.commit()`` committed half the work with the inbox row."""
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from .services import async_url

    async_engine = create_async_engine(async_url(db_url))
    consumer = outboxer.Consumer(
        async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession),
        name="async-hostile",
        retry=ONCE,
    )

    @consumer.handler(OrderPlaced)
    async def cancelled(event: OrderPlaced) -> None:
        raise asyncio.CancelledError("raised by the handler, not a cancellation")

    @consumer.handler(OrderPlaced)
    async def commits(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
        session.add(Effect(handler="commits", message_key="first half"))
        await session.commit()

    @consumer.handler(OrderPlaced)
    async def commits_connection(event: OrderPlaced, session: outboxer.AsyncOutboxSession) -> None:
        session.add(Effect(handler="commits_connection", message_key="first half"))
        await session.flush()
        await (await session.connection()).commit()

    try:
        report = await consumer.process_async(
            b'{"order_id": 1}', good_headers(), destination="orders"
        )
    finally:
        await async_engine.dispose()
    assert report.outcomes == {
        "cancelled": "dead_lettered",
        "commits": "dead_lettered",
        "commits_connection": "dead_lettered",
    }
    assert effects(engine) == {}
    assert {letter.handler for letter in dead(Session)} == {
        "cancelled",
        "commits",
        "commits_connection",
    }


# Defect 5: a handler that commits the injected session -------------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)
def test_a_handler_that_commits_its_session_is_refused_and_a_replay_runs_it(
    engine: Engine, Session: SessionFactory
) -> None:
    """Old code: the first half committed with the inbox row; after the fix was deployed
    the replay said ``duplicate`` and the handler never ran again."""
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)
    commits = {"yes": True}
    runs = Counter[str]()

    @consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        runs["reserve"] += 1
        session.add(Effect(handler="reserve", message_key="first half"))
        if commits["yes"]:
            session.commit()
        session.add(Effect(handler="reserve", message_key="second half"))

    report = consumer.process(b'{"order_id": 1}', good_headers(), destination="orders")
    assert report.outcomes == {"reserve": "dead_lettered"}
    assert effects(engine) == {}
    [letter] = dead(Session)
    assert "commit" in letter.error_message
    commits["yes"] = False  # the fix is deployed
    outboxer.DeadLetters(Session).replay(letter.id)
    with engine.connect() as conn:
        row = conn.execute(select(outboxer.outbox)).mappings().one()
    replayed = Envelope(
        message_id=row["message_id"],
        type=row["message_type"],
        destination="billing",
        payload=row["payload"],
        occurred_at=row["occurred_at"],
        handler=row["target_handler"],
    )
    report = consumer.process(
        replayed.payload, wire.encode_headers(replayed), destination="billing"
    )
    assert report.outcomes == {"reserve": "processed"}
    assert runs["reserve"] == 2
    assert effects(engine) == {"first half": 1, "second half": 1}


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_handler_that_commits_through_the_sessions_connection_is_refused(
    engine: Engine, Session: SessionFactory
) -> None:
    """The same defect through another door, found after the fix: ``session.connection()
    .commit()`` committed the inbox row and the first half of the work, and the failed
    handler's dead letter then stood beside an effect that a replay would repeat."""
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)
    runs = Counter[str]()

    @consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        runs["reserve"] += 1
        session.add(Effect(handler="reserve", message_key="first half"))
        session.flush()
        session.connection().commit()
        session.add(Effect(handler="reserve", message_key="second half"))

    headers = good_headers()
    report = consumer.process(b'{"order_id": 1}', headers, destination="orders")
    assert report.outcomes == {"reserve": "dead_lettered"}
    assert effects(engine) == {}
    [letter] = dead(Session)
    assert letter.error_type == "outboxer.errors.HandlerSessionError"
    assert "commit" in letter.error_message
    # Nothing of it committed, the inbox row neither: the message may run again.
    report = consumer.process(b'{"order_id": 1}', headers, destination="orders")
    assert report.outcomes == {"reserve": "dead_lettered"}
    assert runs["reserve"] == 2


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_handler_that_closes_its_session_leaves_the_pool_usable(
    engine: Engine, Session: SessionFactory
) -> None:
    """The connection guard marks the pooled connection while a handler runs; a handler
    that closes its session must not leave the mark behind (every later commit on that
    pooled connection would be refused)."""
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)
    closes = {"yes": True}

    @consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))
        session.flush()
        if closes["yes"]:
            session.close()

    report = consumer.process(b'{"order_id": 1}', good_headers(), destination="orders")
    assert report.outcomes == {"reserve": "dead_lettered"}
    closes["yes"] = False
    for order_id in range(2, 7):
        body = json.dumps({"order_id": order_id}).encode()
        report = consumer.process(body, good_headers(), destination="orders")
        assert report.outcomes == {"reserve": "processed"}
    with Session.begin() as session:  # the application's own commits, on the same pool
        session.add(Effect(handler="app", message_key="own"))
    assert effects(engine) == {"2": 1, "3": 1, "4": 1, "5": 1, "6": 1, "own": 1}


@pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)
def test_a_poison_message_delivered_twice_has_two_dead_letters_and_replays_once(
    engine: Engine, Session: SessionFactory
) -> None:
    """At-least-once delivery: each delivery that gives up writes its dead letter. After
    the fix, replaying both runs the handler once; the second replay is a duplicate."""
    from outboxer.testing import drain

    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)
    broken = {"yes": True}

    @consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        if broken["yes"]:
            raise KeyError("a bug")
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    headers = good_headers()
    for _ in range(2):
        report = consumer.process(b'{"order_id": 1}', headers, destination="orders")
        assert report.outcomes == {"reserve": "dead_lettered"}
    letters = dead(Session)
    assert len(letters) == 2
    broken["yes"] = False  # the fix is deployed
    for letter in letters:
        outboxer.DeadLetters(Session).replay(letter.id)
    report = drain(engine, [consumer], MemoryTransport(MemoryBroker()))
    assert (report.sent, report.messages) == (2, 2)
    assert consumer.stats.processed == 1 and consumer.stats.duplicates == 1
    assert effects(engine) == {"1": 1}


# Defect 6: dedup compares exactly on every database ----------------------------------------


@pytest.mark.parametrize("db_kind", ["mariadb", "postgresql", "sqlite"], indirect=True)
def test_distinct_dedup_keys_are_never_taken_for_duplicates(
    engine: Engine, Session: SessionFactory
) -> None:
    """Old code on MariaDB: the long keys were truncated to one and ``'order-42 '`` matched
    ``'order-42'`` (``duplicate``); on PostgreSQL the long key failed the handler."""
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)
    seen: list[str] = []

    @consumer.handler("test.refund", destination="refunds", dedup_key="ref")
    def refund(event: dict[str, Any]) -> None:
        seen.append(event["ref"])

    keys = ["k" * 300 + "a", "k" * 300 + "b", "order-42", "order-42 ", "sha256:abc", "Order-42"]
    for key in keys:
        report = consumer.process(
            json.dumps({"ref": key}).encode(), good_headers("test.refund"), destination="refunds"
        )
        assert report.outcomes == {"refund": "processed"}, key
    again = consumer.process(
        json.dumps({"ref": keys[0]}).encode(), good_headers("test.refund"), destination="refunds"
    )
    assert again.outcomes == {"refund": "duplicate"}
    assert seen == keys


# Defect 7: SQS deliveries held but not started -----------------------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_sqs_deliveries_waiting_for_a_worker_keep_their_visibility(
    engine: Engine, Session: SessionFactory, moto_endpoint: str
) -> None:
    """Old code: deliveries held behind a slow handler became visible again and were
    delivered a second time (``messages`` above the number sent)."""
    from outboxer.transports.sqs import SQSTransport

    case = SQSCase(moto_endpoint)
    transport = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1", visibility_timeout=2)
    try:
        destination = case.new_destination()
        consumer = outboxer.Consumer(Session, name=case.unique("slow"), retry=ONCE)

        @consumer.handler(OrderPlaced, destination=destination)
        def slow(event: OrderPlaced, session: Session) -> None:
            time.sleep(0.5)
            session.add(Effect(handler="slow", message_key=str(event.order_id)))

        transport.receiver(consumer.subscription()).close()
        with Session.begin() as session:
            for i in range(8):
                session.publish(OrderPlaced(order_id=i), destination=destination)
        outboxer.Relay(engine, transport).run(once=True)
        with Running(consumer, transport, extend_after=0.5, extend_by=3) as running:
            wait_until(lambda: len(effects(engine)) == 8, 30, "eight orders")
            time.sleep(3.0)  # long enough for an unextended delivery to come back
        assert running.result.messages == 8, running.result
        assert running.result.duplicates == 0
    finally:
        transport.close()
        case.close()


# Defect 8: outside publishers choosing the handler and the attempt -------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_handler_header_only_selects_a_handler_of_that_type_and_the_attempt_is_bounded(
    engine: Engine, Session: SessionFactory
) -> None:
    """Old code: ``admin`` ran on a ``test.order_placed`` message, and ``attempt=-5000``
    ran the failing handler 5,000 times."""
    consumer = outboxer.Consumer(Session, name="billing")
    runs = Counter[str]()

    @consumer.handler("test.admin_command", destination="admin")
    def admin(event: dict[str, Any]) -> None:
        runs["admin"] += 1

    @consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=3, instant=2))
    def charge(event: OrderPlaced) -> None:
        runs["charge"] += 1
        raise ConnectionError("down")

    hijack = good_headers(**{wire.HANDLER: "billing:admin", wire.ATTEMPT: "1"})
    report = consumer.process(b'{"order_id": 1}', hijack, destination="billing")
    assert runs["admin"] == 0 and report.rejected
    forged = good_headers(**{wire.HANDLER: "billing:charge", wire.ATTEMPT: "-5000"})
    report = consumer.process(b'{"order_id": 1}', forged, destination="billing")
    assert runs["charge"] <= 3
    assert report.outcomes == {"charge": "dead_lettered"}


# Defect 9: the dead-letter CLI and hostile text ------------------------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_the_dead_letter_cli_shows_hostile_text_literally(
    engine: Engine, Session: SessionFactory, db_url: str
) -> None:
    """Old code: ``MarkupError`` on ``evil[/]``; ``[green]`` was styled; ESC reached the
    terminal."""
    hostile = "evil[/] [link=https://evil.example]click[/link] [green]ok \x1b]8;;x\x1b\\ \x1b[2K"
    envelope = Envelope(
        message_id=outboxer.uuid7(),
        type="evil[/]",
        destination="orders",
        payload=b'{"a": "[red]x\x1b[2K"}',
        occurred_at=datetime.now(timezone.utc),
    )
    with Session.begin() as session:
        dead_letter_store.insert_dead_letters(
            session.connection(),
            [
                dead_letter_store.NewDeadLetter(
                    origin="consumer",
                    error_type="x[/]",
                    error_message=hostile,
                    traceback=hostile,
                    attempts=1,
                    envelope=envelope,
                    consumer="billing",
                )
            ],
        )
    [letter] = dead(Session)
    runner = CliRunner()
    for args in (["list"], ["show", str(letter.id)]):
        result = runner.invoke(cli_main, ["dead-letter", *args, "--db", db_url])
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output
        assert "evil[/]" in result.output
        assert "[link=https://evil.example]" in result.output or args == ["list"]


# Defect 10: personal data in error text ----------------------------------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_database_error_in_a_handler_leaves_no_row_values_in_the_dead_letter(
    engine: Engine, Session: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Old code: ``[parameters: {... 'alice@example.com' ...}]`` and PostgreSQL's
    ``DETAIL: Failing row contains (... alice@example.com)`` in the dead letter and the log."""
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)

    @consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler=None, message_key="alice@example.com"))  # type: ignore[arg-type]
        session.flush()

    consumer.process(b'{"order_id": 1}', good_headers(), destination="orders")
    [letter] = dead(Session)
    assert "IntegrityError" in letter.error_type
    assert "alice@example.com" not in letter.error_message
    assert "alice@example.com" not in (letter.traceback or "")
    assert "alice@example.com" not in caplog.text


def test_engines_outboxer_creates_hide_parameters() -> None:
    from outboxer.cli.common import make_engine

    assert make_engine("sqlite://").hide_parameters


# Defect 11: outboxer-inbox and the current directory -------------------------------------------


def test_outboxer_inbox_does_not_let_the_current_directory_shadow_installed_packages(
    tmp_path: Path,
) -> None:
    """Old code: ``RuntimeError: the stray pika.py was imported`` (cwd first on sys.path)."""
    (tmp_path / "pika.py").write_text("raise RuntimeError('the stray pika.py was imported')\n")
    (tmp_path / "straycheck.py").write_text(
        "import pika\n"
        "import outboxer\n"
        "from sqlalchemy import create_engine\n"
        "from sqlalchemy.orm import sessionmaker\n"
        "engine = create_engine('sqlite://')\n"
        "outboxer.create_all(engine)\n"  # outboxer-inbox checks the tables at start
        "consumer = outboxer.Consumer(sessionmaker(engine, class_=outboxer.OutboxSession),"
        " name='stray')\n"
        "@consumer.handler('x.y', destination='z')\n"
        "def handle(event): pass\n"
    )
    inbox = Path(sys.executable).parent / "outboxer-inbox"
    result = subprocess.run(
        # --no-relay: a relay thread cannot see an in-memory SQLite database.
        [str(inbox), "straycheck:consumer", "--broker", "memory://", "--once", "--no-relay"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stray pika.py" not in result.stderr


# Defect 12: traceparent parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "traceparent",
    [
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version ff is invalid
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz",  # flags not hex
        "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",  # 00 has 4 fields
        "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # version is 2 digits
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(traceparent: str) -> None:
    from outboxer import tracecontext

    assert tracecontext._span_context(traceparent, None) is None


def test_a_later_version_traceparent_is_read_by_its_known_fields() -> None:
    from outboxer import tracecontext

    context = tracecontext._span_context(
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-next", None
    )
    assert context is not None and context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C


# The runner --------------------------------------------------------------------------------------


def test_stop_interrupts_the_async_database_outage_back_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Old code: ``stop()`` waited out ``asyncio.sleep`` of up to 30 s."""
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine("sqlite+aiosqlite:////nonexistent-dir/outboxer.sqlite")
    consumer = outboxer.Consumer(
        async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession), name="down"
    )

    @consumer.handler("x.y", destination="z")
    async def handle(event: dict[str, Any]) -> None:
        pass

    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    broker.inject("down", b"{}", good_headers("x.y"))
    caplog.set_level("WARNING", logger="outboxer.consumer")

    def failures() -> int:
        return caplog.text.count("could not record a message's outcome")

    async def scenario() -> float:
        task = asyncio.create_task(consumer.run_async(transport))
        deadline = time.monotonic() + 30
        while failures() < 5:  # the back-off is now 8 s or more
            assert time.monotonic() < deadline, caplog.text[-2000:]
            await asyncio.sleep(0.05)
        stopped = time.monotonic()
        consumer.stop()
        await asyncio.wait_for(task, 60)
        return time.monotonic() - stopped

    took = asyncio.run(scenario())
    asyncio.run(engine.dispose())
    assert took < 1.5, caplog.text[-3000:]


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
async def test_async_deliveries_in_progress_stay_extended_while_the_consumer_drains(
    engine: Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Old code: the async shutdown stopped extending while it waited for handlers."""
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from outboxer.transports import memory

    from .services import async_url

    extended: list[float] = []
    monkeypatch.setattr(
        memory._MemoryDelivery, "extend", lambda self, s: extended.append(time.monotonic())
    )
    async_engine = create_async_engine(async_url(db_url))
    started = asyncio.Event()
    consumer = outboxer.Consumer(
        async_sessionmaker(async_engine, class_=outboxer.AsyncOutboxSession), name="slow"
    )

    @consumer.handler("x.y", destination="z")
    async def slow(event: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(3.0)

    broker = MemoryBroker()
    broker.inject("slow", b"{}", good_headers("x.y"))
    try:
        run = asyncio.create_task(
            consumer.run_async(MemoryTransport(broker), extend_after=0.3, extend_by=30)
        )
        await asyncio.wait_for(started.wait(), 10)
        stopped_at = time.monotonic()
        consumer.stop()
        stats = await asyncio.wait_for(run, 30)
    finally:
        await async_engine.dispose()
    assert stats.processed == 1
    # Past the receive loop's last turn (1 s after the stop at most): the drain extends.
    assert any(moment > stopped_at + 1.6 for moment in extended), extended


def test_run_on_an_async_consumer_inside_a_running_loop_says_to_use_run_async() -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine("sqlite+aiosqlite://")
    consumer = outboxer.Consumer(
        async_sessionmaker(engine, class_=outboxer.AsyncOutboxSession), name="loop"
    )

    @consumer.handler("x.y", destination="z")
    async def handle(event: dict[str, Any]) -> None:
        pass

    async def inside() -> None:
        consumer.run(MemoryTransport(MemoryBroker()), once=True)

    with pytest.raises(outboxer.ConfigurationError, match="run_async"):
        asyncio.run(inside())


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_log_lines_count_in_good_english(
    engine: Engine, Session: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = outboxer.Consumer(Session, name="billing", retry=ONCE)

    @consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced) -> None:
        raise ValueError("declined")

    caplog.set_level("INFO")
    consumer.process(b'{"order_id": 1}', good_headers(), destination="orders")
    assert "after 1 attempt " in caplog.text or "after 1 attempt:" in caplog.text
    assert "1 attempts" not in caplog.text


def test_the_inbox_name_is_one_idea() -> None:
    import importlib

    assert outboxer.inbox.name == "outboxer_inbox"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("outboxer.inbox")
