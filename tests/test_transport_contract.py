"""Every transport keeps the same contract: results per message, envelopes intact."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from outboxer import wire
from outboxer.ids import uuid7
from outboxer.message import Envelope
from outboxer.transports import Delivery, Outcome, Receiver

from .broker_cases import BrokerCase, MemoryCase

CASES = ["memory", "rabbitmq", "sqs", "sns"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Iterator[BrokerCase]:
    if request.param == "memory":
        made: BrokerCase = MemoryCase()
    elif request.param == "rabbitmq":
        made = request.getfixturevalue("rabbitmq_case")
    else:
        made = request.getfixturevalue(f"{request.param}_case")
    yield made
    made.close()


def envelope(destination: str, n: int = 0, **changes: object) -> Envelope:
    env = Envelope(
        message_id=uuid7(),
        type="contract.thing_happened",
        destination=destination,
        payload=b'{"n": %d}' % n,
        occurred_at=datetime.now(timezone.utc),
    )
    return replace(env, **changes) if changes else env  # type: ignore[arg-type]


def receive_all(receiver: Receiver, count: int, deadline: float = 20.0) -> list[Delivery]:
    got: list[Delivery] = []
    until = time.monotonic() + deadline
    while len(got) < count and time.monotonic() < until:
        got.extend(receiver.receive(max_messages=count - len(got), timeout=1.0))
    return got


def test_a_batch_is_sent_and_delivered_with_its_envelope_intact(case: BrokerCase) -> None:
    destination = case.new_destination()
    receiver = case.subscribe(destination)
    try:
        batch = [envelope(destination, i) for i in range(25)]
        batch[3] = replace(
            batch[3],
            key="order-42",
            correlation_id="corr-1",
            causation_id=str(uuid.uuid4()),
            headers={"tenant": "acme", "x-trace-me": "yes"},
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate="vendor=value",
            handler="billing.charge",
            attempt=3,
        )
        results = case.transport.send(batch)
        assert [r.outcome for r in results] == [Outcome.SENT] * len(batch)

        deliveries = receive_all(receiver, len(batch))
        by_id = {d.headers[wire.MESSAGE_ID]: d for d in deliveries}
        assert len(by_id) == len(batch)
        for sent in batch:
            delivered = by_id[str(sent.message_id)]
            assert delivered.body == sent.payload
            decoded = wire.decode(delivered.body, delivered.headers, sent.destination)
            assert decoded == sent
        for d in deliveries:
            d.ack()
        assert receive_all(receiver, 1, deadline=2.0) == []
    finally:
        receiver.close()


def test_a_released_delivery_comes_back_and_an_acked_one_does_not(case: BrokerCase) -> None:
    destination = case.new_destination()
    receiver = case.subscribe(destination)
    try:
        first, second = envelope(destination, 1), envelope(destination, 2)
        assert [r.outcome for r in case.transport.send([first, second])] == [Outcome.SENT] * 2
        deliveries = receive_all(receiver, 2)
        by_id = {d.headers[wire.MESSAGE_ID]: d for d in deliveries}
        by_id[str(first.message_id)].ack()
        by_id[str(second.message_id)].release()
        [again] = receive_all(receiver, 1)
        assert again.headers[wire.MESSAGE_ID] == str(second.message_id)
        again.ack()
        assert receive_all(receiver, 1, deadline=2.0) == []
    finally:
        receiver.close()


def test_only_the_unroutable_message_of_a_batch_is_rejected(case: BrokerCase) -> None:
    destination = case.new_destination()
    receiver = case.subscribe(destination)
    try:
        good1, good2 = envelope(destination, 1), envelope(destination, 2)
        lost = envelope(case.unroutable_destination(), 3)
        results = case.transport.send([good1, lost, good2])
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.REJECTED, Outcome.SENT]
        assert results[1].error_type == "unroutable"
        assert results[1].error
        delivered = {d.headers[wire.MESSAGE_ID] for d in receive_all(receiver, 2)}
        assert delivered == {str(good1.message_id), str(good2.message_id)}
    finally:
        receiver.close()


def test_an_oversize_message_is_rejected_with_the_limit_in_the_reason(case: BrokerCase) -> None:
    limit = case.transport.max_message_bytes
    assert limit is not None, "every transport states its message size limit"
    destination = case.new_destination()
    receiver = case.subscribe(destination)
    try:
        big = envelope(destination, payload=b'"' + b"x" * limit + b'"')
        small = envelope(destination, 1)
        results = case.transport.send([big, small])
        assert [r.outcome for r in results] == [Outcome.REJECTED, Outcome.SENT]
        assert results[0].error_type == "message_too_large"
        assert str(limit) in (results[0].error or "")
        [delivered] = receive_all(receiver, 1)
        assert delivered.headers[wire.MESSAGE_ID] == str(small.message_id)
    finally:
        receiver.close()


def test_an_unreachable_broker_makes_every_message_unavailable_quickly(case: BrokerCase) -> None:
    transport = case.unreachable_transport()
    try:
        started = time.monotonic()
        results = transport.send([envelope("anywhere", i) for i in range(3)])
        assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 3
        assert all(r.error for r in results)
        assert time.monotonic() - started < 15
    finally:
        transport.close()
