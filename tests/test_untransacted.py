"""Handlers without a database transaction (``transactional=False``): the inbox row is
written after the handler returns, in its own short transaction."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import outboxer
from outboxer.store import inbox as inbox_store

from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .models import Effect, OrderPlaced
from .relaying import OUTBOXER
from .services import RABBITMQ_URL, port_open, require
from .test_consumer import Harness, SessionFactory
from .test_consumer_brokers import Line
from .test_error_channels import PaymentFailed

on_each_database = pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)


@pytest.fixture
def h(engine: Engine, Session: SessionFactory) -> Harness:
    return Harness(engine, Session)


def inbox_rows(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(outboxer.inbox.c.handler)).scalars())


def redeliver(h: Harness) -> None:
    """Deliver the handled message again, under its own id (a broker redelivery)."""
    with h.engine.connect() as conn:
        message_id = conn.execute(
            select(outboxer.inbox.c.message_id).where(
                outboxer.inbox.c.handler == "billing:send_receipt"
            )
        ).scalar_one()
    h.publish(OrderPlaced(order_id=1), message_id=message_id)
    h.deliver()


@on_each_database
def test_runs_outside_a_transaction_then_records_it_and_is_not_run_again(h: Harness) -> None:
    calls: list[tuple[int, str, bool]] = []

    @h.consumer.handler(OrderPlaced, transactional=False)
    def send_receipt(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        calls.append((event.order_id, str(context.message_id), session.in_transaction()))
        session.publish(PaymentFailed(order_id=event.order_id, reason="receipt sent"))

    received: list[PaymentFailed] = []
    h.consumer.handler(PaymentFailed)(received.append)

    h.publish(OrderPlaced(order_id=1))
    h.deliver()
    [(order, _key, in_transaction)] = calls
    assert order == 1 and not in_transaction  # no transaction held during the call
    assert sorted(inbox_rows(h.engine)) == ["billing:append", "billing:send_receipt"]
    # What it published was committed with its inbox row, after it returned.
    assert received == [PaymentFailed(order_id=1, reason="receipt sent")]

    redeliver(h)
    assert len(calls) == 1
    assert h.consumer.stats.duplicates == 1


@on_each_database
def test_a_failed_inbox_write_after_the_call_repeats_the_call(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    @h.consumer.handler(OrderPlaced, transactional=False)
    def send_receipt(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        calls.append(str(context.message_id))
        session.add(Effect(handler="send_receipt", message_key=str(event.order_id)))

    record = inbox_store.record_inbox
    failures = {"left": 1}

    def failing_once(connection: Any, **row: Any) -> bool:
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT INTO outboxer_inbox", {}, Exception("disk full"))
        return record(connection, **row)

    monkeypatch.setattr(inbox_store, "record_inbox", failing_once)
    h.publish(OrderPlaced(order_id=1))
    h.deliver()
    # The call happened twice, with the same idempotency key; its writes and the inbox
    # row once (the first run's were rolled back with its failed inbox write).
    assert len(calls) == 2 and len(set(calls)) == 1
    assert h.effects() == {"send_receipt": 1}
    assert inbox_rows(h.engine) == ["billing:send_receipt"]
    assert h.dead() == []


@on_each_database
def test_a_handler_failure_is_retried_and_records_nothing(h: Harness) -> None:
    calls: list[int] = []

    @h.consumer.handler(OrderPlaced, transactional=False)
    def send_receipt(event: OrderPlaced, context: outboxer.Context) -> None:
        calls.append(context.attempt)
        if context.attempt < 3:
            raise ConnectionError("mail server down")

    h.publish(OrderPlaced(order_id=1))
    h.deliver()
    assert calls == [1, 2, 3]
    assert inbox_rows(h.engine) == ["billing:send_receipt"]


@pytest.fixture
def rabbit_line(engine: Engine, Session: SessionFactory) -> Iterator[Line]:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
    case = RabbitMQCase()
    try:
        yield Line(engine, Session, case)
    finally:
        case.close()


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_consumer_killed_between_the_call_and_the_inbox_write_repeats_the_call(
    rabbit_line: Line, db_url: str, tmp_path: Path
) -> None:
    line = rabbit_line
    calls, crash = tmp_path / "calls", tmp_path / "crashed"

    @line.handler()
    def send_receipt(event: OrderPlaced) -> None:  # the subscription the app has
        pass

    line.subscribe()
    env = {
        **os.environ,
        "APP_DB": db_url,
        "APP_DESTINATION": line.destination,
        "APP_CONSUMER": line.name,
        "APP_CALLS": str(calls),
        "APP_CRASH": str(crash),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    inbox = str(Path(OUTBOXER).parent / "outboxer-inbox")
    command = [inbox, "tests.untransacted_app:consumer", "--broker", RABBITMQ_URL, "--once"]
    line.publish(OrderPlaced(order_id=1))
    assert line.send() == 1

    def run_once() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, check=False, env=env, capture_output=True, text=True, timeout=120
        )

    first = run_once()
    assert first.returncode == -signal.SIGKILL, first.stderr  # killed itself after the call
    assert crash.exists() and len(calls.read_text().splitlines()) == 1
    assert inbox_rows(line.engine) == []

    second = run_once()  # the message was not acknowledged: delivered again
    assert second.returncode == 0, second.stderr
    lines = calls.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]  # the same idempotency key both times
    assert inbox_rows(line.engine) == [f"{line.name}:send_receipt"]

    third = run_once()  # nothing left: the second run acknowledged it
    assert third.returncode == 0, third.stderr
    assert len(calls.read_text().splitlines()) == 2
