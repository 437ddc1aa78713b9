"""PostgreSQL restarted under a running relay and a running consumer: nothing is lost.

These restart the shared test server; engines of other tests reconnect (pool pre-ping).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire

from .services import IN_CI, RABBITMQ_URL
from .test_relay_brokers import (
    OUTBOXER,
    Target,
    outbox_count,
    publish_sequence,
    spawn,
    start_relay,
    stop,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)]


def restart_postgresql() -> None:
    version = (
        sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None
    )
    if version is None:
        if IN_CI:
            pytest.fail("cannot restart PostgreSQL: /etc/postgresql is missing")
        pytest.skip("not a Debian PostgreSQL cluster: cannot restart it from a test")
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def reachable(engine: Engine) -> bool:
    try:
        with engine.connect() as conn:
            conn.execute(select(1))
        return True
    except Exception:
        return False


@pytest.fixture
def rabbit() -> Iterator[Target]:
    from .test_relay_brokers import rabbitmq_target

    made = rabbitmq_target()
    yield made
    made.receiver.close()
    made.transport.close()
    for clean in made.cleanup:
        clean()


def test_a_database_restart_mid_drain_loses_nothing_and_the_relay_carries_on(
    engine: Engine, Session: sessionmaker[outboxer.OutboxSession], db_url: str, rabbit: Target
) -> None:
    total = 20_000
    publish_sequence(Session, rabbit.destination, total=total, keys=30)
    relay = start_relay(db_url, RABBITMQ_URL, "--batch-size", "100", "--lease", "5")
    try:
        wait_for(lambda: outbox_count(engine) < total - 500, 60, "the relay to start sending")
        restart_postgresql()
        wait_for(lambda: reachable(engine), 60, "PostgreSQL to come back")
        wait_for(lambda: outbox_count(engine) == 0, 180, "the outbox to drain after the restart")
    finally:
        log = stop(relay)
    assert "database trouble" in log, "the relay should have seen the restart"
    got = rabbit.collect(total, timeout=120)
    ids = Counter(d.headers[wire.MESSAGE_ID] for d in got)
    assert len(ids) == total, f"{total - len(ids)} messages lost"
    print(f"\ndatabase restart: {total} messages, 0 lost, {sum(ids.values()) - total} duplicates")


APP = """
import os
from dataclasses import dataclass
from sqlalchemy import Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
import outboxer

class Base(DeclarativeBase):
    pass

class Charge(Base):
    __tablename__ = "fault_charges"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[int] = mapped_column(Integer)

@outboxer.message("fault.order_placed", destination=os.environ["FAULT_DESTINATION"])
@dataclass
class OrderPlaced:
    order_id: int

engine = create_engine(os.environ["FAULT_DB"], pool_pre_ping=True)
Session = sessionmaker(engine, class_=outboxer.OutboxSession)
consumer = outboxer.Consumer(Session, name=os.environ["FAULT_CONSUMER"])

@consumer.handler(OrderPlaced)
def charge(event: OrderPlaced, session) -> None:
    session.add(Charge(order_id=event.order_id))
"""


def test_a_database_restart_under_a_consumer_applies_each_effect_once(
    engine: Engine,
    db_url: str,
    rabbit: Target,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    (tmp_path / "fault_app.py").write_text(textwrap.dedent(APP))
    name = f"fault-consumer-{rabbit.destination}"
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "FAULT_DB": db_url,
        "FAULT_DESTINATION": rabbit.destination,
        "FAULT_CONSUMER": name,
    }
    for name_, value in env.items():
        if name_.startswith("FAULT_"):
            monkeypatch.setenv(name_, value)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fault_app  # type: ignore[import-not-found]

    request.addfinalizer(lambda: sys.modules.pop("fault_app", None))
    fault_app.Base.metadata.create_all(engine)
    request.addfinalizer(lambda: fault_app.Base.metadata.drop_all(engine))
    transport = outboxer.transport_from_url(RABBITMQ_URL)
    rabbit.cleanup.append(transport.close)
    transport.receiver(fault_app.consumer.subscription()).close()  # its queue and bindings
    total = 3000
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    for start in range(0, total, 500):
        with Session.begin() as session:
            for n in range(start, start + 500):
                session.publish(fault_app.OrderPlaced(order_id=n))
    outboxer.Relay(engine, transport).run(once=True)

    def charges() -> int:
        try:
            with engine.connect() as conn:
                count = conn.execute(select(func.count()).select_from(fault_app.Charge)).scalar()
                return int(count or 0)
        except Exception:
            return -1

    # As deployed: a relay beside the consumer (a handler run that failed during the
    # restart is retried through the outbox).
    relay = start_relay(db_url, RABBITMQ_URL, "--poll-interval", "0.2")
    inbox_command = str(Path(OUTBOXER).parent / "outboxer-inbox")
    consumer = spawn(
        [inbox_command, "fault_app:consumer", "--broker", RABBITMQ_URL, "--concurrency", "4"],
        env=env,
    )
    try:
        wait_for(lambda: charges() > 200, 60, "the consumer to start")
        restart_postgresql()
        wait_for(lambda: reachable(engine), 60, "PostgreSQL to come back")
        wait_for(lambda: charges() >= total, 240, "every message to be handled")
    finally:
        # SIGTERM lets the messages in progress finish, so what is counted below is final.
        log = stop(consumer)
        stop(relay)
    with engine.connect() as conn:
        per_order = Counter(conn.execute(select(fault_app.Charge.order_id)).scalars())
    assert len(per_order) == total, f"{total - len(per_order)} orders never charged"
    assert set(per_order.values()) == {1}, "an order was charged twice"
    assert "giving it back" in log, "the consumer should have seen the restart"
    print(f"\ndatabase restart under a consumer: {total} orders, each charged once")
