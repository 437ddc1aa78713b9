"""An idle relay claims once per poll interval, whatever due rows it cannot take.

An idle relay asks how long until the next row is due, and waits that long (at most its
poll interval). The question used to cover the whole outbox: a due row the relay cannot
take (another destination's, for a relay limited to destinations; a row leased by
another live relay) answered "now", and the relay claimed again at once, hundreds of
times a second, for as long as that row stayed. Now it waits its poll interval, or less
for the next row it could take: a delayed row of its own, a NOTIFY on PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.store import claims
from outboxer.testing import MemoryBroker, MemoryTransport

from .test_relay import outbox_rows, wait_until

SessionFactory = sessionmaker[outboxer.OutboxSession]


@pytest.fixture
def claim_count(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many claims the relays of this test ran so far."""
    counted = [0]
    real = claims.claim_batch

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(claims, "claim_batch", counting)
    return lambda: counted[0]


@pytest.fixture
def running() -> Iterator[Callable[[outboxer.Relay], None]]:
    """Start relays in threads; each is stopped and joined at the end of the test."""
    started: list[tuple[outboxer.Relay, threading.Thread]] = []

    def start(relay: outboxer.Relay) -> None:
        thread = threading.Thread(target=relay.run, daemon=True)
        thread.start()
        started.append((relay, thread))

    yield start
    for relay, thread in started:
        relay.stop()
        thread.join(10)


def idle_claims(claim_count: Callable[[], int], seconds: float = 2.0) -> int:
    """Claims run in ``seconds`` of idling, counted from the relay's first claim."""
    wait_until(lambda: claim_count() > 0, what="the relay's first claim")
    before = claim_count()
    threading.Event().wait(seconds)  # a measuring window, not synchronisation
    return claim_count() - before


def publish(Session: SessionFactory, destination: str, **options: Any) -> None:
    with Session.begin() as session:
        session.publish({"n": 1}, type="test.idle", destination=destination, **options)


on_postgresql_and_sqlite = pytest.mark.parametrize(
    "db_kind", ["postgresql", "sqlite"], indirect=True
)


@on_postgresql_and_sqlite
def test_a_relay_limited_to_destinations_does_not_spin_on_other_destinations_rows(
    engine: Engine,
    Session: SessionFactory,
    claim_count: Callable[[], int],
    running: Callable[[outboxer.Relay], None],
) -> None:
    publish(Session, "other-service", key="k")
    relay = outboxer.Relay(
        engine, MemoryTransport(MemoryBroker()), destinations=["billing"], poll_interval=1.0
    )
    running(relay)
    claimed = idle_claims(claim_count)
    assert claimed <= 4, f"{claimed} claims in 2 s of idling with poll_interval=1.0"


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_a_relay_does_not_spin_on_rows_another_live_relay_holds(
    engine: Engine,
    Session: SessionFactory,
    claim_count: Callable[[], int],
    running: Callable[[outboxer.Relay], None],
) -> None:
    """Not on SQLite: it runs one relay, which takes over whatever another left leased."""
    publish(Session, "orders", key="k")
    holder = outboxer.Relay(engine, MemoryTransport(MemoryBroker()))
    holder.liveness.start()  # registered, holding its liveness lock: alive
    try:
        with engine.begin() as conn:
            conn.execute(
                update(outboxer.outbox).values(
                    locked_by=holder.liveness.relay_id + "/1",
                    locked_until=datetime.now(timezone.utc) + timedelta(seconds=60),
                )
            )
        relay = outboxer.Relay(engine, MemoryTransport(MemoryBroker()), poll_interval=1.0)
        running(relay)
        claimed = idle_claims(claim_count)
        assert claimed <= 4, f"{claimed} claims in 2 s of idling with poll_interval=1.0"
        assert len(outbox_rows(engine)) == 1  # still the holder's
    finally:
        holder.liveness.stop()


@on_postgresql_and_sqlite
def test_an_idle_relay_still_sends_its_delayed_row_when_it_is_due(
    engine: Engine,
    Session: SessionFactory,
    claim_count: Callable[[], int],
    running: Callable[[outboxer.Relay], None],
) -> None:
    """Beside a due row it cannot take, a row of its own due in a second is sent at its
    time, not after the (long) poll interval (no NOTIFY: the due time alone)."""
    publish(Session, "other-service", key="k")
    publish(Session, "billing", delay=1.0)
    published = time.monotonic()
    broker = MemoryBroker()
    relay = outboxer.Relay(
        engine,
        MemoryTransport(broker),
        destinations=["billing"],
        poll_interval=10.0,
        listen=False,
    )
    running(relay)
    wait_until(lambda: len(broker.published) == 1, timeout=5, what="the delayed row sent")
    assert time.monotonic() - published < 3.0
    assert claim_count() <= 4


def listening(engine: Engine) -> bool:
    """Whether a session of this database LISTENs (the relay's waiter connects lazily)."""
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            )
        ).scalar()
    return bool(found)


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_an_idle_relay_is_woken_by_notify_beside_rows_it_cannot_take(
    engine: Engine,
    Session: SessionFactory,
    claim_count: Callable[[], int],
    running: Callable[[outboxer.Relay], None],
) -> None:
    publish(Session, "other-service", key="k")
    broker = MemoryBroker()
    relay = outboxer.Relay(
        engine, MemoryTransport(broker), destinations=["billing"], poll_interval=10.0
    )
    running(relay)
    wait_until(lambda: claim_count() > 0, what="the relay's first claim")
    wait_until(lambda: listening(engine), what="the relay's LISTEN")
    publish(Session, "billing")
    wait_until(lambda: len(broker.published) == 1, timeout=3, what="the NOTIFY wake-up")
