"""Consumers through the inbox, on each database, with the in-process broker."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer import wire
from outboxer.testing import MemoryBroker, MemoryTransport

from .models import Effect, OrderPlaced, OrderShipped

SessionFactory = sessionmaker[outboxer.OutboxSession]
QUICK = outboxer.Retry(max_attempts=5, initial_delay=0.05, max_delay=0.05, jitter=0.0)


@outboxer.message("test.refund_requested", destination="orders", dedup_key="order_id")
@dataclass
class RefundRequested:
    order_id: int


class Harness:
    """A broker, a relay and a consumer in one process: publish, then deliver()."""

    def __init__(self, engine: Engine, Session: SessionFactory, name: str = "billing") -> None:
        self.engine = engine
        self.Session = Session
        self.broker = MemoryBroker()
        self.transport = MemoryTransport(self.broker)
        self.relay = outboxer.Relay(engine, self.transport, poll_interval=0.05)
        self.consumer = outboxer.Consumer(Session, name=name, retry=QUICK)
        self.calls: Counter[str] = Counter()

    def effect(self, handler: str, session: Session, key: object) -> None:
        self.calls[handler] += 1
        session.add(Effect(handler=handler, message_key=str(key)))

    def publish(self, *events: Any, **options: Any) -> None:
        with self.Session.begin() as session:
            for event in events:
                session.publish(event, **options)

    def send(self) -> int:
        """Relay what is due (the consumer's queue and bindings declared first)."""
        self.transport.receiver(self.consumer.subscription())
        return self.relay.run(once=True).sent

    def deliver(self, until: Callable[[], bool] | None = None, timeout: float = 15.0) -> None:
        """Relay and consume until nothing moves (or ``until`` holds), within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent = self.send()
            consumed = self.consumer.run(self.transport, once=True, idle_timeout=0.05).messages
            if until is not None:
                if until():
                    return
            elif not sent and not consumed and self._nothing_pending():
                return
            time.sleep(0.02)
        raise AssertionError("messages still moving at the deadline")

    def _nothing_pending(self) -> bool:
        with self.engine.connect() as conn:
            return not conn.execute(select(func.count()).select_from(outboxer.outbox)).scalar()

    def effects(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(conn.execute(select(Effect.handler)).scalars())

    def dead(self) -> list[outboxer.DeadLetter]:
        return outboxer.DeadLetters(self.Session).list()


@pytest.fixture
def h(engine: Engine, Session: SessionFactory) -> Harness:
    return Harness(engine, Session)


def test_a_failing_handler_is_retried_alone_while_the_others_run_once(h: Harness) -> None:
    failures = {"left": 2}

    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        h.effect("reserve", session, event.order_id)

    @h.consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced, session: Session) -> None:
        h.calls["charge"] += 1
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("payment gateway timed out")
        session.add(Effect(handler="charge", message_key=str(event.order_id)))

    @h.consumer.handler(OrderPlaced)
    def notify(event: OrderPlaced, session: Session) -> None:
        h.effect("notify", session, event.order_id)

    h.publish(OrderPlaced(order_id=1))
    h.deliver(until=lambda: h.effects()["charge"] == 1)
    h.deliver()
    assert h.calls == {"reserve": 1, "charge": 3, "notify": 1}
    assert h.effects() == {"reserve": 1, "charge": 1, "notify": 1}
    assert h.dead() == []


def test_exhausted_retries_dead_letter_then_a_replay_runs_only_that_handler(h: Harness) -> None:
    broken = {"yes": True}
    h.consumer.retry = outboxer.Retry(max_attempts=2, initial_delay=0.05, max_delay=0.05)

    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        h.effect("reserve", session, event.order_id)

    @h.consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=2, initial_delay=0.05))
    def charge(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        h.calls["charge"] += 1
        if broken["yes"]:
            raise ValueError(f"card declined (attempt {context.attempt})")
        session.add(Effect(handler="charge", message_key=str(event.order_id)))

    h.publish(OrderPlaced(order_id=7))
    h.deliver(until=lambda: bool(h.dead()))
    h.deliver()
    [letter] = h.dead()
    assert (letter.origin, letter.consumer, letter.handler) == ("handler", "billing", "charge")
    assert letter.error_type == "ValueError"
    assert "card declined (attempt 2)" in letter.error_message
    assert "retries exhausted after 2 attempts" in letter.error_message
    assert letter.attempts == 2 and "Traceback" in (letter.traceback or "")
    assert letter.first_failed_at <= letter.last_failed_at
    assert json.loads(letter.payload) == {"order_id": 7, "customer": "ada"}
    assert h.calls["charge"] == 2

    broken["yes"] = False  # the fix is deployed
    outboxer.DeadLetters(h.Session).replay(letter.id)
    h.deliver()
    assert h.calls == {"reserve": 1, "charge": 3}
    assert h.effects() == {"reserve": 1, "charge": 1}
    assert h.dead() == []


def test_the_same_message_delivered_twice_has_each_effect_once(h: Harness) -> None:
    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        h.effect("reserve", session, event.order_id)

    @h.consumer.handler(OrderPlaced)
    def notify(event: OrderPlaced, session: Session) -> None:
        h.effect("notify", session, event.order_id)

    h.publish(OrderPlaced(order_id=1))
    h.send()
    [sent] = h.broker.published
    body, headers = sent.payload, wire.encode_headers(sent)
    first = h.consumer.process(body, headers, destination="orders")
    second = h.consumer.process(body, headers, destination="orders")
    assert first.outcomes == {"reserve": "processed", "notify": "processed"}
    assert second.outcomes == {"reserve": "duplicate", "notify": "duplicate"}
    assert h.effects() == {"reserve": 1, "notify": 1}


def test_a_non_retryable_error_goes_straight_to_the_dead_letter_table(h: Harness) -> None:
    class BadRequest(Exception):
        pass

    retry = outboxer.Retry(max_attempts=5, initial_delay=0.05, retry_on=(ConnectionError,))

    @h.consumer.handler(OrderPlaced, retry=retry)
    def charge(event: OrderPlaced) -> None:
        h.calls["charge"] += 1
        raise BadRequest("customer has no card on file")

    h.publish(OrderPlaced(order_id=1))
    h.deliver()
    [letter] = h.dead()
    assert h.calls["charge"] == 1
    assert letter.attempts == 1
    assert letter.error_type.endswith("BadRequest")
    assert "not retryable after 1 attempt" in letter.error_message


def test_malformed_messages_are_dead_lettered_and_the_consumer_continues(h: Harness) -> None:
    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session) -> None:
        h.effect("reserve", session, event.order_id)

    @h.consumer.handler(OrderShipped)
    def ship(event: OrderShipped) -> None:
        h.calls["ship"] += 1

    h.publish(OrderPlaced(order_id=1))
    h.send()
    [good] = h.broker.published
    headers = wire.encode_headers(good)
    bad_cases = {
        "not JSON": (b"{not json", headers),
        "missing envelope": (good.payload, {"outboxer-type": "test.order_placed"}),
        "unknown type": (good.payload, {**headers, "outboxer-type": "test.mystery"}),
        "payload mismatch": (b'{"order_id": "seven"}', headers),
        "shipped payload wrong": (
            b'{"order_id": 1}',
            {
                **headers,
                "outboxer-type": "test.order_shipped",
                "outboxer-id": str(outboxer.uuid7()),
            },
        ),
    }
    for body, bad_headers in bad_cases.values():
        report = h.consumer.process(body, bad_headers, destination="orders")
        assert report.rejected is not None and report.outcomes == {}
    report = h.consumer.process(good.payload, headers, destination="orders")
    assert report.outcomes == {"reserve": "processed"}
    letters = h.dead()
    assert len(letters) == len(bad_cases)
    assert {d.origin for d in letters} == {"consumer"}
    assert sorted(d.error_type for d in letters) == sorted(
        [
            "payload_mismatch",
            "malformed_envelope",
            "unknown_type",
            "payload_mismatch",
            "payload_mismatch",
        ]
    )
    assert any(d.payload == b"{not json" for d in letters)
    assert h.calls["ship"] == 0 and h.effects() == {"reserve": 1}


def test_a_delayed_retry_is_not_processed_before_its_time(h: Harness) -> None:
    @h.consumer.handler(
        OrderPlaced, retry=outboxer.Retry(max_attempts=3, initial_delay=2.0, jitter=0)
    )
    def charge(event: OrderPlaced, context: outboxer.Context) -> None:
        h.calls[f"attempt-{context.attempt}"] += 1
        if context.attempt == 1:
            raise ConnectionError("later, please")

    h.publish(OrderPlaced(order_id=1))
    h.send()
    failed_at = time.monotonic()
    h.consumer.run(h.transport, once=True, idle_timeout=0.05)
    assert h.calls == {"attempt-1": 1}
    with h.engine.connect() as conn:
        [row] = conn.execute(select(outboxer.outbox)).mappings().all()
    assert (row["target_handler"], row["handler_attempt"], row["message_key"]) == (
        "billing:charge",
        2,
        None,
    )
    while time.monotonic() - failed_at < 1.5:  # well inside the delay: nothing is due
        assert h.send() == 0
        time.sleep(0.1)
    h.deliver(until=lambda: h.calls["attempt-2"] == 1)
    assert time.monotonic() - failed_at >= 1.9


def test_instant_retries_run_in_process_without_the_outbox(h: Harness) -> None:
    @h.consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=3, instant=2))
    def charge(event: OrderPlaced, context: outboxer.Context) -> None:
        h.calls["charge"] += 1
        if context.attempt < 3:
            raise ConnectionError("flaky")

    h.publish(OrderPlaced(order_id=1))
    h.send()
    report = h.consumer.run(h.transport, once=True, idle_timeout=0.05)
    assert h.calls["charge"] == 3 and report.processed == 1
    assert h._nothing_pending()


def test_messages_published_by_a_handler_carry_causation_and_correlation(h: Harness) -> None:
    @h.consumer.handler(OrderPlaced)
    def ship(event: OrderPlaced, session: outboxer.OutboxSession) -> None:
        session.publish(
            {"order_id": event.order_id}, type="test.label_printed", destination="labels"
        )

    h.publish(OrderPlaced(order_id=1), correlation_id="checkout-42")
    h.deliver()
    placed, printed = h.broker.published
    assert printed.type == "test.label_printed"
    assert printed.causation_id == str(placed.message_id)
    assert printed.correlation_id == "checkout-42" == placed.correlation_id


def test_a_business_key_deduplicates_different_messages(h: Harness) -> None:
    @h.consumer.handler(RefundRequested)
    def refund(event: RefundRequested, session: Session) -> None:
        h.effect("refund", session, event.order_id)

    h.publish(RefundRequested(order_id=5), RefundRequested(order_id=5), RefundRequested(order_id=6))
    h.deliver()
    assert h.calls["refund"] == 2
    assert h.effects() == {"refund": 2}


def test_two_consumers_on_one_queue_apply_each_effect_once(h: Harness) -> None:
    second = outboxer.Consumer(h.Session, name="billing", retry=QUICK)
    for consumer in (h.consumer, second):

        @consumer.handler(OrderPlaced)
        def reserve(event: OrderPlaced, session: Session) -> None:
            session.add(Effect(handler="reserve", message_key=str(event.order_id)))

    h.transport.receiver(h.consumer.subscription())
    h.publish(*[OrderPlaced(order_id=i) for i in range(40)])
    h.send()
    # The same 40 messages delivered a second time: both consumers race, the inbox decides.
    for sent in h.broker.published:
        h.broker.inject("billing", sent.payload, wire.encode_headers(sent), "orders")
    threads = [
        threading.Thread(target=c.run, args=(h.transport,), kwargs={"once": True, "concurrency": 4})
        for c in (h.consumer, second)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    with h.engine.connect() as conn:
        keys = Counter(conn.execute(select(Effect.message_key)).scalars())
    assert len(keys) == 40 and set(keys.values()) == {1}
    assert h.consumer.stats.duplicates + second.stats.duplicates == 40


def test_inbox_rows_past_retention_are_pruned(h: Harness) -> None:
    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced) -> None:
        pass

    h.publish(*[OrderPlaced(order_id=i) for i in range(5)])
    h.deliver()
    two_hours_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    with h.engine.begin() as conn:
        keys = conn.execute(select(outboxer.inbox.c.dedup_key).limit(3)).scalars().all()
        conn.execute(
            update(outboxer.inbox)
            .where(outboxer.inbox.c.dedup_key.in_(keys))
            .values(processed_at=two_hours_ago)
        )
    h.consumer.inbox_retention = 3600
    assert h.consumer.prune() == (3, 0)
    h.consumer.inbox_retention = 0
    assert h.consumer.prune() == (2, 0)


def test_configuration_mistakes_fail_at_start_up(Session: SessionFactory) -> None:
    consumer = outboxer.Consumer(Session, name="c")
    with pytest.raises(outboxer.ConfigurationError, match="parameter 'amount'"):

        @consumer.handler(OrderPlaced)
        def bad_signature(event: OrderPlaced, amount: int) -> None: ...

    with pytest.raises(outboxer.ConfigurationError, match=r"async def.*sync session factory"):

        @consumer.handler(OrderPlaced)
        async def wrong_kind(event: OrderPlaced) -> None: ...

    @consumer.handler(OrderPlaced)
    def charge(event: OrderPlaced) -> None: ...

    with pytest.raises(outboxer.ConfigurationError, match="already has a handler named 'charge'"):
        consumer.handler(OrderPlaced)(charge)
    with pytest.raises(outboxer.ConfigurationError, match="destination="):
        consumer.handler("some.dict_type")(lambda event: None)
    with pytest.raises(outboxer.RetryConfigError, match=r"instant=3.*max_attempts"):
        outboxer.Retry(max_attempts=3, instant=3)
    with pytest.raises(outboxer.RetryConfigError, match="exception classes"):
        outboxer.Retry(retry_on=("ValueError",))  # type: ignore[arg-type]
    plain = sessionmaker(Session.kw["bind"])
    with pytest.raises(outboxer.ConfigurationError, match="OutboxSession"):
        outboxer.Consumer(plain, name="c")
    with pytest.raises(outboxer.ConfigurationError, match="no handlers"):
        outboxer.Consumer(Session, name="empty").run(MemoryTransport(MemoryBroker()), once=True)


def test_a_slow_handler_has_its_delivery_extended(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from outboxer.transports import memory

    extended: list[float] = []
    monkeypatch.setattr(memory._MemoryDelivery, "extend", lambda self, s: extended.append(s))

    @h.consumer.handler(OrderPlaced)
    def slow(event: OrderPlaced) -> None:
        deadline = time.monotonic() + 5
        while not extended and time.monotonic() < deadline:
            time.sleep(0.02)

    h.publish(OrderPlaced(order_id=1))
    h.send()
    stats = h.consumer.run(
        h.transport, once=True, idle_timeout=0.05, extend_after=0.1, extend_by=30
    )
    assert stats.processed == 1
    assert extended and extended[0] == 30
