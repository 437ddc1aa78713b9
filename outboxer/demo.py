"""``outboxer demo``: the whole journey of a message, on SQLite and the in-process broker.

Publish inside transactions (commit, rollback, savepoint, a bad payload), relay to the
broker, consume with three handlers (one flaky, one failing for good on one order), see
a retry, a duplicate skipped, a dead letter, its replay after the fix, and the trace of
the journey when the OpenTelemetry SDK is installed.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import Integer, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from . import instrumentation, wire
from .consumer import Consumer
from .dead_letters import DeadLetters
from .errors import SerializationError
from .message import message
from .relay import Relay
from .retry import Retry
from .session import OutboxSession
from .store import relay as relay_store
from .tables import create_all, outbox
from .transports.memory import MemoryBroker, MemoryTransport


class _Base(DeclarativeBase):
    pass


class DemoOrder(_Base):
    __tablename__ = "demo_orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))


class DemoCharge(_Base):
    __tablename__ = "demo_charges"
    order_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    amount: Mapped[int] = mapped_column(Integer)


@message("demo.order_placed", destination="orders", key="order_id")
@dataclass
class OrderPlaced:
    order_id: int
    customer: str
    amount: int


def run(console: Console, directory: Path | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp, _tracing() as spans:
        path = (directory or Path(tmp)) / "outboxer-demo.sqlite"
        engine = create_engine(f"sqlite:///{path}")
        create_all(engine)
        _Base.metadata.create_all(engine)
        Session = sessionmaker(engine, class_=OutboxSession)
        broker = MemoryBroker()
        transport = MemoryTransport(broker)
        state = {"gateway_down": True, "card_blocked": True}

        billing = Consumer(
            Session,
            name="billing",
            retry=Retry(max_attempts=3, initial_delay=0.2, max_delay=0.2, jitter=0.0),
        )

        @billing.handler(OrderPlaced)
        def reserve_stock(event: OrderPlaced) -> None:
            pass

        @billing.handler(OrderPlaced)
        def charge_card(event: OrderPlaced, session: OutboxSession) -> None:
            if event.order_id == 1 and state["gateway_down"]:
                state["gateway_down"] = False
                raise ConnectionError("payment gateway timed out")
            if event.order_id == 3 and state["card_blocked"]:
                raise PermissionError(f"card of {event.customer} is blocked")
            session.add(DemoCharge(order_id=event.order_id, amount=event.amount))

        @billing.handler(OrderPlaced)
        def send_receipt(event: OrderPlaced) -> None:
            pass

        transport.receiver(billing.subscription())
        relay = Relay(engine, transport)

        console.rule("[bold]1. publish inside the ORM transaction")
        with Session.begin() as session:
            session.add(DemoOrder(id=1, customer="ada"))
            session.publish(OrderPlaced(order_id=1, customer="ada", amount=30))
        console.print("order 1 committed with its OrderPlaced: [green]stored together[/]")
        try:
            with Session.begin() as session:
                session.add(DemoOrder(id=2, customer="bob"))
                session.publish(OrderPlaced(order_id=2, customer="bob", amount=12))
                raise RuntimeError("stock check failed")
        except RuntimeError:
            console.print("order 2 rolled back: [yellow]its message is gone with it[/]")
        with Session.begin() as session:
            session.add(DemoOrder(id=3, customer="cy"))
            session.publish(OrderPlaced(order_id=3, customer="cy", amount=99))
            savepoint = session.begin_nested()
            session.publish(OrderPlaced(order_id=33, customer="cy", amount=1))
            savepoint.rollback()
        console.print("order 3 committed; a message from its rolled-back SAVEPOINT is dropped")
        try:
            with Session.begin() as session:
                session.publish(OrderPlaced(order_id=4, customer="dee", amount=object()))  # type: ignore[arg-type]
        except SerializationError as exc:
            console.print(f"a bad payload fails in the caller: [red]{exc}[/]")
        _outbox_table(console, engine)

        console.rule("[bold]2. the relay sends to the broker (publisher confirms on real brokers)")
        stats = relay.run(once=True)
        console.print(f"relay: {stats.sent} sent, outbox now holds {_count(engine)} rows")
        for sent in broker.published:
            console.print(f"  broker got [cyan]{sent.type}[/] {sent.message_id} key={sent.key}")

        console.rule("[bold]3. the consumer runs each handler in its own transaction")
        report = billing.run(transport, once=True, idle_timeout=0.05)
        console.print(
            f"consumer: {report.processed} handler runs committed, "
            f"{report.retries_scheduled} retry scheduled, {report.dead_lettered} gave up"
        )
        console.print(
            "charge_card failed on order 1 ([italic]gateway timed out[/]): only it is retried, "
            "through the outbox, after its delay"
        )
        _deliver(relay, billing, transport, until=lambda: _charged(engine) == {1})
        console.print(f"order 1 charged on the retry; charges: {sorted(_charged(engine))}")
        _deliver(relay, billing, transport, until=lambda: bool(DeadLetters(Session).list()))

        console.rule("[bold]4. a duplicate delivery changes nothing")
        first = broker.messages(type="demo.order_placed")[0]
        again = billing.process(first.payload, wire.encode_headers(first), destination="orders")
        console.print(f"redelivered order 1: {again.outcomes}")

        console.rule("[bold]5. the dead letter, the fix, the replay")
        dead = DeadLetters(Session)
        [letter] = dead.list()
        table = Table("id", "origin", "handler", "error", "attempts")
        table.add_row(
            str(letter.id),
            letter.origin,
            f"{letter.consumer}:{letter.handler}",
            f"{letter.error_type}: {letter.error_message}",
            str(letter.attempts),
        )
        console.print(table)
        state["card_blocked"] = False
        console.print("the card is unblocked (the fix is deployed); replaying to charge_card alone")
        dead.replay(letter.id)
        _deliver(relay, billing, transport, until=lambda: _charged(engine) == {1, 3})
        console.print(
            f"charges: {sorted(_charged(engine))}; reserve_stock and send_receipt did not run again"
        )

        console.rule("[bold]6. status")
        with engine.connect() as connection:
            backlog = relay_store.backlog(connection)
        console.print(
            f"outbox pending: {backlog.pending}, dead letters: {sum(dead.count().values())}, "
            f"handler runs recorded in the inbox: {_inbox_rows(engine)}"
        )
        if spans is not None:
            console.rule("[bold]7. the journey of order 3 as one trace (what Jaeger shows)")
            _print_trace(console, spans(), str(letter.message_id))
        else:
            console.print(
                "(install outboxer\\[otel] to see the journey as one OpenTelemetry trace)"
            )
        engine.dispose()


def _deliver(
    relay: Relay, consumer: Consumer, transport: MemoryTransport, until: Any, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        relay.run(once=True)
        consumer.run(transport, once=True, idle_timeout=0.05)
        time.sleep(0.05)


def _charged(engine: Any) -> set[int]:
    with engine.connect() as connection:
        return set(connection.execute(select(DemoCharge.order_id)).scalars())


def _count(engine: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(outbox)).scalar_one())


def _inbox_rows(engine: Any) -> int:
    from .tables import inbox

    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(inbox)).scalar_one())


def _outbox_table(console: Console, engine: Any) -> None:
    with engine.connect() as connection:
        rows = connection.execute(select(outbox).order_by(outbox.c.id)).mappings().all()
    table = Table(title=f"outboxer_outbox ({len(rows)} rows)")
    for column in ("id", "message_type", "destination", "key", "payload"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["message_type"],
            row["destination"],
            row["message_key"] or "",
            json.dumps(json.loads(row["payload"])),
        )
    console.print(table)


@contextlib.contextmanager
def _tracing() -> Iterator[Any]:
    """Record spans in memory when the OpenTelemetry SDK is installed."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        from .tracing import OpenTelemetryInstrumentation
    except ImportError:
        yield None
        return
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = instrumentation.install(OpenTelemetryInstrumentation(tracer_provider=provider))
    try:
        yield exporter.get_finished_spans
    finally:
        instrumentation.install(previous)


def _label(span: Any) -> str:
    kind = span.kind.name.lower()
    return span.name if kind == "internal" else f"{span.name} [dim]({kind})[/]"


def _print_trace(console: Console, spans: Any, message_id: str) -> None:
    create = next(
        s
        for s in spans
        if s.name.startswith("create")
        and (s.attributes or {}).get("messaging.message.id") == message_id
    )
    trace_id = create.context.trace_id
    journey = [s for s in spans if s.context.trace_id == trace_id]
    children: dict[int | None, list[Any]] = {}
    for span in journey:
        children.setdefault(span.parent.span_id if span.parent else None, []).append(span)
    root = Tree(f"[bold]trace {trace_id:032x}[/]")

    def add(node: Tree, parent_id: int | None) -> None:
        for span in sorted(children.get(parent_id, []), key=lambda s: s.start_time or 0):
            outcome = (span.attributes or {}).get("outboxer.handler.outcome")
            label = _label(span)
            if outcome:
                label += f" -> [bold]{outcome}[/]"
            add(node.add(label), span.context.span_id)

    top = [
        s
        for s in journey
        if s.parent is None or s.parent.span_id not in {j.context.span_id for j in journey}
    ]
    for span in top:
        add(root.add(_label(span)), span.context.span_id)
    console.print(root)
    console.print(
        "[dim]The relay's send spans are traces of their own, linked to each message's "
        "create span; in Jaeger they show as links.[/]"
    )
