"""The sns:// transport on moto's server: fan-out, type filters, FIFO order, the topology
a consumer sets up (idempotent), the error mapping and the URL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

import outboxer
from outboxer import wire
from outboxer.errors import ConfigurationError, InvalidName
from outboxer.ids import uuid7
from outboxer.message import Envelope
from outboxer.transports import Delivery, Outcome, Receiver, Subscription
from outboxer.transports.sns import SNSTransport
from outboxer.transports.sns.topology import POLICY_SID, allow_topics, plan_routes

from .test_transport_contract import receive_all


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def transport(moto_endpoint: str) -> Iterator[SNSTransport]:
    made = SNSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    yield made
    made.close()


def envelope(destination: str, n: int = 0, **fields: Any) -> Envelope:
    return Envelope(
        message_id=uuid7(),
        type=fields.pop("type", "shop.order_placed"),
        destination=destination,
        payload=b'{"n": %d}' % n,
        occurred_at=datetime.now(timezone.utc),
        **fields,
    )


def acked(receiver: Receiver, count: int, deadline: float = 20.0) -> list[Delivery]:
    """Up to ``count`` deliveries, each acknowledged as it comes (a FIFO queue hands out a
    group's next message only once the one before is settled)."""
    got: list[Delivery] = []
    until = time.monotonic() + deadline
    while len(got) < count and time.monotonic() < until:
        batch = receiver.receive(max_messages=count - len(got), timeout=1.0)
        for delivery in batch:
            delivery.ack()
        got.extend(batch)
    return got


def numbers(receiver: Receiver, count: int) -> list[int]:
    return [json.loads(d.body)["n"] for d in acked(receiver, count)]


def test_two_consumers_of_one_topic_each_receive_every_message(transport: SNSTransport) -> None:
    topic = unique("orders")
    billing = transport.receiver(Subscription(unique("billing"), [(topic, "shop.order_placed")]))
    audit = transport.receiver(Subscription(unique("audit"), [(topic, "shop.order_placed")]))
    try:
        results = transport.send([envelope(topic, n) for n in range(6)])
        assert [r.outcome for r in results] == [Outcome.SENT] * 6
        assert all(r.broker_message_id for r in results)
        assert sorted(numbers(billing, 6)) == list(range(6))
        assert sorted(numbers(audit, 6)) == list(range(6))
        assert billing.receive(10, 0) == [] and audit.receive(10, 0) == []
    finally:
        billing.close()
        audit.close()


def test_a_queue_gets_only_the_types_its_consumer_handles(transport: SNSTransport) -> None:
    topic = unique("orders")
    placed = transport.receiver(Subscription(unique("billing"), [(topic, "shop.order_placed")]))
    every = transport.receiver(Subscription(unique("audit"), [(topic, "#")]))
    try:
        sent = transport.send([envelope(topic, 1), envelope(topic, 2, type="shop.order_cancelled")])
        assert [r.outcome for r in sent] == [Outcome.SENT] * 2
        assert sorted(numbers(every, 2)) == [1, 2]
        # Both were fanned out by then; waiting for a second one here took the 20 s deadline.
        assert numbers(placed, 1) == [1]
        assert placed.receive(10, 0) == []
    finally:
        placed.close()
        every.close()


def test_headers_survive_raw_delivery(transport: SNSTransport) -> None:
    topic = unique("orders")
    receiver = transport.receiver(Subscription(unique("billing"), [(topic, "#")]))
    try:
        sent = envelope(topic, 7, key="customer-1", headers={"tenant": "acme"})
        assert transport.send([sent])[0].outcome is Outcome.SENT
        (delivery,) = receive_all(receiver, 1)
        assert delivery.headers[wire.MESSAGE_ID] == str(sent.message_id)
        assert delivery.headers[wire.KEY] == "customer-1"
        assert wire.decode(delivery.body, delivery.headers, topic).headers == {"tenant": "acme"}
        delivery.ack()
    finally:
        receiver.close()


def test_a_fifo_topic_keeps_each_keys_order_into_the_consumers_fifo_queue(
    transport: SNSTransport, aws: tuple[Any, Any]
) -> None:
    topic = unique("orders") + ".fifo"
    name = unique("billing")
    receiver = transport.receiver(Subscription(name, [(topic, "#")]))
    try:
        batch = [envelope(topic, n, key=f"customer-{n % 3}") for n in range(30)]
        assert [r.outcome for r in transport.send(batch)] == [Outcome.SENT] * 30
        got = acked(receiver, 30)
        assert {delivery.destination for delivery in got} == {name + ".fifo"}
        by_key: dict[str, list[int]] = {}
        for delivery in got:
            key = delivery.headers[wire.KEY]
            by_key.setdefault(key, []).append(json.loads(delivery.body)["n"])
        assert by_key == {f"customer-{k}": list(range(k, 30, 3)) for k in range(3)}
    finally:
        receiver.close()
    _, sqs = aws
    url = sqs.get_queue_url(QueueName=name + ".fifo")["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["FifoQueue"])
    assert attributes["Attributes"]["FifoQueue"] == "true"


def test_a_consumers_retries_reach_it_through_its_own_topic(transport: SNSTransport) -> None:
    name = unique("billing")
    receiver = transport.receiver(Subscription(name, [(unique("orders"), "shop.order_placed")]))
    try:
        retry = envelope(name, 3, handler="charge", attempt=2)
        assert transport.send([retry])[0].outcome is Outcome.SENT
        (delivery,) = receive_all(receiver, 1)
        assert delivery.headers[wire.HANDLER] == "charge"
        delivery.ack()
    finally:
        receiver.close()


def test_a_topic_nobody_subscribed_to_is_unroutable_until_a_consumer_subscribes(
    transport: SNSTransport,
) -> None:
    topic = unique("orders")
    (result,) = transport.send([envelope(topic)])
    assert result.outcome is Outcome.REJECTED and result.error_type == "unroutable"
    assert "no subscription" in (result.error or "") and "outboxer-inbox" in (result.error or "")
    receiver = transport.receiver(Subscription(unique("billing"), [(topic, "#")]))
    try:
        assert transport.send([envelope(topic, 1)])[0].outcome is Outcome.SENT
        assert numbers(receiver, 1) == [1]
    finally:
        receiver.close()


def test_a_type_no_subscription_takes_is_unroutable_until_a_consumer_takes_it(
    transport: SNSTransport,
) -> None:
    topic = unique("orders")
    placed = transport.receiver(Subscription(unique("billing"), [(topic, "shop.order_placed")]))
    try:
        cancelled = envelope(topic, 1, type="shop.order_cancelled")
        results = transport.send([envelope(topic, 0), cancelled])
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.REJECTED]
        assert results[1].error_type == "unroutable"
        assert "takes type 'shop.order_cancelled'" in (results[1].error or "")
        every = transport.receiver(Subscription(unique("audit"), [(topic, "#")]))
        try:
            assert transport.send([cancelled])[0].outcome is Outcome.SENT
            assert numbers(every, 1) == [1]
        finally:
            every.close()
        assert numbers(placed, 1) == [0]
    finally:
        placed.close()


def test_the_topology_is_set_up_once_and_follows_the_handlers_at_restart(
    transport: SNSTransport, aws: tuple[Any, Any]
) -> None:
    sns, sqs = aws
    topic, name = unique("orders"), unique("billing")
    for types in (["shop.order_placed"], ["shop.order_placed"], ["shop.order_placed", "x.y"]):
        transport.receiver(Subscription(name, [(topic, t) for t in types])).close()
    topic_arn = sns.create_topic(Name=topic)["TopicArn"]
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    subscriptions = sns.list_subscriptions_by_topic(TopicArn=topic_arn)["Subscriptions"]
    assert [s["Endpoint"] for s in subscriptions] == [attributes["QueueArn"]]
    settings = sns.get_subscription_attributes(SubscriptionArn=subscriptions[0]["SubscriptionArn"])[
        "Attributes"
    ]
    assert settings["RawMessageDelivery"] == "true"
    assert json.loads(settings["FilterPolicy"]) == {"outboxer-type": ["shop.order_placed", "x.y"]}
    (statement,) = json.loads(attributes["Policy"])["Statement"]
    assert statement["Sid"] == POLICY_SID
    assert statement["Principal"] == {"Service": "sns.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Resource"] == attributes["QueueArn"]
    own_arn = sns.create_topic(Name=name)["TopicArn"]
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == sorted([topic_arn, own_arn])


def test_the_queue_policy_keeps_other_statements_and_changes_only_when_needed() -> None:
    other = {"Sid": "theirs", "Effect": "Deny", "Principal": "*", "Action": "sqs:*"}
    current = json.dumps({"Version": "2012-10-17", "Statement": [other]})
    policy = allow_topics(current, "arn:queue", ["arn:topic-a"])
    assert policy is not None
    statements = json.loads(policy)["Statement"]
    assert statements[0] == other and statements[1]["Sid"] == POLICY_SID
    assert allow_topics(policy, "arn:queue", ["arn:topic-a"]) is None
    wider = allow_topics(policy, "arn:queue", ["arn:topic-b"])
    assert wider is not None
    allowed = json.loads(wider)["Statement"][1]["Condition"]["ArnEquals"]["aws:SourceArn"]
    assert allowed == ["arn:topic-a", "arn:topic-b"]


def test_fifo_topics_deliver_to_the_consumers_fifo_queue_and_the_rest_to_its_queue() -> None:
    subscription = Subscription(
        "billing", [("orders.fifo", "a"), ("orders.fifo", "b"), ("events", "#"), ("events", "c")]
    )
    routes = {(r.topic, r.queue, r.types) for r in plan_routes(subscription)}
    assert routes == {
        ("billing", "billing", None),
        ("orders.fifo", "billing.fifo", frozenset({"a", "b"})),
        ("events", "billing", None),
    }


class FailingSNS:
    """An SNS client whose PublishBatch fails with ``error`` (a botocore exception)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def create_topic(self, Name: str, Attributes: dict[str, str]) -> dict[str, str]:
        return {"TopicArn": f"arn:aws:sns:us-east-1:123456789012:{Name}"}

    def list_subscriptions_by_topic(self, TopicArn: str) -> dict[str, Any]:
        return {"Subscriptions": [{"SubscriptionArn": TopicArn + ":1"}]}

    def publish_batch(self, **request: Any) -> dict[str, Any]:
        self.calls += 1
        raise self.error

    def close(self) -> None:
        pass


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"it said {code}"}}, "PublishBatch")


@pytest.mark.parametrize(
    ("error", "outcome", "error_type"),
    [
        (client_error("Throttled"), Outcome.RETRY, "Throttled"),
        (client_error("InternalError"), Outcome.RETRY, "InternalError"),
        (client_error("AuthorizationError"), Outcome.RETRY, "AuthorizationError"),
        (client_error("InvalidClientTokenId"), Outcome.UNAVAILABLE, "InvalidClientTokenId"),
        (client_error("NotFound"), Outcome.REJECTED, "unroutable"),
        (client_error("InvalidParameter"), Outcome.REJECTED, "InvalidParameter"),
        (
            EndpointConnectionError(endpoint_url="http://nowhere"),
            Outcome.UNAVAILABLE,
            "EndpointConnectionError",
        ),
    ],
)
def test_failed_calls_map_to_outcomes_as_on_sqs(
    moto_endpoint: str, error: Exception, outcome: Outcome, error_type: str
) -> None:
    fake = FailingSNS(error)
    transport = SNSTransport(fake, endpoint_url=moto_endpoint, region="us-east-1")
    try:
        results = transport.send([envelope("orders", n) for n in range(2)])
    finally:
        transport.close()
    assert [(r.outcome, r.error_type) for r in results] == [(outcome, error_type)] * 2
    # A call refused as invalid is made again one message per call, to find the bad one.
    assert fake.calls == (3 if error_type == "InvalidParameter" else 1)


class OneFailure(FailingSNS):
    """PublishBatch succeeds except for the entry at ``position`` of the first call."""

    def __init__(self, position: int) -> None:
        super().__init__(RuntimeError("unused"))
        self.position = position
        self.published: list[int] = []

    def publish_batch(self, **request: Any) -> dict[str, Any]:
        self.calls += 1
        ok, failed = [], []
        for entry in request["PublishBatchRequestEntries"]:
            if self.calls == 1 and entry["Id"] == str(self.position):
                failed.append({"Id": entry["Id"], "Code": "InternalError", "SenderFault": False})
            else:
                self.published.append(json.loads(entry["Message"])["n"])
                ok.append({"Id": entry["Id"], "MessageId": f"m{len(self.published)}"})
        return {"Successful": ok, "Failed": failed}


def test_a_keys_later_messages_wait_behind_one_that_failed(moto_endpoint: str) -> None:
    fake = OneFailure(position=9)
    transport = SNSTransport(fake, endpoint_url=moto_endpoint, region="us-east-1")
    try:
        batch = [envelope("orders.fifo", n, key="customer-1") for n in range(12)]
        batch.append(envelope("orders.fifo", 12, key="customer-2"))
        results = transport.send(batch)
    finally:
        transport.close()
    assert [r.outcome for r in results[:9]] == [Outcome.SENT] * 9
    assert (results[9].outcome, results[9].error_type) == (Outcome.RETRY, "InternalError")
    assert [(r.outcome, r.error_type) for r in results[10:12]] == [(Outcome.RETRY, "held_back")] * 2
    assert results[12].outcome is Outcome.SENT  # another key does not wait
    assert sorted(fake.published) == [*range(9), 12]


def test_the_sns_url_takes_the_sqs_options_and_refuses_others(moto_endpoint: str) -> None:
    url = f"sns://?region=eu-west-1&endpoint_url={moto_endpoint}&concurrency=3"
    with outboxer.transport_from_url(url) as transport:
        assert isinstance(transport, SNSTransport)
        assert (transport.region, transport.concurrency) == ("eu-west-1", 3)
        assert transport.queues.region == "eu-west-1"
        assert transport.description.system == "aws_sns"
        transport.check()
    with pytest.raises(ConfigurationError, match="unknown sns:// URL option 'concurency'"):
        outboxer.transport_from_url("sns://?region=eu-west-1&concurency=3")
    with pytest.raises(ConfigurationError, match="sns://KEY:SECRET"):
        outboxer.transport_from_url("sns://KEYONLY@?region=eu-west-1")


def test_names_sns_refuses_are_refused_before_anything_is_created(
    transport: SNSTransport,
) -> None:
    (result,) = transport.send([envelope("shop.orders")])
    assert result.outcome is Outcome.REJECTED and result.error_type == "invalid_name"
    assert "'shop-orders'" in (result.error or "")
    with pytest.raises(InvalidName, match="shop-orders"):
        transport.validate_name("shop.orders", "destination")
