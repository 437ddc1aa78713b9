"""Two consumers of one event on AWS: through SNS each processes every message; sharing a
plain SQS queue they split them, and are warned at start-up."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.transports import Transport

from .models import Effect, OrderPlaced

DATABASES = pytest.mark.parametrize("db_kind", ["postgresql", "sqlite"], indirect=True)

ORDERS = 6
BIN = Path(sys.executable).parent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sns(moto_endpoint: str) -> Iterator[Transport]:
    with outboxer.transport_from_url(
        f"sns://?region=us-east-1&endpoint_url={moto_endpoint}"
    ) as transport:
        yield transport


@pytest.fixture
def sqs(moto_endpoint: str) -> Iterator[Transport]:
    with outboxer.transport_from_url(
        f"sqs://?region=us-east-1&endpoint_url={moto_endpoint}"
    ) as transport:
        yield transport


def consumers(
    Session: sessionmaker[outboxer.OutboxSession], destination: str
) -> list[outboxer.Consumer]:
    """billing and audit, both handling OrderPlaced from ``destination``."""
    made = []
    for role in ("billing", "audit"):
        consumer = outboxer.Consumer(Session, name=unique(role))

        def handle(event: OrderPlaced, session: Session, role: str = role) -> None:
            session.add(Effect(handler=role, message_key=str(event.order_id)))

        consumer.handler(OrderPlaced, destination=destination, name=f"record_{role}")(handle)
        made.append(consumer)
    return made


def effects(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(Effect.handler)).scalars())


def run_until(
    transport: Transport, team: list[outboxer.Consumer], done: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, "the consumers did not get there in time"
        for consumer in team:
            consumer.run(transport, once=True, idle_timeout=0.5)


@DATABASES
@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
def test_two_consumers_through_sns_each_process_every_message(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    sns: Transport,
    fifo: bool,
) -> None:
    topic = unique("orders") + (".fifo" if fifo else "")
    team = consumers(Session, topic)
    for consumer in team:  # as outboxer-inbox does at start: queues, topics, subscriptions
        sns.receiver(consumer.subscription()).close()
    with Session.begin() as session:
        for order in range(ORDERS):
            session.publish(OrderPlaced(order_id=order), destination=topic, key=f"c{order % 2}")
    assert outboxer.Relay(engine, sns).run(once=True).sent == ORDERS
    run_until(sns, team, lambda: effects(engine) == {"billing": ORDERS, "audit": ORDERS})
    for consumer in team:
        assert consumer.run(sns, once=True, idle_timeout=0.5).messages == 0
    with engine.connect() as conn:
        keys = conn.execute(select(Effect.handler, Effect.message_key)).all()
    assert sorted(keys) == sorted(
        (role, str(order)) for role in ("billing", "audit") for order in range(ORDERS)
    )


@DATABASES
def test_consumers_sharing_a_plain_sqs_queue_split_it_and_are_warned_once(
    engine: Engine,
    Session: sessionmaker[outboxer.OutboxSession],
    sqs: Transport,
    caplog: pytest.LogCaptureFixture,
) -> None:
    queue = unique("orders")
    billing, audit = consumers(Session, queue)
    caplog.set_level(logging.WARNING, logger="outboxer")
    sqs.receiver(billing.subscription()).close()
    assert not [r for r in caplog.records if "sns://" in r.getMessage()]
    sqs.receiver(audit.subscription()).close()
    sqs.receiver(audit.subscription()).close()  # a restart or reconnection: no second line
    warnings = [r.getMessage() for r in caplog.records if "sns://" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"SQS queue {queue!r}" in warnings[0]
    assert repr(billing.name) in warnings[0] and "sns://" in warnings[0]
    with Session.begin() as session:
        for order in range(ORDERS):
            session.publish(OrderPlaced(order_id=order), destination=queue)
    assert outboxer.Relay(engine, sqs).run(once=True).sent == ORDERS
    run_until(sqs, [billing, audit], lambda: sum(effects(engine).values()) == ORDERS)
    # Point to point: each order went to one of them (which is what the warning is about).
    assert effects(engine)["billing"] + effects(engine)["audit"] == ORDERS


SHARING_APP = """
import os
from dataclasses import dataclass
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
import outboxer

@outboxer.message("sharing.order_placed", destination=os.environ["SHARING_QUEUE"])
@dataclass
class OrderPlaced:
    order_id: int

engine = create_engine(os.environ["SHARING_DB"])
outboxer.create_all(engine)
Session = sessionmaker(engine, class_=outboxer.OutboxSession)
billing = outboxer.Consumer(Session, name=os.environ["SHARING_QUEUE"] + "-billing")
audit = outboxer.Consumer(Session, name=os.environ["SHARING_QUEUE"] + "-audit")

@billing.handler(OrderPlaced)
def charge(event: OrderPlaced) -> None:
    pass

@audit.handler(OrderPlaced)
def record(event: OrderPlaced) -> None:
    pass
"""


def test_outboxer_inbox_warns_at_start_up_that_consumers_share_a_plain_sqs_queue(
    tmp_path: Path, moto_endpoint: str
) -> None:
    (tmp_path / "sharing_app.py").write_text(SHARING_APP)
    queue = unique("orders")
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "SHARING_QUEUE": queue,
        "SHARING_DB": f"sqlite:///{tmp_path / 'app.sqlite'}",
        "OUTBOXER_BROKER": f"sqs://?region=us-east-1&endpoint_url={moto_endpoint}",
    }

    def start(consumer: str) -> str:
        done = subprocess.run(
            [str(BIN / "outboxer-inbox"), f"sharing_app:{consumer}", "--once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    assert "sns://" not in start("billing")
    for _ in range(2):  # at each start-up, once
        lines = [line for line in start("audit").splitlines() if "sns://" in line]
        assert len(lines) == 1, lines
        assert f"consumer '{queue}-audit' reads SQS queue '{queue}'" in lines[0]
        assert f"which consumer '{queue}-billing' also reads" in lines[0]
        assert "WARNING" in lines[0]


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_consumer_takes_at_most_150_types_from_one_topic(
    sns: Transport, Session: sessionmaker[outboxer.OutboxSession]
) -> None:
    """SNS refuses a filter policy of more than 150 values. Before (review of 2026-11-30):
    the consumer passed its checks, then run() failed with SNS's "Filter policy is too
    complex" and no fix named; now the 151st type is refused before anything is created."""
    topic = unique("many")

    def consumer(types: int) -> outboxer.Consumer:
        made = outboxer.Consumer(Session, name=unique("wide"))
        for i in range(types):
            made.handler(f"wide.t{i}", destination=topic, name=f"h{i}")(lambda event: None)
        return made

    fits = consumer(150)
    fits.check_names(sns)
    assert fits.run(sns, once=True, idle_timeout=0.05).messages == 0  # subscribed, read
    with pytest.raises(outboxer.ConfigurationError, match="at most 150: split"):
        consumer(151).check_names(sns)
