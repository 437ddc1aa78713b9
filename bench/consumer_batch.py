"""The default ``outboxer-inbox`` (concurrency 4, batching on) over a hand-written pika
consumer that commits one transaction per message without an inbox, on PostgreSQL and
RabbitMQ, same run (target >= 1.5x).

Every round loads the same queue with the same messages (outboxer's envelope, sent with
publisher confirms, so the broker holds them all before the clock starts), then one
contestant drains it; the clock stops when the database holds every handler row
(committed, polled every 10 ms). Contestants alternate order from round to round, and
everything runs twice: with durable commits, and with ``synchronous_commit=off``:

* ``hand-written``: pika ``BlockingConnection``, ``basic_consume`` with the prefetch
  outboxer uses, per message: ``json.loads``, one ``Session.begin()`` with the handler's
  INSERT, commit, ``basic_ack``;
* ``outboxer``: ``Consumer.run(concurrency=4)``, the settings ``outboxer-inbox`` runs
  with by default (batching on, ``batch_size`` 20);
* ``outboxer, no batching``: the same with ``batch_size=1``, to show what batching does.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pika
from sqlalchemy import Integer, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import outboxer
from outboxer.ids import uuid7
from outboxer.message import Envelope

from .common import RABBITMQ_URL, Figure, console, engine_for, fresh_postgres, median
from .cpu import seconds_of

EXCHANGE = f"bench-batch-{uuid.uuid4().hex[:6]}"
TARGET = 1.5


class _Base(DeclarativeBase):
    pass


class BatchCharge(_Base):
    __tablename__ = "bench_batch_charges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(Integer)


@outboxer.message("bench.invoice_due", destination=EXCHANGE)
@dataclass
class InvoiceDue:
    order_id: int
    amount: int


def _envelopes(n: int) -> list[Envelope]:
    now = datetime.now(timezone.utc)
    return [
        Envelope(
            message_id=uuid7(),
            type="bench.invoice_due",
            destination=EXCHANGE,
            payload=b'{"order_id": %d, "amount": 30}' % i,
            occurred_at=now,
        )
        for i in range(n)
    ]


def _rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(BatchCharge)).scalar_one())


def _wait_for_rows(engine: Engine, n: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while _rows(engine) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} messages not handled within {timeout:.0f} s")
        time.sleep(0.01)


def hand_written(engine: Engine, queue: str, n: int, prefetch: int) -> float:
    """pika basic_consume; one transaction per message, ack after commit; no inbox."""
    Plain = sessionmaker(engine)
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)
    handled = [0]

    def on_message(ch: object, method: object, _properties: object, body: bytes) -> None:
        event = InvoiceDue(**json.loads(body))
        with Plain.begin() as session:
            session.add(BatchCharge(order_id=event.order_id))
        channel.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
        handled[0] += 1
        if handled[0] >= n:
            channel.stop_consuming()

    started = time.perf_counter()
    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    _wait_for_rows(engine, n)
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def with_outboxer(consumer: outboxer.Consumer, transport: object, engine: Engine, n: int) -> float:
    """``Consumer.run(concurrency=4)``, as ``outboxer-inbox`` runs it by default."""
    started = time.perf_counter()
    runner = threading.Thread(target=consumer.run, args=(transport,), kwargs={"concurrency": 4})
    runner.start()
    _wait_for_rows(engine, n)
    elapsed = time.perf_counter() - started
    consumer.stop()
    runner.join(60)
    return elapsed


def run(rounds: int = 7, messages: int = 3000) -> list[Figure]:
    """Both commit regimes: durable commits (the default), then ``synchronous_commit=off``
    on every connection of every contestant (a commit without the WAL flush wait), since
    which one dominates decides how much batching commits saves."""
    figures: list[Figure] = []
    with fresh_postgres() as url:
        for fast in (False, True):
            figures += _measure(url, fast, rounds, messages)
    return figures


def _measure(url: str, fast: bool, rounds: int, messages: int) -> list[Figure]:
    options = {"connect_args": {"options": "-c synchronous_commit=off"}} if fast else {}
    regime = "synchronous_commit=off" if fast else "durable commits"
    engine = engine_for(url, **options)
    outboxer.create_all(engine)
    _Base.metadata.create_all(engine)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    name = f"bench-batch-{uuid.uuid4().hex[:6]}"
    consumers = {}
    for label, size in (("outboxer", None), ("outboxer, no batching", 1)):
        settings = {} if size is None else {"batch_size": size}
        consumer = outboxer.Consumer(Session, name=name, **settings)  # type: ignore[arg-type]

        @consumer.handler(InvoiceDue)
        def charge(event: InvoiceDue, session: Session) -> None:
            session.add(BatchCharge(order_id=event.order_id))

        consumers[label] = consumer
    default = consumers["outboxer"]
    transport = outboxer.transport_from_url(RABBITMQ_URL)
    transport.receiver(default.subscription()).close()  # the queue and its bindings
    contestants: dict[str, Callable[[int], float]] = {
        "hand-written": lambda n: hand_written(engine, name, n, default.prefetch_for(4)),
        **{
            label: (lambda n, c=consumer: with_outboxer(c, transport, engine, n))
            for label, consumer in consumers.items()
        },
    }
    console.print(f"  [bold]{regime}[/]")
    calibration = [_commits_per_second(engine)]
    rates: dict[str, list[float]] = {label: [] for label in contestants}
    cpu: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label in contestants}
    ratios: list[float] = []
    unbatched: list[float] = []
    try:
        for measure in contestants.values():  # connections, caches, plans
            _load(transport, engine, 300)
            measure(300)
        labels = list(contestants)
        for i in range(rounds):
            order = labels[i % len(labels) :] + labels[: i % len(labels)]
            elapsed = {}
            for label in order:
                _load(transport, engine, messages)
                before = _cpu(engine)
                elapsed[label] = contestants[label](messages)
                after = _cpu(engine)
                rates[label].append(messages / elapsed[label])
                for side in (0, 1):
                    cpu[label][side].append((after[side] - before[side]) / messages * 1000)
            ratios.append(elapsed["hand-written"] / elapsed["outboxer"])
            unbatched.append(elapsed["hand-written"] / elapsed["outboxer, no batching"])
            console.print(
                f"  round {i + 1}: "
                + ", ".join(f"{label} {rates[label][-1]:,.0f}/s" for label in labels)
            )
        calibration.append(_commits_per_second(engine))
    finally:
        transport.close()
        engine.dispose()
    ratio = median(ratios)
    detail = ", ".join(f"{label} {median(r):,.0f} msg/s" for label, r in rates.items())
    detail += "; CPU ms per message (this process + PostgreSQL): " + ", ".join(
        f"{label} {median(c[0]):.2f} + {median(c[1]):.2f}" for label, c in cpu.items()
    )
    detail += (
        f"; ratios {min(ratios):.2f}-{max(ratios):.2f}x; one-row commits/s on one "
        f"connection before/after: {calibration[0]:,.0f}/{calibration[1]:,.0f}, load "
        f"average {os.getloadavg()[0]:.1f}"
    )
    return [
        Figure(
            f"outboxer-inbox (default) / hand-written pika consumer, no inbox ({regime})",
            ratio,
            "x",
            f">= {TARGET}x",
            ratio >= TARGET,
            f"{detail} (RabbitMQ, PostgreSQL, concurrency 4), {rounds} rounds x {messages:,}",
            ratios,
        ),
        Figure(
            f"the same without batching (batch_size=1) / hand-written ({regime})",
            median(unbatched),
            "x",
            "",
            True,
            "for comparison",
            unbatched,
        ),
    ]


def _cpu(engine: Engine) -> tuple[float, float]:
    """CPU seconds used so far by this process and by the PostgreSQL backends of the
    bench database (from /proc: the server runs on this machine; 0 where unreadable)."""
    with engine.connect() as conn:
        pids = conn.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        ).scalars()
        server = sum(seconds_of(pid) for pid in pids)
    return time.process_time(), server


def _commits_per_second(engine: Engine, seconds: float = 1.0) -> float:
    """Calibration: one-row INSERT + COMMIT round trips per second on one connection."""
    with engine.connect() as conn:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            conn.execute(BatchCharge.__table__.insert().values(order_id=-1))
            conn.commit()
            count += 1
        conn.execute(text(f"TRUNCATE {BatchCharge.__tablename__}"))
        conn.commit()
        return count / (time.perf_counter() - started)


def _load(transport: object, engine: Engine, n: int) -> None:
    """Empty the handler table, then put ``n`` messages in the queue (confirmed)."""
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {BatchCharge.__tablename__}"))
    sent = 0
    for start in range(0, n, 1000):
        batch = _envelopes(min(1000, n - start))
        results = transport.send(batch)  # type: ignore[attr-defined]
        sent += sum(1 for r in results if r.outcome.value == "sent")
    if sent != n:
        raise RuntimeError(f"only {sent} of {n} messages reached the broker")
