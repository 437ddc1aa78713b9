"""An outboxer-inbox process killed with SIGKILL mid-run and replaced: each effect once.

On RabbitMQ and PostgreSQL (SQS would redeliver only after its visibility timeout).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from .broker_rabbitmq import RabbitMQCase, rabbitmq_address
from .models import Effect, OrderPlaced
from .services import RABBITMQ_URL, port_open, require
from .test_consumer_brokers import Line, SessionFactory
from .test_relay_brokers import OUTBOXER, spawn, stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)]


@pytest.fixture
def line(engine: Engine, Session: SessionFactory) -> Iterator[Line]:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start: rabbitmq-server -detached")
    case = RabbitMQCase()
    try:
        yield Line(engine, Session, case)
    finally:
        case.close()


def test_a_consumer_killed_mid_run_and_replaced_applies_each_effect_once(
    line: Line, db_url: str
) -> None:
    total = 2000
    env = {
        **os.environ,
        "APP_DB": db_url,
        "APP_DESTINATION": line.destination,
        "APP_CONSUMER": line.name,
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }

    @line.handler()
    def reserve(event: OrderPlaced) -> None:  # the same subscription as tests.consumer_app
        pass

    line.subscribe()
    line.publish(*[OrderPlaced(order_id=i) for i in range(total)])
    assert line.send() == total
    command = [
        str(Path(OUTBOXER).parent / "outboxer-inbox"),
        "tests.consumer_app:consumer",
        "--broker",
        RABBITMQ_URL,
        "--concurrency",
        "4",
    ]
    first = spawn(command, env=env)
    try:
        wait_for(lambda: line.effects()["reserve"] > 200, 60, "the first consumer to start")
    finally:
        first.kill()  # SIGKILL: no chance to finish, acknowledge or give anything back
        first.wait(timeout=30)
    done_at_kill = line.effects()["reserve"]
    assert done_at_kill < total, "the consumer finished before it could be killed; raise total"
    second = spawn(command, env=env)
    try:
        wait_for(lambda: line.effects()["reserve"] >= total, 120, "the replacement to finish")
    finally:
        log = stop(second)
    with line.engine.connect() as conn:
        per_order = Counter(conn.execute(select(Effect.message_key)).scalars())
    assert len(per_order) == total, f"{total - len(per_order)} orders never reserved"
    assert set(per_order.values()) == {1}, "an order was reserved twice"
    found = re.search(r": (\d+) messages, (\d+) processed, (\d+) duplicates", log)
    assert found, log
    print(
        f"\nconsumer SIGKILL after {done_at_kill}/{total}: the replacement processed "
        f"{found.group(2)} and skipped {found.group(3)} already done; each effect once"
    )
