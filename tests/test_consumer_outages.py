"""A database that refuses connections for a moment, under a consumer: an outage, never a
handler failure and never a reason to dead-letter.

While PostgreSQL restarts, a connection attempt is refused ("connection refused", "the
database system is starting up") before any statement is sent. The consumer must give
the delivery back and spend no attempt. Before this was tested, a refused connect while
the consumer wrote a retry was taken for "the database refused the row": it wrote the
message's dead letter instead, a moment later, once the server was back (a CI run lost
an order that way in the database-restart test).

The refusals are real: the engine's next connections go to a closed port, so the
drivers (psycopg, PyMySQL) raise their own errors.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

import outboxer

from .models import OrderPlaced
from .test_consumer import Harness, SessionFactory

pytestmark = pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)


def closed_port() -> int:
    """A local port nothing listens on (connect gets ECONNREFUSED)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Refusals:
    """The engine's next ``n`` new connections are refused by the driver."""

    def __init__(self, engine: Engine) -> None:
        self.pending = 0
        self.refused = 0
        self.port = closed_port()
        event.listen(engine, "do_connect", self._connect)

    def next(self, n: int) -> None:
        self.pending = n

    def _connect(self, dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        if self.pending > 0:
            self.pending -= 1
            self.refused += 1
            cparams["host"], cparams["port"] = "127.0.0.1", self.port


@pytest.fixture
def unpooled(db_url: str) -> Iterator[Engine]:
    """An engine that connects for every transaction, as after a restart empties a pool."""
    engine = create_engine(db_url, poolclass=NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def h(engine: Engine, Session: SessionFactory, unpooled: Engine) -> Harness:
    harness = Harness(engine, Session)
    harness.consumer = outboxer.Consumer(
        sessionmaker(unpooled, class_=outboxer.OutboxSession),
        name="billing",
        retry=outboxer.Retry(max_attempts=3, initial_delay=0.05, max_delay=0.05, jitter=0.0),
    )
    return harness


def test_a_refused_connect_while_writing_a_retry_gives_the_delivery_back(
    h: Harness, unpooled: Engine
) -> None:
    refusals = Refusals(unpooled)
    runs: list[int] = []

    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        runs.append(context.attempt)
        if len(runs) == 1:
            refusals.next(1)  # the server goes away: the retry's write cannot connect
            raise ConnectionError("payment gateway timed out")
        h.effect("reserve", session, event.order_id)

    h.publish(OrderPlaced(order_id=1))
    h.deliver(until=lambda: h.effects()["reserve"] == 1 or bool(h.dead()))
    assert refusals.refused == 1
    assert h.dead() == [], "an outage dead-lettered the message"
    h.deliver()
    assert h.effects() == {"reserve": 1}
    assert h.dead() == []


def test_a_refused_connect_for_a_handler_run_spends_no_attempt(
    h: Harness, unpooled: Engine
) -> None:
    refusals = Refusals(unpooled)
    runs: list[int] = []

    @h.consumer.handler(OrderPlaced)
    def reserve(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        runs.append(context.attempt)
        h.effect("reserve", session, event.order_id)

    h.publish(OrderPlaced(order_id=2))
    h.send()
    refusals.next(1)  # the first run's transaction cannot connect
    h.deliver(until=lambda: h.effects()["reserve"] == 1 or bool(h.dead()))
    h.deliver()
    assert refusals.refused == 1
    assert runs == [1], "the outage was counted as a failed run of the handler"
    assert h.effects() == {"reserve": 1}
    assert h.dead() == []


def test_a_handler_whose_own_other_database_is_down_still_fails_and_is_retried(
    h: Harness, db_url: str
) -> None:
    """The consumer's database is up: an unreachable database the handler uses itself is the
    handler's failure (retried, then dead-lettered), not an outage of the consumer's."""
    elsewhere = create_engine(db_url, poolclass=NullPool)
    Refusals(elsewhere).next(10)
    runs: list[int] = []

    @h.consumer.handler(OrderPlaced, retry=outboxer.Retry(max_attempts=2, initial_delay=0.05))
    def reserve(event: OrderPlaced, session: Session, context: outboxer.Context) -> None:
        runs.append(context.attempt)
        with elsewhere.connect():
            pass

    h.publish(OrderPlaced(order_id=3))
    h.deliver(until=lambda: bool(h.dead()))
    elsewhere.dispose()
    assert runs == [1, 2]
    [letter] = h.dead()
    assert letter.error_type.endswith("OperationalError")
