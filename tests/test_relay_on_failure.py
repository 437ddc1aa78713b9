"""The relay's error channel: ``Relay(on_failure=...)`` for the messages it dead-letters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.cli import main
from outboxer.retry import Backoff
from outboxer.testing import MemoryBroker, MemoryTransport
from outboxer.transports import SendResult

from . import relay_alerts
from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .models import OrderPlaced
from .services import port_open, require

SessionFactory = sessionmaker[outboxer.OutboxSession]
FAST = Backoff(initial=0.01, multiplier=1.0, max_delay=0.01, jitter=0.0)

on_each_database = pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)


@outboxer.message("test.undeliverable", destination="ops")
@dataclass
class Undeliverable:
    message_id: str
    reason: str


def publish(Session: SessionFactory, *events: Any, **options: Any) -> None:
    with Session.begin() as session:
        for event in events:
            session.publish(event, **options)


def outbox_types(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(outboxer.outbox.c.message_type)).scalars())


@on_each_database
def test_on_failure_gets_each_dead_lettered_message_and_can_publish_a_compensation(
    engine: Engine, Session: SessionFactory
) -> None:
    failures: list[outboxer.SendFailure] = []

    def on_failure(failure: outboxer.SendFailure, session: Session) -> None:
        failures.append(failure)
        session.publish(Undeliverable(str(failure.message_id), failure.error_type))

    broker = MemoryBroker()
    relay = outboxer.Relay(
        engine, MemoryTransport(broker), backoff=FAST, max_attempts=2, on_failure=on_failure
    )
    publish(Session, OrderPlaced(order_id=1), OrderPlaced(order_id=2))
    broker.fail_next(1, SendResult.rejected("too_large", "message too large"))
    relay.run(once=True)
    [failure] = failures
    assert (failure.error_type, failure.attempts, failure.destination) == ("too_large", 1, "orders")
    assert failure.message_type == "test.order_placed"
    [letter] = outboxer.DeadLetters(Session).list()
    assert letter.message_id == failure.message_id  # stored before the callback ran
    # The compensation went through the outbox and out with the next batch.
    relay.run(once=True)
    assert [m.type for m in broker.published] == ["test.order_placed", "test.undeliverable"]
    assert outbox_types(engine) == []


@on_each_database
def test_a_raising_on_failure_is_logged_and_the_relay_carries_on(
    engine: Engine, Session: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(failure: outboxer.SendFailure) -> None:
        raise RuntimeError("pager unreachable")

    broker = MemoryBroker()
    relay = outboxer.Relay(engine, MemoryTransport(broker), on_failure=broken)
    publish(Session, OrderPlaced(order_id=1), OrderPlaced(order_id=2))
    broker.fail_next(1, SendResult.rejected("too_large", "message too large"))
    stats = relay.run(once=True)
    assert (stats.sent, stats.dead_lettered) == (1, 1)
    assert len(outboxer.DeadLetters(Session).list()) == 1
    assert "on_failure raised" in caplog.text and "pager unreachable" in caplog.text


@on_each_database
def test_on_failure_mistakes_raise_at_construction(engine: Engine) -> None:
    transport = MemoryTransport(MemoryBroker())

    async def async_alert(failure: outboxer.SendFailure) -> None: ...

    for wrong in (async_alert, lambda failure, pager: None, lambda: None, "alerts"):
        with pytest.raises(outboxer.ConfigurationError, match="on_failure"):
            outboxer.Relay(engine, transport, on_failure=wrong)  # type: ignore[arg-type]


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_an_unroutable_message_on_rabbitmq_reaches_on_failure(
    engine: Engine, Session: SessionFactory
) -> None:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
    case = RabbitMQCase()
    try:
        destination = case.unroutable_destination()
        failures: list[outboxer.SendFailure] = []
        relay = outboxer.Relay(
            engine, case.transport, unroutable_attempts=1, on_failure=failures.append
        )
        publish(Session, OrderPlaced(order_id=1), destination=destination)
        relay.run(once=True)
        assert [(f.error_type, f.destination) for f in failures] == [("unroutable", destination)]
    finally:
        case.close()


def test_outboxer_relay_on_failure_names_the_callback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    engine = create_engine(url)
    outboxer.create_all(engine)
    publish(sessionmaker(engine, class_=outboxer.OutboxSession), OrderPlaced(order_id=1))
    engine.dispose()
    MemoryBroker.named("cli-on-failure").fail_next(
        1, SendResult.rejected("too_large", "message too large")
    )
    relay_alerts.received.clear()
    command = ["relay", "--broker", "memory://cli-on-failure", "--once"]
    result = CliRunner().invoke(
        main,
        [*command, "--on-failure", "tests.relay_alerts:undeliverable"],
        env={"OUTBOXER_DB": url},
    )
    assert result.exit_code == 0, result.output
    assert [(f.error_type, f.message_type) for f in relay_alerts.received] == [
        ("too_large", "test.order_placed")
    ]
    for target, problem in (
        ("tests.relay_alerts:not_a_function", "is int, not a function"),
        ("tests.relay_alerts", "is not PACKAGE.MODULE:ATTRIBUTE"),
        ("tests.no_such_module:f", "cannot import 'tests.no_such_module'"),
    ):
        result = CliRunner().invoke(
            main, [*command, "--on-failure", target], env={"OUTBOXER_DB": url}
        )
        assert result.exit_code == 2 and problem in result.output, result.output
