"""Faults under a running ``outboxer-inbox`` process, on RabbitMQ and PostgreSQL: the
process killed with SIGKILL and replaced, and PostgreSQL restarted under it. Each effect
happens once. (SQS would redeliver only after its visibility timeout: RabbitMQ only.)

The database restart restarts the shared test server; other tests' engines reconnect.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .models import OrderPlaced
from .relaying import spawn, start_relay, stop, wait_for
from .services import RABBITMQ_URL, port_open, require
from .test_consumer_brokers import Line, SessionFactory, run_totals
from .test_faults_database import reachable, restart_postgresql

pytestmark = [
    pytest.mark.slow,
    pytest.mark.disruptive,
    pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True),
]


@pytest.fixture
def line(engine: Engine, Session: SessionFactory) -> Iterator[Line]:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
    case = RabbitMQCase()
    try:
        yield Line(engine, Session, case)
    finally:
        case.close()


def reserved(line: Line) -> int:
    """Orders reserved so far, or -1 while the database cannot be reached."""
    try:
        return len(line.reservations())
    except Exception:
        return -1


def assert_each_order_reserved_once(line: Line, total: int) -> None:
    per_order = line.reservations()
    assert len(per_order) == total, f"{total - len(per_order)} orders never reserved"
    assert set(per_order.values()) == {1}, "an order was reserved twice"


def test_a_consumer_killed_mid_run_and_replaced_applies_each_effect_once(
    line: Line, db_url: str
) -> None:
    total = 2000
    command, env = line.inbox_process(db_url, RABBITMQ_URL)
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    assert line.send() == total
    first = spawn(command, env=env)
    try:
        wait_for(lambda: reserved(line) > 200, 60, "the first consumer to start")
    finally:
        first.kill()  # SIGKILL: no chance to finish, acknowledge or give anything back
        first.wait(timeout=30)
    done_at_kill = reserved(line)
    assert done_at_kill < total, "the consumer finished before it could be killed; raise total"
    second = spawn(command, env=env)
    try:
        wait_for(lambda: reserved(line) >= total, 120, "the replacement to finish")
    finally:
        log = stop(second)
    assert_each_order_reserved_once(line, total)
    _, processed, duplicates = run_totals(log)
    print(
        f"\nconsumer SIGKILL after {done_at_kill}/{total}: the replacement processed "
        f"{processed} and skipped {duplicates} already done; each effect once"
    )


def test_a_database_restart_under_a_consumer_applies_each_effect_once(
    line: Line, db_url: str
) -> None:
    total = 3000
    command, env = line.inbox_process(db_url, RABBITMQ_URL)
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    assert line.send() == total
    # As deployed: a relay beside the consumer (a handler run that failed during the
    # restart is retried through the outbox).
    relay = start_relay(db_url, RABBITMQ_URL, "--poll-interval", "0.2")
    consumer = spawn(command, env=env)
    handled = False
    try:
        wait_for(lambda: reserved(line) > 200, 60, "the consumer to start")
        restart_postgresql()
        wait_for(lambda: reachable(line.engine), 60, "PostgreSQL to come back")
        wait_for(lambda: reserved(line) >= total, 240, "every message to be handled")
        handled = True
    finally:
        # SIGTERM lets the messages in progress finish, so what is counted below is final.
        log = stop(consumer)
        relay_log = stop(relay)
        if not handled:  # what the processes saw, for the failure report
            print(f"\n--- outboxer-inbox ---\n{log[-8000:]}\n--- relay ---\n{relay_log[-4000:]}")
    assert_each_order_reserved_once(line, total)
    assert "keeping it and trying again" in log, "the consumer should have seen the restart"
    print(f"\ndatabase restart under a consumer: {total} orders, each reserved once")
