"""The consumer against real brokers: RabbitMQ and moto's SQS server, on PostgreSQL and SQLite.

The scenarios of tests/test_consumer.py that depend on the broker (retries travelling
through the outbox and back, redeliveries, competing consumer processes, malformed
messages arriving off the wire, delayed retries) run here end to end: publish, relay,
broker, consumer, database.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.message import Envelope

from .broker_cases import BrokerCase
from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .broker_sqs import SNSCase, SQSCase
from .models import Effect, OrderPlaced
from .relaying import OUTBOXER, output, spawn, stop, wait_for
from .services import RABBITMQ_URL, port_open, require

SessionFactory = sessionmaker[outboxer.OutboxSession]
QUICK = outboxer.Retry(max_attempts=5, initial_delay=0.05, max_delay=0.05, jitter=0.0)

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)


@pytest.fixture(params=["rabbitmq", "sqs", "sns"])
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    made: BrokerCase
    if request.param == "rabbitmq":
        require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
        made = RabbitMQCase()
    elif request.param == "sqs":
        made = SQSCase(request.getfixturevalue("moto_endpoint"))
    else:
        made = SNSCase(request.getfixturevalue("moto_endpoint"))
    try:
        yield made
    finally:
        made.close()


class Line:
    """Publish to a fresh destination, relay it through a real broker, consume it."""

    def __init__(self, engine: Engine, Session: SessionFactory, case: BrokerCase) -> None:
        self.engine = engine
        self.Session = Session
        self.case = case
        self.destination = case.new_destination()
        self.name = case.unique("billing")
        if isinstance(case, RabbitMQCase):  # deleted when the case closes
            case.queues.append(self.name)
            case.exchanges.append(self.name)
        self.relay = outboxer.Relay(engine, case.transport, poll_interval=0.05)
        self.consumer = outboxer.Consumer(Session, name=self.name, retry=QUICK)
        self.calls: Counter[str] = Counter()

    def handler(self, **options: Any) -> Callable[[Any], Any]:
        return self.consumer.handler(OrderPlaced, destination=self.destination, **options)

    def publish(self, *events: Any) -> None:
        with self.Session.begin() as session:
            for event in events:
                session.publish(event, destination=self.destination)

    def subscribe(self) -> None:
        """Declare the consumer's queue and bindings, so the relay's sends are routable."""
        self.case.transport.receiver(self.consumer.subscription()).close()

    def send(self) -> int:
        return self.relay.run(once=True).sent

    def consume(self) -> outboxer.ConsumerStats:
        return self.consumer.run(self.case.transport, once=True, idle_timeout=1.0)

    def deliver(self, until: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send()
            self.consume()
            if until():
                return
        raise AssertionError("the expected state was not reached in time")

    def quiet(self) -> None:
        """Nothing left anywhere: the outbox is empty and the queue has nothing more."""
        assert self.send() == 0
        assert self.pending() == 0
        assert self.consume().messages == 0

    def pending(self) -> int:
        with self.engine.connect() as conn:
            return len(conn.execute(select(outboxer.outbox.c.id)).all())

    def effects(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(conn.execute(select(Effect.handler)).scalars())

    def dead(self) -> list[outboxer.DeadLetter]:
        return outboxer.DeadLetters(self.Session).list()

    def send_twice(self) -> None:
        """Send every pending row twice, as a relay that died before settling would."""
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(select(outboxer.outbox)).mappings()]
        assert rows and self.send() == len(rows)
        with self.engine.begin() as conn:
            conn.execute(insert(outboxer.outbox), rows)
        assert self.send() == len(rows)

    def inbox_process(self, db_url: str, broker_url: str) -> tuple[list[str], dict[str, str]]:
        """The command and environment of an ``outboxer-inbox`` process that runs
        tests.consumer_app as this line's consumer; its queue is declared here first."""

        @self.handler()
        def reserve(event: OrderPlaced) -> None:  # the subscription tests.consumer_app has
            pass

        self.subscribe()
        env = {
            **os.environ,
            "APP_DB": db_url,
            "APP_DESTINATION": self.destination,
            "APP_CONSUMER": self.name,
            "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
        }
        command = [str(Path(OUTBOXER).parent / "outboxer-inbox"), "tests.consumer_app:consumer"]
        return [*command, "--broker", broker_url, "--concurrency", "4"], env

    def reservations(self) -> Counter[str]:
        """How many times tests.consumer_app reserved each order."""
        with self.engine.connect() as conn:
            return Counter(conn.execute(select(Effect.message_key)).scalars())


def run_totals(log: str) -> tuple[int, int, int]:
    """(messages, processed, duplicates) from the last line an outboxer-inbox logs."""
    found = re.search(r": (\d+) messages?, (\d+) processed, (\d+) duplicates?", log)
    assert found, log
    return int(found.group(1)), int(found.group(2)), int(found.group(3))


@pytest.fixture
def line(engine: Engine, Session: SessionFactory, case: BrokerCase) -> Line:
    return Line(engine, Session, case)


def test_a_failing_handler_is_retried_alone_through_the_broker(line: Line) -> None:
    failures = {"left": 2}

    @line.handler()
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls["reserve"] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    @line.handler()
    def charge(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        line.calls["charge"] += 1
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError(f"payment gateway timed out (attempt {context.attempt})")
        session.add(Effect(handler="charge", message_key=str(event.order_id)))

    @line.handler()
    def notify(event: OrderPlaced, session: Session) -> None:
        line.calls["notify"] += 1
        session.add(Effect(handler="notify", message_key=str(event.order_id)))

    line.subscribe()
    line.publish(OrderPlaced(order_id=1))
    line.deliver(until=lambda: line.effects()["charge"] == 1)
    line.quiet()
    assert line.calls == {"reserve": 1, "charge": 3, "notify": 1}
    assert line.effects() == {"reserve": 1, "charge": 1, "notify": 1}
    assert line.dead() == []


def test_exhausted_retries_dead_letter_then_a_replay_runs_only_that_handler(line: Line) -> None:
    broken = {"yes": True}

    @line.handler()
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls["reserve"] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    @line.handler(retry=outboxer.Retry(max_attempts=2, initial_delay=0.05, jitter=0.0))
    def charge(event: OrderPlaced, session: Session) -> None:
        line.calls["charge"] += 1
        if broken["yes"]:
            raise ValueError("card declined")
        session.add(Effect(handler="charge", message_key=str(event.order_id)))

    line.subscribe()
    line.publish(OrderPlaced(order_id=7))
    line.deliver(until=lambda: bool(line.dead()))
    line.quiet()
    [letter] = line.dead()
    assert (letter.origin, letter.consumer, letter.handler) == ("handler", line.name, "charge")
    assert letter.attempts == 2 and "retries exhausted after 2 attempts" in letter.error_message
    assert line.calls == {"reserve": 1, "charge": 2}

    broken["yes"] = False  # the fix is deployed
    outboxer.DeadLetters(line.Session).replay(letter.id)
    line.deliver(until=lambda: line.effects()["charge"] == 1)
    line.quiet()
    assert line.calls == {"reserve": 1, "charge": 3}
    assert line.effects() == {"reserve": 1, "charge": 1}
    assert line.dead() == []


def test_a_message_the_broker_delivers_twice_has_each_effect_once(line: Line) -> None:
    @line.handler()
    def reserve(event: OrderPlaced, session: Session) -> None:
        line.calls["reserve"] += 1
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    line.subscribe()
    line.publish(*[OrderPlaced(order_id=i) for i in range(5)])
    line.send_twice()
    seen = Counter[str]()
    deadline = time.monotonic() + 30
    while seen["messages"] < 10 and time.monotonic() < deadline:
        stats = line.consume()
        seen.update(messages=stats.messages, processed=stats.processed, duplicates=stats.duplicates)
    assert seen == {"messages": 10, "processed": 5, "duplicates": 5}
    assert line.effects() == {"reserve": 5} and line.calls["reserve"] == 5
    line.quiet()


def test_a_non_retryable_error_goes_straight_to_the_dead_letter_table(line: Line) -> None:
    class BadRequest(Exception):
        pass

    @line.handler(retry=outboxer.Retry(max_attempts=5, retry_on=(ConnectionError,)))
    def charge(event: OrderPlaced) -> None:
        line.calls["charge"] += 1
        raise BadRequest("customer has no card on file")

    line.subscribe()
    line.publish(OrderPlaced(order_id=1))
    line.deliver(until=lambda: bool(line.dead()))
    line.quiet()
    [letter] = line.dead()
    assert line.calls["charge"] == 1 and letter.attempts == 1
    assert "not retryable after 1 attempt" in letter.error_message


def test_malformed_messages_off_the_wire_are_dead_lettered_and_the_consumer_continues(
    line: Line,
) -> None:
    @line.handler()
    def reserve(event: OrderPlaced, session: Session) -> None:
        session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    line.subscribe()

    def envelope(
        payload: bytes, type_: str = "test.order_placed", destination: str = line.destination
    ) -> Envelope:
        return Envelope(
            message_id=outboxer.uuid7(),
            type=type_,
            destination=destination,
            payload=payload,
            occurred_at=datetime.now(timezone.utc),
        )

    # On RabbitMQ and SNS a type nobody handles is not routed to the consumer's queue (it
    # is the relay's unroutable dead letter, or SNS's filter drops it); it arrives through
    # the consumer's own exchange or topic.
    routed = isinstance(line.case, (RabbitMQCase, SNSCase))
    own = line.name if routed else line.destination
    bad = [
        envelope(b"{not json"),
        envelope(b'{"order_id": "seven"}'),
        envelope(b'{"order_id": 1}', "test.mystery", destination=own),
    ]
    results = line.case.transport.send(bad)
    assert [r.outcome for r in results] == [outboxer.transports.Outcome.SENT] * 3
    line.publish(OrderPlaced(order_id=1))
    line.deliver(until=lambda: line.effects()["reserve"] == 1 and len(line.dead()) == 3)
    line.quiet()
    letters = line.dead()
    assert {d.origin for d in letters} == {"consumer"}
    assert sorted(d.error_type for d in letters) == [
        "payload_mismatch",
        "payload_mismatch",
        "unknown_type",
    ]
    assert any(d.payload == b"{not json" for d in letters)
    assert line.effects() == {"reserve": 1}


def test_a_delayed_retry_is_not_processed_before_its_time(line: Line) -> None:
    @line.handler(retry=outboxer.Retry(max_attempts=3, initial_delay=2.0, jitter=0))
    def charge(event: OrderPlaced, context: outboxer.Context) -> None:
        line.calls[f"attempt-{context.attempt}"] += 1
        if context.attempt == 1:
            raise ConnectionError("later, please")

    line.subscribe()
    line.publish(OrderPlaced(order_id=1))
    line.send()
    line.deliver(until=lambda: line.calls["attempt-1"] == 1)
    failed_at = time.monotonic()
    while time.monotonic() - failed_at < 1.0:  # well inside the delay: nothing is due
        assert line.send() == 0 and line.consume().messages == 0
    line.deliver(until=lambda: line.calls["attempt-2"] == 1)
    assert time.monotonic() - failed_at >= 1.5
    assert line.calls == {"attempt-1": 1, "attempt-2": 1}


@pytest.mark.slow
def test_two_consumer_processes_on_one_queue_apply_each_effect_once(
    line: Line, db_url: str, case: BrokerCase
) -> None:
    if isinstance(case, SQSCase):
        broker_url = f"{case.name}://?region=us-east-1&endpoint_url={case.endpoint}"
    else:
        broker_url = RABBITMQ_URL
    total = 200
    command, env = line.inbox_process(db_url, broker_url)
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    line.send_twice()  # every message twice: both processes race for the duplicates
    workers = [spawn(command, env=env) for _ in range(2)]
    try:
        # Both running before either is stopped: a batching consumer may take every order
        # before the other has imported its modules, and a SIGTERM then kills that one.
        wait_for(
            lambda: all(" started" in output(worker) for worker in workers), 120, "both to start"
        )
        wait_for(lambda: line.effects()["reserve"] >= total, 120, "every order to be reserved")
        wait_for(lambda: line.pending() == 0, 30, "the outbox to stay empty")
    finally:
        logs = [stop(worker) for worker in workers]
    per_order = line.reservations()
    assert len(per_order) == total and set(per_order.values()) == {1}
    totals = [run_totals(log) for log in logs]
    messages, processed, duplicates = (sum(column) for column in zip(*totals, strict=True))
    assert processed == total, f"{processed} handler runs for {total} orders"
    assert messages == processed + duplicates
    print(
        f"\ntwo consumer processes: {messages} deliveries, {processed} processed, "
        f"{duplicates} duplicates skipped; per process {[t[0] for t in totals]}"
    )
