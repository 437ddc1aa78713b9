"""An embedded relay (``Relay.run()`` in an application thread) stopped while its database
hung is abandoned after its stop grace: the database thread is left behind. When the
application runs the same :class:`outboxer.Relay` again, what that thread still had queued
must not reach the new run: its deregistration and closed liveness lock would make the
other relays count the new run as dead (and take the rows it is sending), and its queued
claims would lease rows that nobody sends.

The database "hangs" in process: a statement of the claim waits on an event the test sets
(no real service is touched).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine

import outboxer
from outboxer.relay import database as relay_database
from outboxer.store import liveness as liveness_store
from outboxer.tables import relays
from outboxer.testing import MemoryBroker, MemoryTransport

from .relaying import SessionFactory
from .test_relay_faults import publish_numbered, wait_until
from .test_review_transient_relay import Running


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_relay_run_again_after_an_abandoned_run_stays_alive_when_the_old_work_ends(
    db_url: str, Session: SessionFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_database, "STOP_GRACE", 1.0)
    threads: list[relay_database.DatabaseThread] = []
    original = relay_database.DatabaseThread.__init__

    def record(self: relay_database.DatabaseThread) -> None:
        original(self)
        threads.append(self)

    monkeypatch.setattr(relay_database.DatabaseThread, "__init__", record)
    relay_db: Engine = outboxer.relay_engine(db_url, network_timeout=5)
    armed, hung, release = threading.Event(), threading.Event(), threading.Event()

    def hang(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if armed.is_set() and "outboxer_outbox" in statement and not hung.is_set():
            hung.set()
            release.wait(30)  # the database answers nothing until the test says so

    event.listen(relay_db, "before_cursor_execute", hang)
    broker = MemoryBroker()
    relay = outboxer.Relay(relay_db, MemoryTransport(broker), poll_interval=0.05, listen=False)
    first = Running(relay)
    second: Running | None = None
    try:
        publish_numbered(Session, "orders", 1, key=None)
        wait_until(lambda: len(broker.published) == 1, 30, "the first message")
        armed.set()
        wait_until(hung.is_set, 30, "a claim to hang")
        first.stop(timeout=15)
        assert not first.thread.is_alive(), "the first run did not give up on its database"
        assert first.error is None, first.error
        old = threads[0]

        second = Running(relay)
        publish_numbered(Session, "orders", 1, key=None, start=1)
        wait_until(lambda: len(broker.published) == 2, 30, "the second run's message")

        release.set()  # the database answers the abandoned thread's work at last
        old._thread.join(10)
        assert not old._thread.is_alive()
        me = relay.liveness.relay_id
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # no sleep-based guess: look for a gap
            with relay_db.connect() as connection:
                registered = set(liveness_store.registered(connection))
                dead = liveness_store.dead_relays(connection, "0" * 16)
            assert me in registered and me not in dead, (
                "the abandoned run's leftovers deregistered the running relay "
                f"(registered: {sorted(registered)}, dead: {sorted(dead)})"
            )
        publish_numbered(Session, "orders", 1, key=None, start=2)
        wait_until(lambda: len(broker.published) == 3, 30, "the third message")
    finally:
        release.set()
        relay.stop()
        first.thread.join(15)
        if second is not None:
            second.thread.join(15)
        event.remove(relay_db, "before_cursor_execute", hang)
        relay_db.dispose()
    assert second.error is None, second.error
    with Session() as session:
        left = session.execute(select(relays.c.relay_id)).scalars().all()
    assert left == [], left
