"""Keeping many held SQS deliveries visible: ``ChangeMessageVisibilityBatch``, ten a call.

The consumer extends what it holds (in progress, or prefetched and waiting for a worker)
before the queue's visibility timeout runs out. One ``ChangeMessageVisibility`` call per
delivery, one after another, could not keep up with many held deliveries and a short
timeout: they came back while still held, and were processed twice. Runs against moto's
server with fresh, small queues; the handling of failed calls (pure policy) also against
botocore's Stubber.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

import outboxer
from outboxer.transports import Delivery, Subscription
from outboxer.transports.sqs import SQSTransport
from outboxer.visibility import extend_all

from .faultproxy import FaultProxy
from .models import Effect, OrderPlaced
from .test_consumer_hostile import ONCE, Running, effects, wait_until
from .test_review3_aws import queue_empty
from .test_transport_sqs import sqs, transport, unique

SessionFactory = sessionmaker[outboxer.OutboxSession]
SQLITE = pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)

__all__ = ["sqs", "transport"]

HELD = 60


class Calls:
    """Counts the SQS API calls a client makes (a botocore event hook)."""

    def __init__(self, client: Any) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        client.meta.events.register("before-call.sqs", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.counts[model.name] += 1


def filled_queue(sqs: Any, count: int, visibility: int) -> tuple[str, str]:
    """A fresh queue with ``visibility`` seconds' timeout and ``count`` messages."""
    name = unique("held")
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": str(visibility)})[
        "QueueUrl"
    ]
    for start in range(0, count, 10):
        entries = [{"Id": str(i), "MessageBody": f"m{start + i}"} for i in range(10)]
        sqs.send_message_batch(QueueUrl=url, Entries=entries[: count - start])
    return name, url


def hold(transport: SQSTransport, queue: str, count: int) -> list[Delivery]:
    """Receive ``count`` deliveries of ``queue`` and keep them."""
    receiver = transport.receiver(Subscription(queue=queue, prefetch=count))
    held: list[Delivery] = []
    deadline = time.monotonic() + 20
    try:
        while len(held) < count and time.monotonic() < deadline:
            held.extend(receiver.receive(count - len(held), 1.0))
    finally:
        receiver.close()
    assert len(held) == count, f"received {len(held)} of {count}"
    return held


def nothing_comes_back(sqs: Any, url: str, until: float) -> None:
    """Poll ``url`` until ``until`` (monotonic): no message may be handed out."""
    while time.monotonic() < until:
        wait = max(0, min(1, int(until - time.monotonic())))
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait)
        assert not got.get("Messages"), "a held message came back while it was held"


# The defect: one call per held delivery -------------------------------------------------


def test_extending_60_held_deliveries_takes_at_most_6_calls_and_keeps_them_all_hidden(
    transport: SQSTransport, sqs: Any
) -> None:
    """Failed before: ``ChangeMessageVisibility`` 60 times, one per delivery."""
    name, url = filled_queue(sqs, HELD, visibility=2)
    held = hold(transport, name, HELD)
    received = time.monotonic()
    calls = Calls(transport.queue_client)
    extend_all(held, 30)
    assert calls.counts.get("ChangeMessageVisibility", 0) == 0, calls.counts
    assert calls.counts["ChangeMessageVisibilityBatch"] <= HELD // 10, calls.counts
    nothing_comes_back(sqs, url, until=received + 3.5)  # the queue's 2 s, and some


@pytest.fixture
def slow_moto(moto_endpoint: str) -> Iterator[FaultProxy]:
    """moto behind a proxy that holds each chunk 20 ms: a round trip like a real region's."""
    with FaultProxy.to(moto_endpoint, 80) as proxy:
        proxy.delay(0.02)
        yield proxy


@SQLITE
def test_many_prefetched_deliveries_on_a_short_visibility_timeout_are_each_processed_once(
    engine: Engine, Session: SessionFactory, sqs: Any, moto_endpoint: str, slow_moto: FaultProxy
) -> None:
    """Failed before: deliveries waiting for one of the two workers came back while held
    (the queue's 3 s ran out before the one-by-one extension reached them, a round trip
    each): 16 to 18 of the 60 came twice (ConsumerStats.duplicates)."""
    destination = unique("dest")
    sqs.create_queue(QueueName=destination, Attributes={"VisibilityTimeout": "3"})
    handled: Counter[int] = Counter()
    lock = threading.Lock()
    consumer = outboxer.Consumer(
        Session, name=unique("held"), retry=ONCE, prefetch=HELD, batch_size=1
    )

    @consumer.handler(OrderPlaced, destination=destination)
    def work(event: OrderPlaced, session: Session) -> None:
        with lock:
            handled[event.order_id] += 1
        time.sleep(0.2)  # the work itself: 60 of them outlast the visibility timeout
        session.add(Effect(handler="work", message_key=str(event.order_id)))

    direct = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    through_proxy = SQSTransport(endpoint_url=slow_moto.endpoint, region="us-east-1")
    try:
        direct.receiver(consumer.subscription()).close()
        with Session.begin() as session:
            for n in range(HELD):
                session.publish(OrderPlaced(order_id=n), destination=destination)
        outboxer.Relay(engine, direct).run(once=True)
        with Running(consumer, through_proxy, concurrency=2) as running:
            wait_until(lambda: len(effects(engine)) == HELD, 25, "every order")
            url = direct.ensure_queue(destination)
            wait_until(lambda: queue_empty(sqs, url), 10, "every delivery settled")
        assert running.error is None, running.error
        assert [n for n, times in handled.items() if times > 1] == []
        assert len(handled) == HELD
        assert running.result.duplicates == 0, running.result
    finally:
        through_proxy.close()
        direct.close()


# What a batch call cannot do -----------------------------------------------------------------


def test_entries_whose_messages_are_gone_are_not_retried_nor_warned_about(
    transport: SQSTransport, sqs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Two of twelve held messages deleted behind the consumer's back: SQS fails their
    entries (receipt handle invalid); like one ``ChangeMessageVisibility`` finding its
    message gone, that is a debug line, and costs no further call."""
    name, url = filled_queue(sqs, 12, visibility=30)
    held = hold(transport, name, 12)
    for delivery in held[3:5]:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=delivery._receipt)  # type: ignore[attr-defined]
    calls = Calls(transport.queue_client)
    with caplog.at_level(logging.DEBUG, logger="outboxer"):
        extend_all(held, 30)
    assert calls.counts == {"ChangeMessageVisibilityBatch": 2}, calls.counts
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sum("the message is gone" in r.getMessage() for r in caplog.records) == 2


class FakeSQS:
    """A client whose batch call answers ``answer(entries)`` or raises it; every call and
    the receipt handles it named are kept."""

    def __init__(
        self, answer: Callable[[list[Any]], Any] | BaseException, single: BaseException | None
    ) -> None:
        self.answer = answer
        self.single = single
        self.calls: list[tuple[str, list[str]]] = []

    def change_message_visibility_batch(self, QueueUrl: str, Entries: list[Any]) -> Any:
        self.calls.append(("batch", [e["ReceiptHandle"] for e in Entries]))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer(Entries)

    def delete_message(self, QueueUrl: str, ReceiptHandle: str) -> None:
        self.calls.append(("delete", [ReceiptHandle]))

    def change_message_visibility(
        self, QueueUrl: str, ReceiptHandle: str, VisibilityTimeout: int
    ) -> None:
        self.calls.append(("single", [ReceiptHandle]))
        if self.single is not None:
            raise self.single


def fake_deliveries(client: FakeSQS, count: int, url: str = "q-url") -> list[Delivery]:
    from outboxer.transports.sqs.deliveries import _SQSDelivery

    return [
        _SQSDelivery(client, "q", url, {"MessageId": f"m{i}", "ReceiptHandle": f"r{i}"})  # type: ignore[arg-type]
        for i in range(count)
    ]


def client_error(code: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "refused"}}, operation)


def test_an_entry_that_fails_for_another_reason_is_extended_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def answer(entries: list[Any]) -> Any:
        failed = {"Id": entries[1]["Id"], "SenderFault": False, "Code": "InternalError"}
        return {"Successful": [{"Id": e["Id"]} for e in entries[::2]], "Failed": [failed]}

    client = FakeSQS(answer, single=None)
    extend_all(fake_deliveries(client, 3), 30)
    assert client.calls == [("batch", ["r0", "r1", "r2"]), ("single", ["r1"])]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_batch_call_sqs_refuses_is_done_one_at_a_time_each_failure_as_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = FakeSQS(
        client_error("AWS.SimpleQueueService.UnsupportedOperation", "ChangeMessageVisibilityBatch"),
        client_error("InternalError", "ChangeMessageVisibility"),
    )
    caplog.set_level(logging.WARNING, logger="outboxer")
    extend_all(fake_deliveries(client, 3), 30)
    assert client.calls == [("batch", ["r0", "r1", "r2"])] + [
        ("single", [f"r{i}"]) for i in range(3)
    ]
    assert sum("extend of" in r.getMessage() for r in caplog.records) == 3


def test_a_batch_call_that_does_not_reach_sqs_is_one_warning_and_no_call_per_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each alone would wait for the same connect timeout, one after another."""
    client = FakeSQS(EndpointConnectionError(endpoint_url="http://sqs"), single=None)
    caplog.set_level(logging.WARNING, logger="outboxer")
    extend_all(fake_deliveries(client, 25), 30)
    assert [kind for kind, _ in client.calls] == ["batch"] * 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all("extend of" in w for w in warnings), warnings
    assert "come back after their visibility timeout" in warnings[0]


def throttled(code: str, status: int) -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": "Rate exceeded"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "ChangeMessageVisibilityBatch",
    )


SQS_OVERLOADED = [
    ("RequestThrottled", 400),
    ("AWS.SimpleQueueService.RequestThrottled", 403),
    ("ThrottlingException", 400),
    ("Throttling", 400),
    ("InternalError", 500),
    ("ServiceUnavailable", 503),
    ("SomethingNew", 502),
]


@pytest.mark.parametrize(("code", "status"), SQS_OVERLOADED)
def test_a_batch_call_sqs_throttles_or_fails_on_is_one_warning_and_no_call_per_message(
    caplog: pytest.LogCaptureFixture, code: str, status: int
) -> None:
    """60 calls, one per message, to a service that is throttling already (review 6:
    6 batch calls, 60 single calls, 60 warnings in one round)."""
    client = FakeSQS(throttled(code, status), single=throttled(code, status))
    caplog.set_level(logging.WARNING, logger="outboxer")
    extend_all(fake_deliveries(client, HELD), 30)
    assert [kind for kind, _ in client.calls] == ["batch"] * (HELD // 10)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == HELD // 10 and all("extend of 10 messages" in w for w in warnings)
    assert code.removeprefix("AWS.SimpleQueueService.") in warnings[0]
    assert "come back after their visibility timeout" in warnings[0]
    assert all("\n" not in w for w in warnings)


def test_a_throttled_batch_call_on_moto_makes_no_call_per_message(
    transport: SQSTransport, sqs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SQS (moto) answers the batch call with RequestThrottled (a botocore hook in place
    of the request); the held deliveries are not extended one by one."""
    from botocore.awsrequest import AWSResponse

    name, _url = filled_queue(sqs, 20, visibility=30)
    held = hold(transport, name, 20)
    client = transport.queue_client
    calls = Calls(client)  # counts the calls that reach moto: none may

    def refuse(model: Any, **_: Any) -> Any:
        calls.counts["throttled " + model.name] += 1
        error = throttled("RequestThrottled", 400).response
        return AWSResponse("http://sqs", 400, {}, None), error

    client.meta.events.register("before-call.sqs.ChangeMessageVisibilityBatch", refuse)
    caplog.set_level(logging.WARNING, logger="outboxer")
    try:
        extend_all(held, 30)
    finally:
        client.meta.events.unregister("before-call.sqs.ChangeMessageVisibilityBatch", refuse)
    assert calls.counts == {"throttled ChangeMessageVisibilityBatch": 2}, calls.counts
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("RequestThrottled" in w for w in warnings), warnings


def test_batches_are_per_queue_ten_at_most_and_a_lone_delivery_is_one_plain_call() -> None:
    client = FakeSQS(lambda entries: {"Successful": [{"Id": e["Id"]} for e in entries]}, None)
    first, second = fake_deliveries(client, 11, "url-1"), fake_deliveries(client, 2, "url-2")
    extend_all([*first[:5], *second, *first[5:]], 30)
    assert client.calls == [
        ("batch", [f"r{i}" for i in range(10)]),
        ("single", ["r10"]),
        ("batch", ["r0", "r1"]),
    ]


def test_settled_deliveries_and_ones_being_settled_are_left_out() -> None:
    client = FakeSQS(lambda entries: {"Successful": [{"Id": e["Id"]} for e in entries]}, None)
    deliveries = fake_deliveries(client, 4)
    deliveries[0].ack()  # a plain delete
    settling = deliveries[1]._lock  # type: ignore[attr-defined]
    finished = threading.Event()

    def extend() -> None:
        extend_all(deliveries, 30)
        finished.set()

    with settling:  # another thread acknowledges it right now
        threading.Thread(target=extend, daemon=True).start()
        assert finished.wait(10), "extending waited for a delivery being settled"
    assert client.calls == [("delete", ["r0"]), ("batch", ["r2", "r3"])]


class _NoVisibility(Delivery):
    """A broker that holds a delivery until it is settled (RabbitMQ, the memory broker)."""

    def ack(self) -> None:
        raise AssertionError("not settled by extending")

    def release(self) -> None:
        raise AssertionError("not settled by extending")


class _Together(_NoVisibility):
    extended: list[str] = []

    def extend(self, seconds: float) -> None:
        self.extended.append("alone")

    @classmethod
    def extend_many(cls, deliveries: Sequence[Delivery], seconds: float) -> None:
        raise ConnectionResetError("the broker went away")


def test_deliveries_without_visibility_cost_nothing_and_a_failing_extend_many_goes_one_by_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from outboxer.transports.rabbitmq.deliveries import _RabbitDelivery

    assert _RabbitDelivery.extend is Delivery.extend  # RabbitMQ holds until settled
    caplog.set_level(logging.WARNING, logger="outboxer")
    extend_all([_NoVisibility(), _Together(), _Together()], 30)
    assert _Together.extended == ["alone", "alone"]
    assert caplog.records == []
