"""An engine whose connection pool is too small for what runs on it (2026-11-30).

Before: ``outboxer.Relay`` on an engine of ``pool_size=1, max_overflow=0`` (legal, and
what an application tuned for one thread may have) never sent anything. Its liveness lock
holds one connection for the relay's life, so its claims waited for the pool's
``pool_timeout`` and failed; the relay called that "cannot reach the database at ...: is it
running, and are the host and port in --db / OUTBOXER_DB right?" and retried forever,
while the database was fine. ``run(once=True)`` raised SQLAlchemy's bare TimeoutError.
"""

from __future__ import annotations

import logging
import time

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

import outboxer
from outboxer.diagnosis import diagnose
from outboxer.errors import ConfigurationError, DatabaseUnavailable
from outboxer.testing import MemoryBroker, MemoryTransport

from .conftest import clean
from .models import OrderPlaced

ONCE = outboxer.Retry(max_attempts=1)

SERVERS = pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)


@SERVERS
def test_a_relay_on_a_pool_of_one_connection_is_refused_naming_the_fix(db_url: str) -> None:
    engine = create_engine(db_url, pool_size=1, max_overflow=0)
    try:
        with pytest.raises(ConfigurationError, match=r"pool_size=2") as refused:
            outboxer.Relay(engine, MemoryTransport(MemoryBroker()))
        assert "pool_size=1, max_overflow=0" in str(refused.value)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "options",
    [
        {"pool_size": 2, "max_overflow": 0, "pool_timeout": 5},
        {"pool_size": 1, "max_overflow": 1, "pool_timeout": 5},
        {"pool_size": 1, "max_overflow": -1, "pool_timeout": 5},  # no limit
        {"poolclass": NullPool},
    ],
    ids=["two", "one-plus-overflow", "unlimited-overflow", "null-pool"],
)
@SERVERS
def test_pools_with_room_for_two_connections_are_accepted(
    db_url: str, options: dict[str, object]
) -> None:
    engine = create_engine(db_url, **options)  # type: ignore[arg-type]
    try:
        relay = outboxer.Relay(engine, MemoryTransport(MemoryBroker()))
        assert relay.run(once=True).batches >= 0  # no pool timeout
    finally:
        engine.dispose()


def test_a_sqlite_memory_database_on_a_static_pool_is_accepted() -> None:
    """One connection shared by every thread: the documented way to an in-memory SQLite."""
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    outboxer.create_all(engine)
    outboxer.Relay(engine, MemoryTransport(MemoryBroker())).run(once=True)


def test_a_pool_timeout_is_not_called_an_unreachable_database() -> None:
    error = PoolTimeout(
        "QueuePool limit of size 2 overflow 0 reached, connection timed out, timeout 30.00"
    )
    problem = diagnose(error, db_url="postgresql+psycopg://app@db/app")
    assert isinstance(problem, DatabaseUnavailable)
    text = str(problem)
    assert "cannot reach" not in text and "host and port" not in text
    assert "every connection of the engine's pool is in use" in text
    assert "pool_size" in text


@SERVERS
def test_a_consumer_whose_pool_runs_dry_gives_deliveries_back_and_dead_letters_none(
    db_url: str,
) -> None:
    """Before: four workers on a pool of one connection. A worker that waited past
    ``pool_timeout`` had its handler counted as failed (an attempt spent); its retry could
    not be written either ("the database refused a row built from a message... writing a
    simpler one"), and once a connection was free the message was dead-lettered: 3 good
    messages of 6. A pool timeout is now no connection at all, as a database that cannot
    be reached is: the delivery goes back without an attempt spent."""
    engine = create_engine(db_url, pool_size=1, max_overflow=0, pool_timeout=0.5)
    try:
        clean(engine)
        Session = sessionmaker(engine, class_=outboxer.OutboxSession)
        consumer = outboxer.Consumer(Session, name="pooled", batch_size=1)
        handled: list[int] = []

        @consumer.handler(OrderPlaced)
        def slow(event: OrderPlaced) -> None:
            if not handled:
                time.sleep(1.2)  # the work: holds the only connection past pool_timeout
            handled.append(event.order_id)

        transport = MemoryTransport(MemoryBroker())
        transport.receiver(consumer.subscription())
        with Session.begin() as session:
            for n in range(6):
                session.publish(OrderPlaced(order_id=n))
        relay_engine = create_engine(db_url)
        outboxer.Relay(relay_engine, transport).run(once=True)
        relay_engine.dispose()
        stats = consumer.run(transport, once=True, concurrency=4, idle_timeout=0.2)
        assert stats.dead_lettered == 0 and stats.retries_scheduled == 0, stats
        assert outboxer.DeadLetters(Session).list() == []
        deadline = time.monotonic() + 30
        while len(set(handled)) < 6:  # what went back comes again
            assert time.monotonic() < deadline, f"handled {sorted(set(handled))} of 6"
            consumer.run(transport, once=True, concurrency=1, idle_timeout=0.2)
        assert sorted(handled) == list(range(6))  # each once
    finally:
        engine.dispose()


def test_a_consumer_with_more_workers_than_its_pool_lends_warns_at_start(
    tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: nothing said that four workers would queue for one connection; the first
    sign was deliveries given back after pool_timeout under load."""
    engine = create_engine(f"sqlite:///{tmp_path}/pool.sqlite", pool_size=1, max_overflow=0)
    outboxer.create_all(engine)
    Session = sessionmaker(engine, class_=outboxer.OutboxSession)
    consumer = outboxer.Consumer(Session, name="narrow")
    consumer.handler(OrderPlaced)(lambda event: None)
    transport = MemoryTransport(MemoryBroker())
    with caplog.at_level(logging.WARNING, logger="outboxer.consumer"):
        consumer.run(transport, once=True, concurrency=4, idle_timeout=0.01)
        consumer.run(transport, once=True, concurrency=1, idle_timeout=0.01)
    lines = [r.getMessage() for r in caplog.records if "pool" in r.getMessage()]
    assert len(lines) == 1, lines  # the run of one worker fits
    assert "4 workers" in lines[0] and "lends 1 connection" in lines[0]
    assert "pool_size=4" in lines[0]
    engine.dispose()
