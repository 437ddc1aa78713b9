"""A consumer on the in-process broker with messages injected straight into its queue, and
the ``line`` fixture that runs a scenario one message at a time and batched (a plugin of
tests/conftest.py; a test module may define its own ``line``)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import wire
from outboxer.ids import uuid7
from outboxer.message import Envelope
from outboxer.testing import MemoryBroker, MemoryTransport

from .models import Effect

SessionFactory = sessionmaker[outboxer.OutboxSession]
QUICK = outboxer.Retry(max_attempts=3, initial_delay=0.01, max_delay=0.01, jitter=0.0)
POISON = 5


def envelope_of(event: Any, destination: str = "orders") -> Envelope:
    type_ = type(event).__outboxer_message__
    return Envelope(
        message_id=uuid7(),
        type=type_.name,
        destination=destination,
        payload=type_.serialize(event),
        occurred_at=datetime.now(timezone.utc),
    )


class Line:
    """A consumer on the in-process broker, with messages injected straight into its queue."""

    def __init__(self, engine: Engine, Session: SessionFactory, batch_size: int) -> None:
        self.engine = engine
        self.Session = Session
        self.broker = MemoryBroker()
        self.transport = MemoryTransport(self.broker)
        self.relay = outboxer.Relay(engine, self.transport, poll_interval=0.05)
        self.consumer = outboxer.Consumer(
            Session, name="billing", retry=QUICK, batch_size=batch_size
        )
        self.calls: Counter[int] = Counter()
        self.commits = 0
        event.listen(engine, "commit", self._committed)

    def _committed(self, _connection: object) -> None:
        self.commits += 1

    def inject(self, *envelopes: Envelope) -> None:
        self.transport.receiver(self.consumer.subscription())
        for envelope in envelopes:
            self.broker.inject("billing", envelope.payload, wire.encode_headers(envelope), "orders")

    def consume(self) -> outboxer.ConsumerStats:
        return self.consumer.run(self.transport, once=True, idle_timeout=0.05)

    def deliver(self, until: Callable[[], bool], timeout: float = 20.0) -> None:
        """Consume, and relay the retries, until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.consume()
            if until():
                return
            self.relay.run(once=True)
        raise AssertionError("the expected state was not reached in time")

    def effects(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(conn.execute(select(Effect.message_key)).scalars())

    def dead(self) -> list[outboxer.DeadLetter]:
        return outboxer.DeadLetters(self.Session).list()


@pytest.fixture(params=[1, 20], ids=["one-at-a-time", "batched"])
def line(request: pytest.FixtureRequest, engine: Engine, Session: SessionFactory) -> Line:
    return Line(engine, Session, request.param)
