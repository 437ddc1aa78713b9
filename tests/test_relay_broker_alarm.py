"""A RabbitMQ resource alarm (disk or memory) under a running relay.

When the broker runs low on disk or memory it blocks every connection that publishes: it
stops reading from them and says so (``connection.blocked``), until the alarm clears. The
messages the relay wrote wait in the socket, unconfirmed. The broker is not gone: they
will be stored when it reads them. A relay that counted that as an outage (a confirm
timeout: give up the connection, send again on a new one) opened a connection per retry
and left the blocked ones open, each holding a copy of the batches it had written; when
the alarm cleared, the broker stored every copy. These tests run a private RabbitMQ node
(``chaos.private``), so that the alarm blocks nobody else.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from chaos.private import PrivateRabbitMQ, Unavailable, private_rabbitmq
from outboxer.transports import Subscription

from .services import require
from .test_relay_faults import Running, first_deliveries, numbers, publish_numbered

SessionFactory = sessionmaker[outboxer.OutboxSession]
CONFIRM_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateRabbitMQ]:
    try:
        with private_rabbitmq() as started:
            yield started
    except Unavailable as exc:
        require("a private RabbitMQ node", False, str(exc))


class Collector:
    """A plain consumer of everything sent to ``destination`` on the node (a consumer's
    connection publishes nothing: the alarm does not block it)."""

    def __init__(self, url: str, destination: str) -> None:
        self.transport = outboxer.transport_from_url(url)
        self.receiver = self.transport.receiver(
            Subscription(queue=f"collect-{destination}", bindings=[(destination, "#")])
        )
        self.got: list[bytes] = []

    def collected(self, count: int) -> bool:
        """Take what arrived; whether ``count`` messages are in."""
        for delivery in self.receiver.receive(max_messages=500, timeout=0.2):
            self.got.append(delivery.body)
            delivery.ack()
        return len(self.got) >= count

    def close(self) -> None:
        self.receiver.close()
        self.transport.close()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_blocked_broker_is_waited_for_on_one_connection_and_nothing_is_sent_twice(
    node: PrivateRabbitMQ,
    Session: SessionFactory,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    destination = f"alarm-{uuid.uuid4().hex[:8]}"
    url = f"{node.url}?confirm_timeout={CONFIRM_TIMEOUT:g}"
    transport = outboxer.transport_from_url(url)
    collector = Collector(node.url, destination)
    got, collected = collector.got, collector.collected

    relay = outboxer.Relay(engine, transport, poll_interval=0.05)
    caplog.set_level(logging.INFO, logger="outboxer")
    running = Running(relay)
    try:
        publish_numbered(Session, destination, 20, key="k")
        wait_for(lambda: collected(20), 30, "the first 20 messages")
        node.alarm()
        publish_numbered(Session, destination, 30, key="k", start=20)
        # The alarm lasts several confirm timeouts: long enough for a relay that takes it
        # for an outage to give up its connection and send the batch again.
        time.sleep(4 * CONFIRM_TIMEOUT)
        node.alarm(False)
        wait_for(lambda: collected(50), 30, "the 30 messages held by the alarm")
        wait_for(lambda: relay.stats.sent >= 50, 10, "the relay to settle them")
        collected(51)  # anything sent twice arrives now
    finally:
        node.alarm(False)
        running.stop()
        collector.close()
        transport.close()
    assert numbers(got) == list(range(50)), "each message once, in order"
    publisher = transport._publisher  # type: ignore[attr-defined]
    assert publisher.connections_opened == 1, "the relay kept its blocked connection"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "did not confirm" in w], warnings
    blocked = [w for w in warnings if "blocked" in w]
    assert blocked and "alarm" in blocked[0] and "rabbitmq-diagnostics alarms" in blocked[0]
    assert any("unblocked" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_a_relay_stopped_during_an_alarm_stops_and_the_next_run_sends_everything(
    node: PrivateRabbitMQ,
    Session: SessionFactory,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    destination = f"alarm-{uuid.uuid4().hex[:8]}"
    collector = Collector(node.url, destination)
    got, collected = collector.got, collector.collected

    caplog.set_level(logging.INFO, logger="outboxer")
    transport = outboxer.transport_from_url(node.url)
    try:
        running = Running(outboxer.Relay(engine, transport, poll_interval=0.05))
        publish_numbered(Session, destination, 10, key="k")
        wait_for(lambda: collected(10), 30, "the first 10 messages")
        node.alarm()
        publish_numbered(Session, destination, 10, key="k", start=10)
        wait_for(
            lambda: any("blocked publishing" in r.getMessage() for r in caplog.records),
            15,
            "the relay to say that RabbitMQ blocked it",
        )
        took = running.stop(timeout=60)
        assert took < 15, f"the relay took {took:.1f} s to stop during the alarm"
        transport.close()
        node.alarm(False)
        again = outboxer.transport_from_url(node.url)
        try:
            outboxer.Relay(engine, again, poll_interval=0.05).run(once=True)
        finally:
            again.close()
        wait_for(lambda: collected(20), 30, "the 10 messages held by the alarm")
        collected(21)
    finally:
        node.alarm(False)
        collector.close()
        transport.close()
    assert first_deliveries(numbers(got)) == list(range(20)), "every message, in order"


@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_two_relays_through_an_alarm_longer_than_the_lease_send_nothing_twice(
    node: PrivateRabbitMQ, Session: SessionFactory, engine: Engine
) -> None:
    """The blocked relay keeps the leases of its batches on the wire: the other relay does
    not take their rows when the lease would have ended, and send them again."""
    destination = f"alarm-{uuid.uuid4().hex[:8]}"
    collector = Collector(node.url, destination)
    transports = [outboxer.transport_from_url(node.url) for _ in range(2)]
    relays = [outboxer.Relay(engine, t, poll_interval=0.05, lease=2) for t in transports]
    running = [Running(relay) for relay in relays]
    try:
        node.alarm()
        for key in ("a", "b", "c", "d"):
            publish_numbered(Session, destination, 10, key=key)
        time.sleep(8)  # four leases
        node.alarm(False)
        wait_for(lambda: collector.collected(40), 30, "the 40 messages")
        wait_for(lambda: sum(r.stats.sent for r in relays) >= 40, 20, "the relays to settle")
        collector.collected(41)  # anything sent twice arrives now
    finally:
        node.alarm(False)
        for r in running:
            r.stop()
        collector.close()
        for t in transports:
            t.close()
    assert len(collector.got) == 40, f"{len(collector.got) - 40} sent twice"
