"""RabbitMQ returns are matched to the message that was returned, not to its message id.

A ``basic.return`` names no delivery tag: the publisher has to find which message of the
batches in flight came back. Matching by ``message_id`` alone gave the rejection to the
last message with that id, so when two rows shared an id (``publish(message_id=...)``
to two types, a handler's retry beside a replay), a message sent to no queue could be
counted as sent, and its row deleted: a loss. Now a return goes to the first message not
yet confirmed nor returned with the same exchange, routing key and message id.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timezone

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

import outboxer
from outboxer.message import Envelope
from outboxer.transports import Outcome

from .broker_rabbitmq import RabbitMQCase
from .relaying import payloads
from .test_relay import dead_letters, outbox_rows

SessionFactory = sessionmaker[outboxer.OutboxSession]


def _envelope(destination: str, message_id: uuid.UUID, type: str, n: int) -> Envelope:
    return Envelope(
        message_id=message_id,
        type=type,
        destination=destination,
        payload=b'{"n": %d}' % n,
        occurred_at=datetime.now(timezone.utc),
    )


@pytest.mark.parametrize("unbound_first", [True, False], ids=["unbound-first", "bound-first"])
@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb", "sqlite"], indirect=True)
def test_a_row_sent_to_no_queue_is_not_deleted_when_another_row_shares_its_message_id(
    engine: Engine, Session: SessionFactory, rabbitmq_case: RabbitMQCase, unbound_first: bool
) -> None:
    destination = rabbitmq_case.new_destination()
    receiver = rabbitmq_case.subscribe(destination, ["t.bound"])
    shared = uuid.uuid4()
    order = [("t.unbound", 1), ("t.bound", 2)]
    if not unbound_first:
        order.reverse()
    with Session.begin() as session:
        for type_, n in order:
            session.publish(
                {"n": n}, type=type_, destination=destination, key=f"k{n}", message_id=shared
            )
    relay = outboxer.Relay(engine, rabbitmq_case.transport, unroutable_attempts=1)
    stats = relay.run(once=True)
    left = [(r["message_type"], r["last_error"]) for r in outbox_rows(engine)]
    letters = [(d["message_type"], d["error_type"]) for d in dead_letters(engine)]
    assert letters == [("t.unbound", "unroutable")], (
        f"the unroutable row must be dead-lettered (unroutable_attempts=1); "
        f"dead letters: {letters}, rows left: {left}"
    )
    assert left == [], f"the routed row must be deleted as sent; rows left: {left}"
    assert (stats.sent, stats.dead_lettered) == (1, 1)
    got = receiver.receive(max_messages=10, timeout=5)
    for delivery in got:
        delivery.ack()
    receiver.close()
    assert [p["n"] for p in payloads(got)] == [2]


def test_returns_go_to_the_returned_message_among_duplicates_and_batches_in_flight(
    rabbitmq_case: RabbitMQCase,
) -> None:
    """Several messages per id, spread over batches on the wire at once: each return finds
    the message with its exchange and routing key, in publish order."""
    destination = rabbitmq_case.new_destination()
    receiver = rabbitmq_case.subscribe(destination, ["t.bound"])
    transport = rabbitmq_case.transport
    shared = [uuid.uuid4() for _ in range(3)]
    batches = [
        [
            _envelope(destination, shared[i % 3], "t.bound" if (i + b) % 2 else "t.unbound", i)
            for i in range(b * 10, b * 10 + 10)
        ]
        for b in range(3)
    ]
    pending = None
    futures = []
    for batch in batches:
        pending = transport.send_async(batch, after=pending)
        futures.append(pending)
    for batch, future in zip(batches, futures, strict=True):
        results = future.result(timeout=30)
        for envelope, result in zip(batch, results, strict=True):
            expected = Outcome.SENT if envelope.type == "t.bound" else Outcome.REJECTED
            assert result.outcome is expected, (envelope.type, result)
            if expected is Outcome.REJECTED:
                assert result.error_type == "unroutable"
    bound = sorted(
        int(e.payload.split(b": ")[1].rstrip(b"}"))
        for batch in batches
        for e in batch
        if e.type == "t.bound"
    )
    got = receiver.receive(max_messages=100, timeout=5)
    while len(got) < len(bound):
        more = receiver.receive(max_messages=100, timeout=5)
        if not more:
            break
        got.extend(more)
    for delivery in got:
        delivery.ack()
    receiver.close()
    assert sorted(p["n"] for p in payloads(got)) == bound


def test_among_messages_with_one_exchange_routing_key_and_id_a_return_goes_to_its_content() -> None:
    """Two messages with the same id, exchange and routing key can differ in fate only if
    the bindings changed between them; the returned body and properties tell which came
    back (here: the second, a handler's retry, while the first waits for its ack)."""
    from collections import deque

    from pika.spec import Basic, BasicProperties

    from outboxer.transports.rabbitmq.amqp import _Outgoing, _prepare
    from outboxer.transports.rabbitmq.confirms import _Batch, _Confirms

    shared = uuid.uuid4()
    first = _envelope("orders", shared, "t.placed", 1)
    retry = dataclasses.replace(first, handler="billing:charge", attempt=2)
    outgoing: list[_Outgoing] = []
    for i, envelope in enumerate([first, retry]):
        prepared = _prepare(i, envelope, 1 << 20, 1 << 16)
        assert isinstance(prepared, tuple)
        outgoing.append(prepared)
    batch = _Batch([None, None], outgoing, ["orders"])
    batch.tag_index = [0, 1]
    batch.confirmed = bytearray(2)
    confirms = object.__new__(_Confirms)
    channel = object()
    confirms._channel = channel  # type: ignore[assignment]
    confirms._in_flight = deque([batch])

    def give_back(message: _Outgoing, routing_key: str = "t.placed") -> None:
        properties = BasicProperties()
        properties.decode(message[4])
        method = Basic.Return(312, "NO_ROUTE", "orders", routing_key)
        confirms._on_return(channel, method, properties, message[3])  # type: ignore[arg-type]

    give_back(outgoing[1])
    assert batch.results[0] is None
    assert batch.results[1] is not None and batch.results[1].outcome is Outcome.REJECTED
    give_back(outgoing[0], "t.other")  # no message went out with that routing key
    assert batch.results[0] is None
    give_back(outgoing[0])
    assert batch.results[0] is not None and batch.results[0].error_type == "unroutable"
