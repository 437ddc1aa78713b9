"""SQS specifics: FIFO group and deduplication ids, order per key, batch limits, attribute
packing, error mapping, receiving, and URL options. Runs against moto's server, except
the error mapping (pure policy), which uses botocore's Stubber or a small fake client.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.stub import Stubber

from outboxer import wire
from outboxer.errors import ConfigurationError, TransportError
from outboxer.ids import uuid7
from outboxer.message import Envelope
from outboxer.transports import Delivery, Outcome, Receiver, Subscription, transport_from_url
from outboxer.transports.sqs import PACKED_HEADERS, SQSTransport

KIB = 1024


def envelope(destination: str, n: int = 0, **changes: Any) -> Envelope:
    env = Envelope(
        message_id=uuid7(),
        type="sqs.thing_happened",
        destination=destination,
        payload=b'{"n": %d}' % n,
        occurred_at=datetime.now(timezone.utc),
    )
    return replace(env, **changes) if changes else env


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sqs(moto_endpoint: str) -> Iterator[Any]:
    """A raw boto3 client on the moto server, to look behind the transport's back."""
    client = boto3.client("sqs", endpoint_url=moto_endpoint, region_name="us-east-1")
    yield client
    client.close()


@pytest.fixture
def transport(moto_endpoint: str) -> Iterator[SQSTransport]:
    made = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    yield made
    made.close()


def new_queue(sqs: Any, fifo: bool = False) -> tuple[str, str]:
    name = unique("t") + (".fifo" if fifo else "")
    attributes = {"FifoQueue": "true"} if fifo else {}
    return name, sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]


def drain(sqs: Any, url: str, count: int, deadline: float = 20.0) -> list[dict[str, Any]]:
    """Receive (and delete) ``count`` messages in arrival order, with their attributes."""
    got: list[dict[str, Any]] = []
    until = time.monotonic() + deadline
    while len(got) < count and time.monotonic() < until:
        response = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["MessageGroupId", "MessageDeduplicationId"],
        )
        messages = response.get("Messages", [])
        got.extend(messages)
        if messages:
            sqs.delete_message_batch(
                QueueUrl=url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(messages)
                ],
            )
    return got


def receive_all(receiver: Receiver, count: int, deadline: float = 20.0) -> list[Delivery]:
    got: list[Delivery] = []
    until = time.monotonic() + deadline
    while len(got) < count and time.monotonic() < until:
        got.extend(receiver.receive(max_messages=count - len(got), timeout=1.0))
    return got


def record_calls(client: Any) -> list[list[dict[str, Any]]]:
    """The entries of every SendMessageBatch call ``client`` makes from now on."""
    calls: list[list[dict[str, Any]]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        calls.append(list(params["Entries"]))

    client.meta.events.register("provide-client-params.sqs.SendMessageBatch", hook)
    return calls


def entry_size(entry: dict[str, Any]) -> int:
    size = len(entry["MessageBody"].encode())
    for name, value in entry.get("MessageAttributes", {}).items():
        size += len(name) + len(value["DataType"]) + len(value["StringValue"].encode())
    return size


# FIFO ----------------------------------------------------------------------------------


def test_fifo_messages_are_grouped_by_key_and_deduplicated_by_message_id(
    transport: SQSTransport, sqs: Any
) -> None:
    name, url = new_queue(sqs, fifo=True)
    keyed = envelope(name, 1, key="order-42")
    unkeyed = envelope(name, 2)
    results = transport.send([keyed, unkeyed])
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]

    by_id = {
        m["MessageAttributes"][wire.MESSAGE_ID]["StringValue"]: m["Attributes"]
        for m in drain(sqs, url, 2)
    }
    assert by_id[str(keyed.message_id)]["MessageGroupId"] == "order-42"
    assert by_id[str(keyed.message_id)]["MessageDeduplicationId"] == str(keyed.message_id)
    # No key, no order asked for: each unkeyed message is its own group.
    assert by_id[str(unkeyed.message_id)]["MessageGroupId"] == str(unkeyed.message_id)
    assert by_id[str(unkeyed.message_id)]["MessageDeduplicationId"] == str(unkeyed.message_id)


def test_a_key_sqs_would_refuse_as_group_id_is_replaced_by_a_stable_hash(
    transport: SQSTransport, sqs: Any
) -> None:
    name, url = new_queue(sqs, fifo=True)
    odd_key = "tenant 7 / " + "é" * 200
    first, second = envelope(name, 1, key=odd_key), envelope(name, 2, key=odd_key)
    assert [r.outcome for r in transport.send([first, second])] == [Outcome.SENT] * 2
    groups = {m["Attributes"]["MessageGroupId"] for m in drain(sqs, url, 2)}
    [group] = groups
    assert group != odd_key
    assert len(group) <= 128


def test_a_targeted_retry_of_the_same_message_is_not_deduplicated_on_fifo(
    transport: SQSTransport, sqs: Any
) -> None:
    name, url = new_queue(sqs, fifo=True)
    original = envelope(name, 1, key="k")
    again = original  # a plain resend of the same message id: SQS drops it
    retry2 = replace(original, handler="billing.charge", attempt=2)
    retry3 = replace(original, handler="billing.charge", attempt=3)
    for batch in ([original], [again], [retry2], [retry3]):
        assert [r.outcome for r in transport.send(batch)] == [Outcome.SENT]

    messages = drain(sqs, url, 3)
    assert len(messages) == 3
    left = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", [])
    assert left == [], "the plain resend is deduplicated, each retry is not"
    attempts = [
        m["MessageAttributes"].get(PACKED_HEADERS, {}).get("StringValue", "") for m in messages
    ]
    assert attempts[0] == ""
    assert '"outboxer-attempt":"2"' in attempts[1]
    assert '"outboxer-attempt":"3"' in attempts[2]
    dedup_ids = {m["Attributes"]["MessageDeduplicationId"] for m in messages}
    assert len(dedup_ids) == 3
    assert all(len(d) <= 128 for d in dedup_ids)


def test_messages_with_the_same_key_keep_their_order_across_parallel_calls(
    moto_endpoint: str, sqs: Any
) -> None:
    name, url = new_queue(sqs, fifo=True)
    transport = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1", concurrency=8)
    try:
        calls = record_calls(transport.client)
        batch = [envelope(name, n, key=f"key-{n % 5}") for n in range(200)]
        assert {r.outcome for r in transport.send(batch)} == {Outcome.SENT}
    finally:
        transport.close()
    assert len(calls) == 20, "200 messages over 5 keys still fill calls of ten"

    seen: dict[str, list[int]] = {}
    for message in drain(sqs, url, 200, deadline=40.0):
        n = int(message["Body"].split(":")[1].strip(" }"))
        seen.setdefault(message["Attributes"]["MessageGroupId"], []).append(n)
    assert sum(len(ns) for ns in seen.values()) == 200
    for key in range(5):
        assert seen[f"key-{key}"] == list(range(key, 200, 5))


# Batches and sizes ---------------------------------------------------------------------


def test_a_batch_over_256_kib_is_split_by_size_and_every_message_arrives(
    transport: SQSTransport, sqs: Any
) -> None:
    name, url = new_queue(sqs)
    calls = record_calls(transport.client)
    blob = b'"' + b"x" * (100 * KIB) + b'"'
    batch = [envelope(name, payload=blob) for _ in range(7)]  # ~700 KiB, 7 entries
    assert {r.outcome for r in transport.send(batch)} == {Outcome.SENT}

    assert len(calls) >= 3
    assert all(len(call) <= 10 for call in calls)
    assert all(sum(entry_size(e) for e in call) <= 256 * KIB for call in calls)
    ids = {m["MessageAttributes"][wire.MESSAGE_ID]["StringValue"] for m in drain(sqs, url, 7)}
    assert ids == {str(e.message_id) for e in batch}


def test_the_size_limit_counts_attributes_as_sqs_does(transport: SQSTransport, sqs: Any) -> None:
    name, _ = new_queue(sqs)
    limit = transport.max_message_bytes
    assert limit == 256 * KIB
    # The body alone fits; with its attributes the message does not.
    body = b'"' + b"x" * (limit - 100) + b'"'
    fits = b'"' + b"x" * (limit - 400) + b'"'
    result, ok = transport.send([envelope(name, payload=body), envelope(name, payload=fits)])
    assert ok.outcome is Outcome.SENT
    assert result.outcome is Outcome.REJECTED
    assert result.error_type == "message_too_large"
    assert str(limit) in (result.error or "")


def test_no_more_than_ten_attributes_are_sent_and_the_headers_come_back_intact(
    transport: SQSTransport, sqs: Any
) -> None:
    name, _ = new_queue(sqs)
    calls = record_calls(transport.client)
    full = envelope(
        name,
        key="order-1",
        correlation_id="corr",
        causation_id="cause",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate="vendor=value",
        handler="billing.charge",
        attempt=2,
        headers={f"h{i}": f"value {i}" for i in range(15)} | {"empty": "", "ünï": "cödé"},
    )
    receiver = transport.receiver(Subscription(queue=unique("consumer"), bindings=[(name, "#")]))
    try:
        assert [r.outcome for r in transport.send([full])] == [Outcome.SENT]
        [[entry]] = calls
        assert len(entry["MessageAttributes"]) == 10
        assert set(entry["MessageAttributes"]) == (wire.RESERVED - {wire.HANDLER, wire.ATTEMPT}) | {
            PACKED_HEADERS
        }
        [delivery] = receive_all(receiver, 1)
        assert dict(delivery.headers) == wire.encode_headers(full)
        assert wire.decode(delivery.body, delivery.headers, name) == full
        delivery.ack()
    finally:
        receiver.close()


def test_a_queue_deleted_after_its_url_was_cached_makes_messages_unroutable(
    transport: SQSTransport, sqs: Any
) -> None:
    name, url = new_queue(sqs)
    assert [r.outcome for r in transport.send([envelope(name)])] == [Outcome.SENT]
    sqs.delete_queue(QueueUrl=url)
    [result] = transport.send([envelope(name)])
    assert (result.outcome, result.error_type) == (Outcome.REJECTED, "unroutable")
    assert name in (result.error or "")
    sqs.create_queue(QueueName=name)
    assert [r.outcome for r in transport.send([envelope(name)])] == [Outcome.SENT]


# Error mapping (pure policy: a stubbed or fake client) ----------------------------------


@pytest.fixture
def stubbed() -> Iterator[tuple[SQSTransport, Stubber]]:
    client = boto3.client(
        "sqs",
        region_name="us-east-1",
        aws_access_key_id="stub",
        aws_secret_access_key="stub",
    )
    stubber = Stubber(client)
    stubber.add_response(
        "get_queue_url",
        {"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/q"},
        {"QueueName": "q"},
    )
    stubber.activate()
    transport = SQSTransport(client)
    yield transport, stubber
    transport.close()
    stubber.deactivate()


def test_failed_entries_with_sender_fault_are_rejected_and_the_others_retried(
    stubbed: tuple[SQSTransport, Stubber],
) -> None:
    transport, stubber = stubbed
    stubber.add_response(
        "send_message_batch",
        {
            "Successful": [{"Id": "0", "MessageId": "m0", "MD5OfMessageBody": "x"}],
            "Failed": [
                {
                    "Id": "1",
                    "SenderFault": True,
                    "Code": "InvalidMessageContents",
                    "Message": "bad",
                },
                {"Id": "2", "SenderFault": False, "Code": "InternalError", "Message": "oops"},
            ],
        },
    )
    results = transport.send([envelope("q", n) for n in range(3)])
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.REJECTED, Outcome.RETRY]
    assert results[0].broker_message_id == "m0"
    assert (results[1].error_type, results[1].error) == ("InvalidMessageContents", "bad")
    assert (results[2].error_type, results[2].error) == ("InternalError", "oops")
    stubber.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status", "outcome"),
    [
        ("ThrottlingException", 400, Outcome.RETRY),
        ("RequestThrottled", 403, Outcome.RETRY),
        ("ServiceUnavailable", 503, Outcome.RETRY),
        ("InternalError", 500, Outcome.RETRY),
        ("KmsThrottled", 400, Outcome.RETRY),
        ("InvalidClientTokenId", 403, Outcome.UNAVAILABLE),
    ],
)
def test_whole_call_errors_map_to_retry_or_unavailable(
    stubbed: tuple[SQSTransport, Stubber], code: str, status: int, outcome: Outcome
) -> None:
    transport, stubber = stubbed
    stubber.add_client_error("send_message_batch", service_error_code=code, http_status_code=status)
    results = transport.send([envelope("q", n) for n in range(3)])
    assert [r.outcome for r in results] == [outcome] * 3
    assert all(r.error_type == code for r in results)


def test_a_batch_refused_as_invalid_is_resent_one_by_one_to_find_the_bad_message(
    stubbed: tuple[SQSTransport, Stubber],
) -> None:
    transport, stubber = stubbed
    stubber.add_client_error(
        "send_message_batch", service_error_code="InvalidParameterValue", http_status_code=400
    )
    ok = {"Successful": [{"Id": "0", "MessageId": "m", "MD5OfMessageBody": "x"}], "Failed": []}
    stubber.add_response("send_message_batch", ok)
    stubber.add_client_error(
        "send_message_batch",
        service_error_code="InvalidParameterValue",
        service_message="Message contains invalid characters",
        http_status_code=400,
    )
    stubber.add_response("send_message_batch", ok)
    results = transport.send([envelope("q", n) for n in range(3)])
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.REJECTED, Outcome.SENT]
    assert results[1].error_type == "InvalidParameterValue"
    assert "invalid characters" in (results[1].error or "")
    stubber.assert_no_pending_responses()


class FakeSQS:
    """Just enough of a boto3 SQS client: every call succeeds unless told otherwise."""

    def __init__(self, fail: BaseException | None = None, parties: int = 0) -> None:
        self.meta = SimpleNamespace(
            region_name="us-east-1",
            endpoint_url="http://fake.invalid",
            config=Config(read_timeout=30),
        )
        self.fail = fail
        self.calls: list[list[dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(parties, timeout=5) if parties else None

    def get_queue_url(self, QueueName: str) -> dict[str, Any]:
        return {"QueueUrl": f"http://fake.invalid/1/{QueueName}"}

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            self.calls.append(list(Entries))
        if self.fail is not None:
            raise self.fail
        if self._barrier is not None:
            self._barrier.wait()  # only returns when `parties` calls are in flight together
        ok = [{"Id": e["Id"], "MessageId": f"m{e['Id']}", "MD5OfMessageBody": ""} for e in Entries]
        return {"Successful": ok, "Failed": []}

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "error",
    [
        EndpointConnectionError(endpoint_url="http://fake.invalid"),
        ReadTimeoutError(endpoint_url="http://fake.invalid"),
    ],
)
def test_connection_errors_make_the_whole_call_unavailable(error: Exception) -> None:
    transport = SQSTransport(FakeSQS(fail=error))  # type: ignore[arg-type]
    results = transport.send([envelope("q", n) for n in range(12)])
    assert [r.outcome for r in results] == [Outcome.UNAVAILABLE] * 12
    assert all(type(error).__name__ in (r.error or "") for r in results)


def test_later_messages_of_a_key_are_held_back_when_an_earlier_call_fails() -> None:
    class FailFirst(FakeSQS):
        def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> Any:
            if not self.calls:
                self.calls.append(list(Entries))
                return {
                    "Successful": [],
                    "Failed": [
                        {"Id": e["Id"], "SenderFault": False, "Code": "InternalError"}
                        for e in Entries
                    ],
                }
            return super().send_message_batch(QueueUrl, Entries)

    fake = FailFirst()
    transport = SQSTransport(fake, concurrency=1)  # type: ignore[arg-type]
    batch = [envelope("q", n, key="k" if n % 2 else None) for n in range(20)]
    results = transport.send(batch)
    assert [r.outcome for r in results[:10]] == [Outcome.RETRY] * 10
    # Of the second call, the unkeyed messages go; those with key "k" wait their turn.
    assert [r.outcome for r in results[10:]] == [Outcome.SENT, Outcome.RETRY] * 5
    assert {r.error_type for r in results[11::2]} == {"held_back"}
    assert len(fake.calls[1]) == 5


def test_several_calls_are_in_flight_at_once_and_calls_carry_ten_entries() -> None:
    fake = FakeSQS(parties=4)
    transport = SQSTransport(fake, concurrency=4)  # type: ignore[arg-type]
    try:
        unkeyed = [envelope("q", n) for n in range(40)]
        assert {r.outcome for r in transport.send(unkeyed)} == {Outcome.SENT}
        assert [len(c) for c in fake.calls] == [10] * 4
        fake.calls.clear()
        many_keys = [envelope("q", n, key=f"k{n}") for n in range(40)]
        assert {r.outcome for r in transport.send(many_keys)} == {Outcome.SENT}
        assert [len(c) for c in fake.calls] == [10] * 4
    finally:
        transport.close()


# Receiving -----------------------------------------------------------------------------


def test_a_receiver_reads_its_own_queue_and_its_destinations_without_starving_either(
    transport: SQSTransport, sqs: Any
) -> None:
    name, _ = new_queue(sqs)
    own = unique("consumer")
    receiver = transport.receiver(Subscription(queue=own, bindings=[(name, "a"), (name, "b")]))
    try:
        to_destination = [envelope(name, n) for n in range(15)]
        to_own = [envelope(own, 100 + n) for n in range(3)]
        transport.send(to_destination + to_own)
        deliveries = receive_all(receiver, 18)
        assert {d.destination for d in deliveries} == {name, own}
        assert len({d.headers[wire.MESSAGE_ID] for d in deliveries}) == 18
        for d in deliveries:
            d.ack()
    finally:
        receiver.close()


def test_receiving_from_several_empty_queues_waits_about_the_timeout(
    transport: SQSTransport, sqs: Any
) -> None:
    name, _ = new_queue(sqs)
    receiver = transport.receiver(Subscription(queue=unique("consumer"), bindings=[(name, "#")]))
    try:
        started = time.monotonic()
        assert receiver.receive(max_messages=10, timeout=1.0) == []
        assert time.monotonic() - started < 2.5
    finally:
        receiver.close()


def test_a_fifo_consumer_queue_is_created_as_fifo(transport: SQSTransport, sqs: Any) -> None:
    own = unique("consumer") + ".fifo"
    receiver = transport.receiver(Subscription(queue=own))
    try:
        url = sqs.get_queue_url(QueueName=own)["QueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["FifoQueue"])
        assert attributes["Attributes"]["FifoQueue"] == "true"
        assert receiver.receive(max_messages=1, timeout=0) == []
    finally:
        receiver.close()


def test_released_and_extended_deliveries_and_settling_twice_do_not_raise(
    transport: SQSTransport, sqs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    name, url = new_queue(sqs)
    receiver = transport.receiver(Subscription(queue=name))
    try:
        transport.send([envelope(name, 1)])
        [first] = receive_all(receiver, 1)
        assert first.redelivered is False
        first.release()
        [again] = receive_all(receiver, 1)
        assert again.redelivered is True
        again.extend(60)
        # Extended: invisible, so an immediate receive finds nothing.
        assert receiver.receive(max_messages=1, timeout=0) == []
        again.ack()
        again.ack()
        again.release()
        first.ack()  # settled already: nothing to do
        with caplog.at_level(logging.DEBUG, logger="outboxer.transports.sqs"):
            transport.send([envelope(name, 2)])
            [third] = receive_all(receiver, 1)
            sqs.delete_queue(QueueUrl=url)
            third.ack()  # the queue is gone: logged, not raised
        assert "gone" in caplog.text
    finally:
        receiver.close()


# Options -------------------------------------------------------------------------------


def test_from_url_reads_region_endpoint_and_options_and_keywords_win(moto_endpoint: str) -> None:
    transport = transport_from_url(
        f"sqs://?region=eu-west-1&endpoint_url={moto_endpoint}&concurrency=3"
        "&max_message_bytes=65536&read_timeout=4.5",
        concurrency=5,
    )
    try:
        assert isinstance(transport, SQSTransport)
        assert transport.region == "eu-west-1"
        assert transport.endpoint_url == moto_endpoint
        assert transport.concurrency == 5
        assert transport.max_message_bytes == 65536
        assert transport.client.meta.config.read_timeout == 4.5
        assert transport.description.system == "aws_sqs"
        assert transport.description.attributes["cloud.region"] == "eu-west-1"
        assert transport.description.attributes["server.address"] == "127.0.0.1"
    finally:
        transport.close()


def test_credentials_in_the_url_sign_requests_and_stay_secret(moto_endpoint: str, sqs: Any) -> None:
    name, _ = new_queue(sqs)
    secret = "wJalr/XUtnFEMI+K7MDENG"
    url = f"sqs://AKIDURLKEY:{secret.replace('/', '%2F')}@?endpoint_url={moto_endpoint}"
    transport = transport_from_url(url)
    assert isinstance(transport, SQSTransport)
    signed: list[bytes] = []
    transport.client.meta.events.register(
        "before-send.sqs.*", lambda request, **_: signed.append(request.headers["Authorization"])
    )
    try:
        assert [r.outcome for r in transport.send([envelope(name)])] == [Outcome.SENT]
        assert any(b"Credential=AKIDURLKEY/" in s for s in signed)
        frozen = transport.client._request_signer._credentials.get_frozen_credentials()
        assert frozen.secret_key == secret
        assert secret not in repr(transport)
        assert secret not in str(transport.description)
    finally:
        transport.close()


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("sqs://?region=eu-west-1&concurency=3", {}, "unknown sqs:// URL option 'concurency'"),
        ("sqs://?region=eu-west-1&concurrency=lots", {}, "concurrency must be a whole number"),
        ("sqs://?region=eu-west-1", {"concurrency": 0}, "concurrency must be a whole number"),
        ("sqs://?region=eu-west-1&read_timeout=-1", {}, "read_timeout must be a number"),
        ("sqs://?region=eu-west-1&max_message_bytes=9999999", {}, "max_message_bytes"),
        ("sqs://?endpoint_url=localhost:4566", {}, "endpoint_url must be an http"),
        ("sqs://eu-west-1", {}, "names no host"),
        ("sqs://KEYONLY@?region=eu-west-1", {}, "KEY:SECRET"),
        ("sqs://AKID:abc/TOPSECRET@?region=eu-west-1", {}, "percent-encode"),
    ],
)
def test_from_url_rejects_bad_options_clearly_without_leaking_secrets(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        SQSTransport.from_url(url, **options)
    assert "TOPSECRET" not in str(caught.value)


def test_a_missing_region_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ConfigurationError, match="SQS needs a region"):
        SQSTransport.from_url("sqs://")


def test_close_is_idempotent_and_a_closed_transport_sends_nothing(moto_endpoint: str) -> None:
    transport = SQSTransport(endpoint_url=moto_endpoint, region="us-east-1")
    transport.close()
    transport.close()
    with pytest.raises(TransportError, match="closed"):
        transport.send([envelope("anywhere")])
