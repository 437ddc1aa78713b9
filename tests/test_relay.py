"""The relay on each database, with the in-process broker (broker-specific tests elsewhere)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.message import Envelope
from outboxer.retry import Backoff
from outboxer.store import claims, settle
from outboxer.store import relay as relay_store
from outboxer.store.leases import LeaseScope, relay_of, token
from outboxer.testing import MemoryBroker, MemoryTransport
from outboxer.transports import SendResult, Subscription

from .models import OrderPlaced

SessionFactory = sessionmaker[outboxer.OutboxSession]
FAST = Backoff(initial=0.05, multiplier=1.0, max_delay=0.05, jitter=0.0)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.01)


def outbox_rows(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outboxer.outbox).order_by(outboxer.outbox.c.id)).mappings()
        return [dict(r) for r in rows]


def dead_letters(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(outboxer.dead_letter).order_by(outboxer.dead_letter.c.id))
        return [dict(r) for r in rows.mappings()]


def claim(
    conn: Any, owner: str, limit: int, lease: float, in_flight: tuple[str, ...] = ()
) -> list[relay_store.Claimed]:
    """Claim as the relay whose token is ``owner``, with ``in_flight`` on the wire."""
    scope = LeaseScope(relay=relay_of(owner), in_flight=in_flight)
    return claims.claim_batch(conn, owner=owner, scope=scope, limit=limit, lease_seconds=lease)


def publish(Session: SessionFactory, *events: Any, **options: Any) -> None:
    with Session.begin() as session:
        for e in events:
            session.publish(e, **options)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def relay(engine: Engine, broker: MemoryBroker) -> Iterator[outboxer.Relay]:
    yield outboxer.Relay(engine, MemoryTransport(broker), backoff=FAST, poll_interval=0.05)


def test_committed_messages_are_sent_then_deleted(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker, relay: outboxer.Relay
) -> None:
    publish(Session, *[OrderPlaced(order_id=i) for i in range(1, 8)], headers={"tenant": "a"})
    stats = relay.run(once=True)
    assert stats.sent == 7
    assert [json.loads(e.payload)["order_id"] for e in broker.published] == list(range(1, 8))
    assert all(e.headers == {"tenant": "a"} for e in broker.published)
    assert outbox_rows(engine) == []


def test_an_unavailable_broker_spends_no_attempts_and_loses_nothing(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker, relay: outboxer.Relay
) -> None:
    publish(Session, OrderPlaced(order_id=1), OrderPlaced(order_id=2))
    broker.available = False
    stats = relay.run(once=True)
    assert stats.sent == 0 and stats.outages == 1
    rows = outbox_rows(engine)
    assert len(rows) == 2
    assert all(r["attempts"] == 0 and r["locked_by"] is None for r in rows)
    assert relay.breaker.is_open

    broker.available = True
    relay.breaker.record_success()
    assert relay.run(once=True).sent == 2
    assert outbox_rows(engine) == [] and dead_letters(engine) == []


def test_a_retryable_failure_backs_off_that_row_and_counts_an_attempt(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    slow = Backoff(initial=30.0, multiplier=1.0, max_delay=30.0, jitter=0.0)
    relay = outboxer.Relay(engine, MemoryTransport(broker), backoff=slow)
    publish(Session, OrderPlaced(order_id=1))
    publish(Session, OrderPlaced(order_id=2))
    broker.fail_next(1, SendResult.retry("throttled", "slow down"))
    stats = relay.run(once=True)
    assert (stats.sent, stats.retried) == (1, 1)
    [row] = outbox_rows(engine)
    assert row["attempts"] == 1
    assert row["last_error"] == "throttled: slow down"
    assert row["first_failed_at"] is not None and row["locked_by"] is None
    with engine.connect() as conn:
        due_in = relay_store.next_due_in(conn)
    assert due_in is not None and 25 < due_in <= 30  # backoff on the database clock


def test_retries_then_dead_letters_after_max_attempts(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    relay = outboxer.Relay(engine, MemoryTransport(broker), backoff=FAST, max_attempts=3)
    publish(Session, OrderPlaced(order_id=1))
    broker.fail_next(3, SendResult.retry("nack", "broker said no"))
    wait_until(lambda: relay.run(once=True) is not None and not outbox_rows(engine), 10)
    [dead] = dead_letters(engine)
    assert dead["origin"] == "relay"
    assert dead["attempts"] == 3
    assert dead["error_type"] == "nack"
    assert "gave up after 3 attempts" in dead["error_message"]
    assert dead["destination"] == "orders" and dead["message_type"] == "test.order_placed"
    assert json.loads(dead["payload"]) == {"order_id": 1, "customer": "ada"}
    assert dead["first_failed_at"] <= dead["last_failed_at"]
    assert broker.published == []


def test_a_rejected_message_is_dead_lettered_with_its_reason_while_others_are_sent(
    engine: Engine, Session: SessionFactory
) -> None:
    broker = MemoryBroker(mandatory=True)
    transport = MemoryTransport(broker)
    transport.receiver(Subscription(queue="billing", bindings=[("orders", "#")]))
    publish(Session, OrderPlaced(order_id=1))
    publish(Session, OrderPlaced(order_id=2), destination="nowhere")
    publish(Session, OrderPlaced(order_id=3))
    stats = outboxer.Relay(engine, transport, unroutable_attempts=1).run(once=True)
    assert (stats.sent, stats.dead_lettered) == (2, 1)
    [dead] = dead_letters(engine)
    assert (dead["error_type"], dead["destination"], dead["attempts"]) == (
        "unroutable",
        "nowhere",
        1,
    )
    assert "no queue is bound" in dead["error_message"]
    assert [json.loads(e.payload)["order_id"] for e in broker.published] == [1, 3]
    assert outbox_rows(engine) == []


def test_an_unroutable_message_is_retried_with_backoff_before_it_is_dead_lettered(
    engine: Engine, Session: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker(mandatory=True)
    transport = MemoryTransport(broker)
    publish(Session, OrderPlaced(order_id=1))  # its consumer has not subscribed yet
    relay = outboxer.Relay(engine, transport, backoff=FAST, unroutable_attempts=3)
    caplog.set_level(logging.INFO, logger="outboxer")
    assert relay.run(once=True).retried == 1
    assert "could not be routed (no queue is bound for it yet: start its consumer)" in (caplog.text)
    [row] = outbox_rows(engine)
    assert row["attempts"] == 1 and row["last_error"].startswith("unroutable: ")
    transport.receiver(Subscription(queue="billing", bindings=[("orders", "#")]))
    wait_until(lambda: relay.run(once=True).sent == 1, 10, "the retry once the queue is bound")
    assert dead_letters(engine) == []

    publish(Session, OrderPlaced(order_id=2), destination="nowhere")
    wait_until(lambda: relay.run(once=True).dead_lettered == 1, 10, "the third attempt")
    [dead] = dead_letters(engine)
    assert dead["attempts"] == 3 and "gave up after 3 attempts" in dead["error_message"]


def test_messages_with_the_same_key_are_sent_in_commit_order_across_batches(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    relay = outboxer.Relay(engine, MemoryTransport(broker), batch_size=4)
    expected: dict[str, list[int]] = {}
    for n in range(30):
        key = f"k{n % 3}"
        publish(Session, OrderPlaced(order_id=n), key=key)
        expected.setdefault(key, []).append(n)
    assert relay.run(once=True).sent == 30
    seen: dict[str, list[int]] = {}
    for e in broker.published:
        seen.setdefault(e.key or "", []).append(json.loads(e.payload)["order_id"])
    assert seen == expected


def test_a_delayed_message_holds_back_its_key_but_not_other_keys(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker, relay: outboxer.Relay
) -> None:
    publish(Session, OrderPlaced(order_id=1), key="a", delay=60)
    publish(Session, OrderPlaced(order_id=2), key="a")
    publish(Session, OrderPlaced(order_id=3), key="b")
    publish(Session, OrderPlaced(order_id=4))
    assert relay.run(once=True).sent == 2
    assert sorted(json.loads(e.payload)["order_id"] for e in broker.published) == [3, 4]
    with engine.begin() as conn:  # time passes: the delayed message becomes due
        conn.execute(update(outboxer.outbox).values(available_at=func.current_timestamp()))
    relay.run(once=True)
    assert [json.loads(e.payload)["order_id"] for e in broker.published][2:] == [1, 2]


def test_a_dead_relays_lease_expires_and_another_relay_takes_over(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    publish(Session, *[OrderPlaced(order_id=i) for i in range(5)])
    with engine.connect() as conn:
        taken = claim(conn, token("0123456789abcdef", 1), limit=10, lease=3.0)
    assert len(taken) == 5
    survivor = outboxer.Relay(engine, MemoryTransport(broker))
    assert survivor.run(once=True).sent == 0  # still leased
    wait_until(lambda: survivor.run(once=True).sent == 5 or len(broker.published) == 5, 10)
    assert len(broker.published) == 5 and outbox_rows(engine) == []


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_concurrent_claims_never_overlap_and_never_split_a_key(
    engine: Engine, Session: SessionFactory
) -> None:
    for n in range(200):
        publish(Session, OrderPlaced(order_id=n), key=f"k{n % 20}" if n % 4 else None)
    taken: list[tuple[str, list[relay_store.Claimed]]] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def claimer(name: str) -> None:
        start.wait(timeout=10)
        mine: tuple[str, ...] = ()  # every batch stays in flight: nothing is settled here
        for n in range(10):
            owner = token(name, n)
            with engine.connect() as conn:
                got = claim(conn, owner, limit=15, lease=60, in_flight=mine)
            mine = (*mine, owner)
            with lock:
                taken.append((name, got))

    threads = [threading.Thread(target=claimer, args=(f"{i:016x}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ids = [c.id for _, batch in taken for c in batch]
    assert len(ids) == len(set(ids)), "a row was claimed twice"
    owners_of_key: dict[str, set[str]] = {}
    for owner, batch in taken:
        for c in batch:
            if c.envelope.key:
                owners_of_key.setdefault(c.envelope.key, set()).add(owner)
    # All leases are still held: each key's claimed rows belong to exactly one relay (which
    # may take a key's later rows in a later batch while it still holds the earlier ones).
    assert all(len(owners) == 1 for owners in owners_of_key.values())
    per_owner: dict[str, list[int]] = {}
    for owner, batch in taken:
        for c in batch:
            if c.envelope.key:
                per_owner.setdefault(f"{owner}/{c.envelope.key}", []).append(c.id)
    assert all(ids == sorted(ids) for ids in per_owner.values()), "a key's rows out of order"


def test_retention_keeps_sent_rows_then_prunes_them(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    relay = outboxer.Relay(engine, MemoryTransport(broker), retention=3600)
    publish(Session, *[OrderPlaced(order_id=i) for i in range(3)], key="k")
    published = [r["message_id"] for r in outbox_rows(engine)]
    assert relay.run(once=True).sent == 3
    assert outbox_rows(engine) == []  # the outbox holds pending rows only
    with engine.connect() as conn:
        kept = conn.execute(select(outboxer.sent).order_by(outboxer.sent.c.id)).mappings().all()
    assert [r["message_id"] for r in kept] == published
    assert all(r["sent_at"] is not None and r["message_key"] == "k" for r in kept)
    assert relay.run(once=True).sent == 0  # kept rows are never sent again
    with engine.connect() as conn:
        assert settle.prune_sent(conn, older_than=3600) == 0
        assert settle.prune_sent(conn, older_than=0, limit=2) == 2
        assert settle.prune_sent(conn, older_than=0) == 1
        assert conn.execute(select(func.count()).select_from(outboxer.sent)).scalar() == 0


def test_backlog_counts_pending_due_and_leased_rows(
    engine: Engine, Session: SessionFactory
) -> None:
    publish(Session, OrderPlaced(order_id=1), OrderPlaced(order_id=2))
    publish(Session, OrderPlaced(order_id=3), delay=600)
    with engine.connect() as conn:
        claim(conn, token("0123456789abcdef", 1), limit=1, lease=60)
        figures = relay_store.backlog(conn)
    assert (figures.pending, figures.due, figures.leased) == (3, 2, 1)
    assert 0 <= figures.oldest_due_seconds < 60


class HeldTransport(MemoryTransport):
    """A transport whose sends stay on the wire until :meth:`release` (a slow broker)."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        # Reentrant: a future's callbacks run in the thread that completes it.
        self._lock = threading.RLock()
        self._held: list[tuple[list[Envelope], Future[list[SendResult]]]] | None = []

    def send_async(
        self, envelopes: Any, *, after: Future[list[SendResult]] | None = None
    ) -> Future[list[SendResult]]:
        with self._lock:  # a send after the release waits until the held ones are out
            if self._held is not None:
                future: Future[list[SendResult]] = Future()
                self._held.append((list(envelopes), future))
                return future
            return super().send_async(envelopes, after=after)

    def holding(self) -> int:
        """Sends held so far."""
        with self._lock:
            return len(self._held or [])

    def release(self) -> None:
        """Send the held batches in order, then send at once."""
        with self._lock:
            held, self._held = self._held or [], None
            for envelopes, future in held:
                future.set_result(self.send(envelopes))


def test_with_a_backlog_the_relay_claims_two_batches_ahead_of_a_slow_broker(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    """Four batches on the wire and, while claims come back full, two claims queued behind
    them: the database thread claims while the loop waits for the broker."""
    with Session.begin() as session:
        for n in range(100):
            session.publish({"n": n}, type="test.seq", destination="orders", key=f"k{n % 3}")
    transport = HeldTransport(broker)
    relay = outboxer.Relay(engine, transport, batch_size=5, backoff=FAST, poll_interval=0.05)

    def leased() -> int:
        with engine.connect() as conn:
            count = select(func.count()).where(outboxer.outbox.c.locked_by.is_not(None))
            return int(conn.execute(count).scalar_one())

    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while leased() < 30 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert leased() == 30  # 4 batches of 5 on the wire, 2 claimed ahead
        time.sleep(0.3)  # the loop waits for the broker: nothing more is claimed
        assert leased() == 30
        transport.release()
        deadline = time.monotonic() + 20
        while len(broker.published) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        relay.stop()
        thread.join(timeout=30)
    got = [json.loads(e.payload)["n"] for e in broker.published]
    assert sorted(got) == list(range(100))
    for key in range(3):
        assert [n for n in got if n % 3 == key] == list(range(key, 100, 3))


def _relay_on_a_held_broker(
    engine: Engine, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> tuple[outboxer.Relay, HeldTransport, threading.Thread, threading.Event]:
    """A relay in a thread, batches of 5, sending to a :class:`HeldTransport`, and an event
    set after each batch it lands (its settle submitted)."""
    from outboxer.relay.runner import Run

    landed = threading.Event()
    land = Run._land

    def landing(run: Run) -> None:
        land(run)
        landed.set()

    monkeypatch.setattr(Run, "_land", landing)
    transport = HeldTransport(broker)
    relay = outboxer.Relay(engine, transport, batch_size=5, backoff=FAST, poll_interval=0.05)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    return relay, transport, thread, landed


def test_a_landed_batch_is_settled_before_the_claims_queued_behind_it(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settle does not wait for the claims queued ahead of the loop: a relay killed then
    sends again only what was not settled yet (the duplicate window)."""
    with Session.begin() as session:
        for n in range(100):
            session.publish({"n": n}, type="test.seq", destination="orders", key=f"k{n % 3}")
    done: list[str] = []  # database work in the order it started
    in_gate, gate = threading.Event(), threading.Event()
    claim_batch, settle_batch = claims.claim_batch, settle.settle

    def claiming(*args: Any, **kwargs: Any) -> list[relay_store.Claimed]:
        done.append(f"claim {sum(w.startswith('claim') for w in done) + 1}")
        if done[-1] == "claim 5":  # the database thread is busy; claim 6 is queued
            in_gate.set()
            assert gate.wait(20)
        return claim_batch(*args, **kwargs)

    def settling(*args: Any, **kwargs: Any) -> None:
        done.append(f"settle {sum(w.startswith('settle') for w in done) + 1}")
        settle_batch(*args, **kwargs)

    monkeypatch.setattr(claims, "claim_batch", claiming)
    monkeypatch.setattr(settle, "settle", settling)
    relay, transport, thread, landed = _relay_on_a_held_broker(engine, broker, monkeypatch)
    try:
        assert in_gate.wait(20)  # claim 5 running
        wait_until(lambda: transport.holding() == 4, 20, "batches 1-4 on the wire")
        transport.release()  # claim 6 was queued before batch 4 went out
        assert landed.wait(20)  # batch 1 confirmed: its settle is submitted
        gate.set()
        wait_until(lambda: len(broker.published) == 100, 20, "all 100 messages")
    finally:
        gate.set()
        relay.stop()
        thread.join(timeout=30)
    assert done.index("settle 1") < done.index("claim 6"), done[:12]
    got = [json.loads(e.payload)["n"] for e in broker.published]
    for key in range(3):
        assert [n for n in got if n % 3 == key] == list(range(key, 100, 3))


def test_a_settle_that_hands_rows_back_keeps_its_place_behind_the_queued_claims(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim queued before a settle counts the settled batch as on the wire. Had the
    settle of a failed row gone first, that claim could take the failed row, due again, and
    be held back, while the claim queued behind it, counting its rows as on the wire, sent
    the key's later rows first."""
    from outboxer.store.clock import db_now

    with Session.begin() as session:  # one head per key a batch: k's first row in batch 1
        for n in range(25):
            key = "k" if n == 0 else f"other{n}"
            session.publish({"n": n}, type="test.seq", destination="orders", key=key)
    with engine.connect() as conn:
        first = conn.execute(select(func.min(outboxer.outbox.c.id))).scalar_one()
    calls: list[int] = []
    claimed: list[list[int]] = []
    in_gate, gate = threading.Event(), threading.Event()
    claim_batch = claims.claim_batch

    def first_row_due_again() -> bool:
        """The failed row is free and due (True at once while it is still on the wire)."""
        with engine.connect() as conn:
            table = outboxer.outbox.c
            locked, due = conn.execute(
                select(table.locked_by, table.available_at <= db_now(conn.dialect)).where(
                    table.id == first
                )
            ).one()
            return locked is not None or bool(due)

    def claiming(*args: Any, **kwargs: Any) -> list[relay_store.Claimed]:
        calls.append(len(calls) + 1)
        if calls[-1] == 6:  # queued while batch 1 was on the wire
            wait_until(first_row_due_again, 10, "the failed row due again")
        rows = claim_batch(*args, **kwargs)
        claimed.append([json.loads(r.envelope.payload)["n"] for r in rows])
        if calls[-1] == 5:  # batches 1-4 on the wire, claim 6 queued
            in_gate.set()
            assert gate.wait(20)
        return rows

    monkeypatch.setattr(claims, "claim_batch", claiming)
    relay, transport, thread, landed = _relay_on_a_held_broker(engine, broker, monkeypatch)
    try:
        assert in_gate.wait(20)  # claim 5 done
        wait_until(lambda: transport.holding() == 4, 20, "batches 1-4 on the wire")
        with Session.begin() as session:  # k's later rows, after claim 5
            for n in range(25, 35):
                session.publish({"n": n}, type="test.seq", destination="orders", key="k")
        broker.fail_next(1, SendResult.retry("throttled", "slow down"))  # k's first row
        transport.release()  # claim 6 was queued before batch 4 went out
        assert landed.wait(20)  # batch 1 back: k's row to be retried
        gate.set()
        wait_until(lambda: len({json.loads(e.payload)["n"] for e in broker.published}) == 35, 20)
    finally:
        gate.set()
        relay.stop()
        thread.join(timeout=30)
    got = [json.loads(e.payload)["n"] for e in broker.published]
    ks = [n for n in got if n == 0 or n >= 25]
    seen: set[int] = set()
    firsts = [n for n in ks if not (n in seen or seen.add(n))]  # type: ignore[func-returns-value]
    assert firsts == [0, *range(25, 35)], claimed


def test_a_transport_that_raises_does_not_kill_the_relay(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    class Exploding(MemoryTransport):
        calls = 0

        def send(self, envelopes: Any) -> list[SendResult]:
            Exploding.calls += 1
            if Exploding.calls == 1:
                raise RuntimeError("bug in a transport")
            return super().send(envelopes)

    relay = outboxer.Relay(engine, Exploding(broker))
    publish(Session, OrderPlaced(order_id=1))
    first = relay.run(once=True)
    assert first.outages == 1 and first.released == 1
    relay.breaker.record_success()
    assert relay.run(once=True).sent == 1


def test_stop_from_another_thread_ends_a_running_relay(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker
) -> None:
    relay = outboxer.Relay(engine, MemoryTransport(broker), poll_interval=30)
    runner = threading.Thread(target=relay.run)
    runner.start()
    publish(Session, OrderPlaced(order_id=1))
    relay.stop()
    runner.join(timeout=5)
    assert not runner.is_alive()


def test_a_running_relay_sends_what_is_committed_later(
    engine: Engine, Session: SessionFactory, broker: MemoryBroker, db_kind: str
) -> None:
    # PostgreSQL wakes the relay by NOTIFY; the others poll (here every 50 ms).
    relay = outboxer.Relay(
        engine, MemoryTransport(broker), poll_interval=30 if db_kind == "postgresql" else 0.05
    )
    runner = threading.Thread(target=relay.run)
    runner.start()
    try:
        time.sleep(0.2)  # let it go idle (on PostgreSQL: waiting on LISTEN, 30 s poll)
        started = time.monotonic()
        publish(Session, OrderPlaced(order_id=1))
        wait_until(lambda: len(broker.published) == 1, 5, "the message at the broker")
        assert time.monotonic() - started < 2.0
    finally:
        relay.stop()
        runner.join(timeout=5)


def test_outage_pauses_stay_within_their_caps_whatever_the_jitter() -> None:
    from outboxer.relay import DATABASE_BACKOFF
    from outboxer.retry import CircuitBreaker

    breaker = CircuitBreaker()
    for n in range(1, 60):
        for rand in (0.0, 0.5, 1.0):
            assert DATABASE_BACKOFF.delay(n, lambda r=rand: r) <= 10.0
            assert breaker.backoff.delay(n, lambda r=rand: r) <= 4.0


def test_a_claimed_row_is_the_envelope_its_fields_make() -> None:
    """claimed_from_row builds envelopes without Envelope's __init__: every field is set."""
    row = (
        7,
        uuid.UUID("0190a5a0-0000-7000-8000-000000000001"),
        "t",
        "d",
        memoryview(b"{}"),
        datetime(2026, 1, 1, tzinfo=timezone.utc),
        "k",
        None,
        "c",
        '{"a": "b"}',
        None,
        None,
        "application/json",
        None,
        1,
        0,
        None,
    )
    claimed = relay_store.claimed_from_row(row, {})
    expected = Envelope(
        message_id=row[1],
        type="t",
        destination="d",
        payload=b"{}",
        occurred_at=row[5],
        key="k",
        causation_id="c",
        headers={"a": "b"},
        outbox_id=7,
    )
    assert claimed.envelope == expected
    assert set(vars(claimed.envelope)) == {f.name for f in dataclasses.fields(Envelope)}
    assert (claimed.id, claimed.attempts, claimed.first_failed_at) == (7, 0, None)


def test_a_claim_reads_utc_times_whatever_the_sessions_time_zone(
    db_url: str, engine: Engine, Session: SessionFactory
) -> None:
    """PostgreSQL's claim reads rows as psycopg makes them (in the session's time zone):
    the envelope's times are still the stored instants, in UTC."""
    publish(Session, OrderPlaced(order_id=1), key="k")
    with engine.begin() as conn:
        conn.execute(update(outboxer.outbox).values(first_failed_at=func.now(), attempts=1))
    stored = outbox_rows(engine)[0]
    options = {"connect_args": {"options": "-c timezone=Asia/Kolkata"}}
    other = create_engine(db_url, **(options if engine.dialect.name == "postgresql" else {}))
    try:
        with other.connect() as conn:
            (claimed,) = claim(conn, token("a" * 16, 1), 10, 60.0)
    finally:
        other.dispose()
    assert claimed.envelope.occurred_at == stored["occurred_at"]
    assert claimed.envelope.occurred_at.tzinfo is timezone.utc
    assert claimed.first_failed_at == stored["first_failed_at"]
    assert claimed.first_failed_at is not None and claimed.first_failed_at.tzinfo is timezone.utc
