"""The relay's promises under faults: per-key order, progress of every key, takeover.

Each test reproduces a defect that a review found (issue 8) against the real databases
and brokers: a failed send or a database blip must not let later messages of a key
overtake an earlier one, no backlog shape may stall other keys, a replay is sent once
per replay and never swallowed, and a database outage is waited out as logged.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer import store
from outboxer.message import Envelope
from outboxer.retry import Backoff
from outboxer.testing import MemoryBroker, MemoryTransport
from outboxer.transports import SendResult, Subscription

from .faultproxy import UP, FaultProxy
from .relaying import Target
from .services import RABBITMQ_URL

SessionFactory = sessionmaker[outboxer.OutboxSession]
FAST = Backoff(initial=0.05, multiplier=1.0, max_delay=0.05, jitter=0.0)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def outbox_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(conn.execute(select(outboxer.outbox.c.id)).all())


def publish_numbered(
    Session: SessionFactory, destination: str, count: int, key: str | None, start: int = 0
) -> None:
    with Session.begin() as session:
        for n in range(start, start + count):
            session.publish({"n": n}, type="test.seq", destination=destination, key=key)


def numbers(payloads: list[bytes]) -> list[int]:
    return [json.loads(p)["n"] for p in payloads]


def first_deliveries(values: list[int]) -> list[int]:
    """Each value at its first appearance (duplicates are allowed; reordering is not)."""
    seen: set[int] = set()
    return [v for v in values if not (v in seen or seen.add(v))]  # type: ignore[func-returns-value]


class Running:
    """A relay running in a thread until the outbox is empty (or a deadline)."""

    def __init__(self, relay: outboxer.Relay) -> None:
        self.relay = relay
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 30) -> float:
        """Stop the relay; how many seconds that took (it must stop within ``timeout``)."""
        started = time.monotonic()
        self.relay.stop()
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "the relay did not stop"
        if self.error is not None:
            raise self.error
        return time.monotonic() - started


@pytest.fixture
def running() -> Iterator[Callable[[outboxer.Relay], Running]]:
    started: list[Running] = []

    def start(relay: outboxer.Relay) -> Running:
        started.append(Running(relay))
        return started[-1]

    yield start
    for r in started:
        if r.thread.is_alive():
            r.relay.stop()
            r.thread.join(timeout=30)


# Defect 2: a failed send must not let the next batch of the same key overtake it ---------


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_dropped_send_does_not_let_the_next_batch_overtake_it_on_sqs_fifo(
    engine: Engine,
    Session: SessionFactory,
    moto_endpoint: str,
    running: Callable[[outboxer.Relay], Running],
) -> None:
    from outboxer.transports.sqs import SQSTransport

    queue = f"order-{uuid.uuid4().hex[:8]}.fifo"
    transport = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    url = transport.client.create_queue(QueueName=queue, Attributes={"FifoQueue": "true"})[
        "QueueUrl"
    ]
    drops = {"left": 2}  # the call and botocore's own retry of it

    def drop(**_: Any) -> None:
        if drops["left"]:
            drops["left"] -= 1
            raise ConnectionClosedError(endpoint_url=moto_endpoint)

    transport.client.meta.events.register("before-send.sqs.SendMessageBatch", drop)
    publish_numbered(Session, queue, 30, key="order-1")
    relay = outboxer.Relay(engine, transport, batch_size=10, backoff=FAST, poll_interval=0.05)
    r = running(relay)
    wait_until(lambda: outbox_count(engine) == 0, 30, "the outbox to drain")
    r.stop()
    got: list[int] = []
    while True:
        answer = transport.client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        )
        messages = answer.get("Messages", [])
        if not messages:
            break
        for m in messages:
            got.append(json.loads(m["Body"])["n"])
            transport.client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    transport.close()
    assert drops["left"] == 0, "the fault was not injected"
    assert first_deliveries(got) == list(range(30))


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_connections_cut_while_batches_are_unconfirmed_keep_key_order_on_rabbitmq(
    engine: Engine,
    Session: SessionFactory,
    rabbit: Target,
    running: Callable[[outboxer.Relay], Running],
) -> None:
    total = 3000
    publish_numbered(Session, rabbit.destination, total, key="order-1")
    rng = random.Random(8)
    with FaultProxy.to(RABBITMQ_URL, 5672) as proxy:
        transport = outboxer.transport_from_url(proxy.url(RABBITMQ_URL))
        relay = outboxer.Relay(engine, transport, batch_size=200, poll_interval=0.05)
        r = running(relay)
        cuts = 0
        for _ in range(6):  # cut at random moments, mostly with two batches on the wire
            fired = proxy.after(
                bytes=rng.randrange(20_000, 120_000), direction=UP, action=proxy.cut
            )
            if not fired.wait(30) or outbox_count(engine) == 0:
                break
            cuts += 1
        wait_until(lambda: outbox_count(engine) == 0, 60, "the outbox to drain")
        r.stop()
        transport.close()
    got = rabbit.collect(total, timeout=60)
    assert cuts >= 3, "the relay drained before the faults could be injected"
    order = first_deliveries(numbers([d.body for d in got]))
    assert order == list(range(total)), f"first deliveries out of order after {cuts} cuts"


def test_a_transient_failure_holds_back_the_rest_of_its_key_in_later_batches(
    engine: Engine, Session: SessionFactory, running: Callable[[outboxer.Relay], Running]
) -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    publish_numbered(Session, "orders", 20, key="k")
    broker.fail_next(1, SendResult.retry("throttled", "slow down"))
    relay = outboxer.Relay(engine, transport, batch_size=5, backoff=FAST, poll_interval=0.05)
    r = running(relay)
    wait_until(lambda: outbox_count(engine) == 0, 30, "the outbox to drain")
    r.stop()
    assert first_deliveries(numbers([e.payload for e in broker.published])) == list(range(20))


# Defect 3: a database blip in the middle of a claim ---------------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"], indirect=True)
def test_a_database_blip_in_the_middle_of_a_claim_keeps_key_order(
    engine: Engine, Session: SessionFactory, running: Callable[[outboxer.Relay], Running]
) -> None:
    broker = MemoryBroker()
    publish_numbered(Session, "orders", 20, key="k")
    blips = {"left": 1}

    def blip(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The second statement of a claim that finds followers: the heads are leased.
        if blips["left"] and "AS ready" in statement:
            blips["left"] -= 1
            raise OperationalError(statement, None, ConnectionError("server closed connection"))

    event.listen(engine, "before_cursor_execute", blip)
    relay = outboxer.Relay(
        engine, MemoryTransport(broker), backoff=FAST, poll_interval=0.05, lease=3.0
    )
    r = running(relay)
    wait_until(lambda: outbox_count(engine) == 0, 30, "the outbox to drain")
    r.stop()
    assert blips["left"] == 0, "the fault was not injected"
    assert first_deliveries(numbers([e.payload for e in broker.published])) == list(range(20))


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_a_claim_that_fails_half_way_with_a_claim_queued_behind_it_keeps_key_order(
    engine: Engine, Session: SessionFactory, running: Callable[[outboxer.Relay], Running]
) -> None:
    """With a backlog the relay queues a second claim behind the next one, and that claim
    counts the first one's rows as on the wire. On PostgreSQL a claim that found fewer rows
    than it wanted looks again in further statements; when one of them fails, the rows of
    the first statement stay leased under the failed claim's token. The claim queued behind
    it may have taken a later row of their key: it must be handed back, not sent first."""
    broker = MemoryBroker()
    publish_numbered(Session, "orders", 7, key="k")
    state = {"claims": 0, "failed": False}

    def count_claims(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "UPDATE outboxer_outbox SET locked_by" in statement:
            state["claims"] += 1

    def blip(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # Claim 1 takes rows 0-4 (a full batch: two claims are queued), claim 2 rows 5 and
        # 6, then looks again: there, row 7 is committed and claim 2 fails.
        if state["claims"] == 2 and not state["failed"] and statement.startswith("SELECT"):
            state["failed"] = True
            publish_numbered(Session, "orders", 1, key="k", start=7)
            raise OperationalError(statement, None, ConnectionError("server closed"))

    event.listen(engine, "after_cursor_execute", count_claims)
    event.listen(engine, "before_cursor_execute", blip)
    relay = outboxer.Relay(
        engine, MemoryTransport(broker), batch_size=5, backoff=FAST, poll_interval=0.05
    )
    r = running(relay)
    wait_until(lambda: state["failed"] and outbox_count(engine) == 0, 30, "the outbox to drain")
    r.stop()
    assert first_deliveries(numbers([e.payload for e in broker.published])) == list(range(8))


@pytest.mark.parametrize("db_kind", ["mariadb"], indirect=True)
def test_a_database_connection_that_goes_silent_fails_and_the_relay_reconnects(
    engine: Engine,
    Session: SessionFactory,
    db_url: str,
    running: Callable[[outboxer.Relay], Running],
) -> None:
    """A connection whose bytes vanish (a firewall dropped its state) must not hang the
    relay: relay_engine's network timeout fails the call, and the relay reconnects."""
    broker = MemoryBroker()
    with FaultProxy.to(db_url, 3306) as proxy:
        relay_db = outboxer.relay_engine(proxy.url(db_url), network_timeout=2)
        relay = outboxer.Relay(relay_db, MemoryTransport(broker), poll_interval=0.05)
        r = running(relay)
        publish_numbered(Session, "orders", 1, key=None)
        wait_until(lambda: len(broker.published) == 1, 30, "the first message")
        proxy.blackhole()
        publish_numbered(Session, "orders", 1, key=None, start=1)
        time.sleep(3)  # the silence itself: longer than the network timeout
        proxy.heal()
        sent = lambda: set(numbers([e.payload for e in broker.published]))  # noqa: E731
        wait_until(lambda: sent() == {0, 1}, 30, "the relay to come back")
        r.stop()
        relay_db.dispose()
    # The first message may go twice (its settle was cut off): at least once, in order.
    assert first_deliveries(numbers([e.payload for e in broker.published])) == [0, 1]


# Defect 4: no backlog shape may stall other keys ------------------------------------------


def test_a_key_whose_head_waits_does_not_stall_the_other_messages(
    engine: Engine, Session: SessionFactory
) -> None:
    broker = MemoryBroker()
    with Session.begin() as session:
        session.publish({"n": -1}, type="test.seq", destination="orders", key="big", delay=3600)
    publish_numbered(Session, "orders", 4000, key="big")
    publish_numbered(Session, "orders", 10, key=None, start=10_000)
    publish_numbered(Session, "orders", 10, key="small", start=20_000)
    relay = outboxer.Relay(engine, MemoryTransport(broker))
    sent = relay.run(once=True).sent
    assert sorted(numbers([e.payload for e in broker.published])) == [
        *range(10_000, 10_010),
        *range(20_000, 20_010),
    ]
    assert sent == 20
    # ...and the waiting key stays in order when its head is due.
    assert outbox_count(engine) == 4001


# Defect 5: replaying a kept dead letter twice ---------------------------------------------


def test_a_dead_letter_kept_after_its_replay_cannot_be_replayed_again(
    engine: Engine, Session: SessionFactory
) -> None:
    broker = MemoryBroker(mandatory=True)
    publish_numbered(Session, "nowhere", 1, key=None)
    outboxer.Relay(engine, MemoryTransport(broker), max_attempts=1).run(once=True)
    dead = outboxer.DeadLetters(Session)
    [letter] = dead.list()
    dead.replay(letter.id, keep=True)
    with pytest.raises(outboxer.OutboxerError, match="already replayed"):
        dead.replay(letter.id, keep=True)
    assert outbox_count(engine) == 1


# Defect 6: SQS FIFO deduplication must not swallow a replay -------------------------------


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_each_replay_of_a_handler_message_reaches_an_sqs_fifo_queue(
    engine: Engine, moto_endpoint: str
) -> None:
    from outboxer.transports.sqs import SQSTransport

    queue = f"billing-{uuid.uuid4().hex[:8]}.fifo"
    transport = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    url = transport.client.create_queue(QueueName=queue, Attributes={"FifoQueue": "true"})[
        "QueueUrl"
    ]
    envelope = Envelope(
        message_id=uuid.uuid4(),
        type="test.seq",
        destination=queue,
        payload=b'{"n": 1}',
        occurred_at=datetime.now(timezone.utc),
        handler=f"{queue}:charge",
        attempt=1,
    )
    relay = outboxer.Relay(engine, transport)
    for _ in range(2):  # a replay, then a second replay of the same handler's message
        with engine.begin() as conn:
            store.insert_messages(conn, [store.NewMessage(envelope)])
        assert relay.run(once=True).sent == 1
    attributes = transport.client.get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
    )["Attributes"]
    transport.close()
    assert attributes["ApproximateNumberOfMessages"] == "2"


# Defect 8: a database outage is waited out as logged --------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_database_outage_is_waited_out_as_logged_with_one_traceback(
    caplog: pytest.LogCaptureFixture, running: Callable[[outboxer.Relay], Running]
) -> None:
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/test")
    relay = outboxer.Relay(engine, MemoryTransport(MemoryBroker()), rand=lambda: 0.5)
    caplog.set_level(logging.DEBUG, logger="outboxer")
    r = running(relay)
    time.sleep(7)  # the outage itself: the relay is expected to wait, not to act
    r.stop()
    retries = [x for x in caplog.records if "trying again in" in x.getMessage()]
    assert len(retries) >= 3
    for before, after in itertools.pairwise(retries):
        pause = float(before.getMessage().split("trying again in ")[1].split(" s")[0])
        waited = after.created - before.created
        assert waited >= pause * 0.9, f"logged {pause} s but retried after {waited:.2f} s"
    # One traceback for the outage, at debug level; a line per retry above it.
    tracebacks = [x for x in caplog.records if x.exc_info]
    assert len(tracebacks) == 1, [x.getMessage() for x in tracebacks]
    assert tracebacks[0].levelno == logging.DEBUG


# Defect 10: a database without outboxer's tables -----------------------------------------


def test_a_relay_on_a_database_without_the_tables_stops_and_says_how_to_fix_it(
    empty_db_url: str,
) -> None:
    engine = create_engine(empty_db_url)
    relay = outboxer.Relay(engine, MemoryTransport(MemoryBroker()), poll_interval=0.05)
    for once in (True, False):
        with pytest.raises(outboxer.OutboxerError, match="outboxer db upgrade"):
            relay.run(once=once)
    engine.dispose()


def test_a_relay_sends_only_to_its_destinations_when_asked(
    engine: Engine, Session: SessionFactory
) -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker)
    transport.receiver(Subscription(queue="billing", bindings=[("orders", "#")]))
    publish_numbered(Session, "orders", 3, key=None)
    publish_numbered(Session, "billing", 2, key=None, start=100)
    stats = outboxer.Relay(engine, transport, destinations=["billing"]).run(once=True)
    assert stats.sent == 2
    assert sorted(numbers([e.payload for e in broker.published])) == [100, 101]
    assert outbox_count(engine) == 3
