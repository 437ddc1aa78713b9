"""Consumer throughput with the inbox over the same handler transaction without it, from
RabbitMQ, on PostgreSQL, same run (target >= 0.8x).

Both read the same queue with one worker: the outboxer consumer runs the handler through
the inbox (inbox row + handler row in one transaction, then ack); the baseline decodes the
same payload, runs the same handler in a plain transaction and acks.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Integer
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outboxer
from outboxer.ids import uuid7
from outboxer.message import Envelope
from outboxer.transports import Subscription

from .common import RABBITMQ_URL, Figure, engine_for, fresh_postgres, median

EXCHANGE = f"bench-consume-{uuid.uuid4().hex[:6]}"


class _Base(DeclarativeBase):
    pass


class BenchCharge(_Base):
    __tablename__ = "bench_charges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(Integer)


@outboxer.message("bench.payment_due", destination=EXCHANGE)
@dataclass
class PaymentDue:
    order_id: int
    amount: int


def _envelopes(n: int) -> list[Envelope]:
    now = datetime.now(timezone.utc)
    return [
        Envelope(
            message_id=uuid7(),
            type="bench.payment_due",
            destination=EXCHANGE,
            payload=b'{"order_id": %d, "amount": 30}' % i,
            occurred_at=now,
        )
        for i in range(n)
    ]


def run(rounds: int = 5, messages: int = 2000) -> list[Figure]:
    with fresh_postgres() as url:
        engine = engine_for(url)
        outboxer.create_all(engine)
        _Base.metadata.create_all(engine)
        Session = sessionmaker(engine, class_=outboxer.OutboxSession)
        name = f"bench-consumer-{uuid.uuid4().hex[:6]}"
        consumer = outboxer.Consumer(Session, name=name, prefetch=200)
        done = threading.Event()
        wanted = [0]
        count = [0]

        @consumer.handler(PaymentDue)
        def charge(event: PaymentDue, session: Session) -> None:
            session.add(BenchCharge(order_id=event.order_id))
            count[0] += 1
            if count[0] >= wanted[0]:
                done.set()

        transport = outboxer.transport_from_url(RABBITMQ_URL)
        subscription = consumer.subscription()
        transport.receiver(subscription).close()  # declare the queue and its bindings
        decode = PaymentDue.__outboxer_message__.decode  # type: ignore[attr-defined]

        def with_inbox(n: int) -> float:
            wanted[0], count[0] = n, 0
            done.clear()
            started = time.perf_counter()
            runner = threading.Thread(target=consumer.run, args=(transport,))
            runner.start()
            done.wait(300)
            elapsed = time.perf_counter() - started
            consumer.stop()
            runner.join(60)
            return elapsed

        def without_inbox(n: int) -> float:
            receiver = transport.receiver(
                Subscription(queue=name, bindings=subscription.bindings, prefetch=200)
            )
            handled = 0
            started = time.perf_counter()
            while handled < n:
                for delivery in receiver.receive(200, 1.0):
                    event = decode(delivery.body)
                    with Session.begin() as session:
                        session.add(BenchCharge(order_id=event.order_id))
                    delivery.ack()
                    handled += 1
            elapsed = time.perf_counter() - started
            receiver.close()
            return elapsed

        ratios, inbox_rates, plain_rates = [], [], []
        try:
            for warm_up in (with_inbox, without_inbox):  # connections, caches, plans
                transport.send(_envelopes(200))
                warm_up(200)
            for i in range(rounds):
                order = (with_inbox, without_inbox) if i % 2 else (without_inbox, with_inbox)
                times = {}
                for measure in order:
                    transport.send(_envelopes(messages))
                    times[measure.__name__] = measure(messages)
                inbox_rates.append(messages / times["with_inbox"])
                plain_rates.append(messages / times["without_inbox"])
                ratios.append(times["without_inbox"] / times["with_inbox"])
        finally:
            transport.close()
            engine.dispose()
    ratio = median(ratios)
    return [
        Figure(
            "consumer with inbox / same handler transaction without it",
            ratio,
            "x",
            ">= 0.8x",
            ratio >= 0.8,
            f"{median(inbox_rates):,.0f} vs {median(plain_rates):,.0f} msg/s (RabbitMQ, "
            f"PostgreSQL, 1 worker), {rounds} rounds x {messages:,}",
            ratios,
        )
    ]
