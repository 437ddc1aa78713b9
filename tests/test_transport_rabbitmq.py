"""What only RabbitMQ does: exchanges and types, AMQP properties, reconnects, heartbeats, URLs."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

from outboxer import wire
from outboxer.errors import ConfigurationError, TransportError
from outboxer.ids import uuid7
from outboxer.message import Envelope
from outboxer.transports import Delivery, Outcome, Receiver, Subscription, transport_from_url
from outboxer.transports.rabbitmq import RabbitMQTransport

from .broker_rabbitmq import RabbitMQCase, free_port
from .services import RABBITMQ_URL, require


def envelope(destination: str, n: int = 0, type: str = "rmq.thing_happened") -> Envelope:
    return Envelope(
        message_id=uuid7(),
        type=type,
        destination=destination,
        payload=b'{"n": %d}' % n,
        occurred_at=datetime.now(timezone.utc),
    )


def receive_all(
    receiver: Receiver, count: int, deadline: float = 10.0, quiet: float = 0.0
) -> list[Delivery]:
    """Deliveries until ``count`` arrived or ``deadline`` passed; then ``quiet`` s for extras."""
    got: list[Delivery] = []
    until = time.monotonic() + deadline
    while len(got) < count and time.monotonic() < until:
        got.extend(receiver.receive(max_messages=count - len(got), timeout=0.5))
    if quiet:
        got.extend(receiver.receive(max_messages=100, timeout=quiet))
    return got


def ids(deliveries: list[Delivery]) -> list[str]:
    return [d.headers[wire.MESSAGE_ID] for d in deliveries]


def rabbitmqctl(*args: str) -> str:
    require("rabbitmqctl", shutil.which("rabbitmqctl") is not None, "needed to close connections")
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout


def force_close(connection_name: str) -> int:
    """Close (broker side) every connection whose name is ``connection_name``."""
    listed = rabbitmqctl("list_connections", "pid", "client_properties", "-q", "--no-table-headers")
    closed = 0
    for line in listed.splitlines():
        pid, _, properties = line.partition("\t")
        if f'"{connection_name}"' in properties:
            rabbitmqctl("close_connection", pid, "outboxer test: forced close")
            closed += 1
    return closed


def test_an_exchange_of_another_type_rejects_only_its_messages(
    rabbitmq_case: RabbitMQCase,
) -> None:
    good = rabbitmq_case.new_destination()
    wrong = rabbitmq_case.new_destination()
    admin = rabbitmq_case.admin()
    try:
        admin.declare_exchange(wrong, "direct")
    finally:
        admin.close()
    receiver = rabbitmq_case.subscribe(good)
    try:
        batch = [envelope(good, 1), envelope(wrong, 2), envelope(good, 3), envelope(wrong, 4)]
        results = rabbitmq_case.transport.send(batch)
        assert [r.outcome for r in results] == [
            Outcome.SENT,
            Outcome.REJECTED,
            Outcome.SENT,
            Outcome.REJECTED,
        ]
        assert results[1].error_type == "destination_mismatch"
        assert wrong in (results[1].error or "")
        assert "topic" in (results[1].error or "")
        assert ids(receive_all(receiver, 2)) == [str(batch[0].message_id), str(batch[2].message_id)]
        # The channel the 406 closed was replaced: the next batch goes out normally.
        assert [r.outcome for r in rabbitmq_case.transport.send([envelope(good, 5)])] == [
            Outcome.SENT
        ]
    finally:
        receiver.close()


def test_messages_are_persistent_and_carry_the_envelope_in_amqp_properties(
    rabbitmq_case: RabbitMQCase,
) -> None:
    destination = rabbitmq_case.new_destination()
    queue = rabbitmq_case.unique("inspect")
    rabbitmq_case.queues.append(queue)
    admin = rabbitmq_case.admin()
    try:
        admin.declare_exchange(destination)
        admin.declare_queue(queue, destination)
        sent = Envelope(
            message_id=uuid7(),
            type="rmq.order_placed",
            destination=destination,
            payload=b'{"order": 7}',
            occurred_at=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone.utc),
            key="order-7",
            correlation_id="conversation-1",
            headers={"tenant": "acme"},
        )
        assert rabbitmq_case.transport.send([sent])[0].outcome is Outcome.SENT
        method, properties, body = admin.channel.basic_get(queue, auto_ack=True)
    finally:
        admin.close()
    assert method is not None
    assert method.exchange == destination
    assert method.routing_key == "rmq.order_placed"
    assert body == b'{"order": 7}'
    assert properties.delivery_mode == 2
    assert properties.message_id == str(sent.message_id)
    assert properties.type == "rmq.order_placed"
    assert properties.correlation_id == "conversation-1"
    assert properties.content_type == "application/json"
    assert properties.app_id == "outboxer"
    assert properties.timestamp == int(sent.occurred_at.timestamp())
    assert properties.headers == {
        wire.OCCURRED_AT: "2024-05-01T12:30:15.123456+00:00",
        wire.KEY: "order-7",
        "tenant": "acme",
    }


def test_a_queue_bound_to_one_type_does_not_get_the_other(rabbitmq_case: RabbitMQCase) -> None:
    destination = rabbitmq_case.new_destination()
    receiver = rabbitmq_case.subscribe(destination, types=["rmq.wanted"])
    try:
        wanted = envelope(destination, 1, type="rmq.wanted")
        other = envelope(destination, 2, type="rmq.other")
        results = rabbitmq_case.transport.send([wanted, other])
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.REJECTED]
        assert results[1].error_type == "unroutable"
        got = receive_all(receiver, 1, quiet=0.5)
        assert ids(got) == [str(wanted.message_id)]
        assert got[0].destination == destination
    finally:
        receiver.close()


def test_a_consumer_gets_what_is_sent_to_the_destination_named_after_it(
    rabbitmq_case: RabbitMQCase,
) -> None:
    receiver = rabbitmq_case.subscribe(rabbitmq_case.new_destination())
    own = rabbitmq_case.queues[-1]
    try:
        retry = envelope(own, 1, type="rmq.any_type")
        assert rabbitmq_case.transport.send([retry])[0].outcome is Outcome.SENT
        [got] = receive_all(receiver, 1)
        assert got.destination == own
        assert wire.decode(got.body, got.headers, own) == retry
    finally:
        receiver.close()


def test_deliveries_keep_the_send_order_of_one_destination(rabbitmq_case: RabbitMQCase) -> None:
    destination = rabbitmq_case.new_destination()
    receiver = rabbitmq_case.subscribe(destination)
    try:
        first = [envelope(destination, i) for i in range(300)]
        second = [envelope(destination, i) for i in range(300, 500)]
        for batch in (first, second):
            results = rabbitmq_case.transport.send(batch)
            assert {r.outcome for r in results} == {Outcome.SENT}
        got: list[Delivery] = []
        until = time.monotonic() + 20
        while len(got) < 500 and time.monotonic() < until:
            # Acked as they come: the prefetch window holds back the rest until then.
            for d in receiver.receive(max_messages=50, timeout=0.5):
                d.ack()
                got.append(d)
        assert ids(got) == [str(e.message_id) for e in first + second]
    finally:
        receiver.close()


def test_a_nacked_message_is_retried_and_the_others_are_sent(rabbitmq_case: RabbitMQCase) -> None:
    destination = rabbitmq_case.new_destination()
    queue = rabbitmq_case.unique("full")
    rabbitmq_case.queues.append(queue)
    admin = rabbitmq_case.admin()
    try:
        admin.declare_exchange(destination)
        # A queue that holds one message and refuses the rest: the broker nacks them.
        admin.declare_queue(
            queue, destination, **{"x-max-length": 1, "x-overflow": "reject-publish"}
        )
    finally:
        admin.close()
    results = rabbitmq_case.transport.send([envelope(destination, i) for i in range(3)])
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.RETRY, Outcome.RETRY]
    assert {r.error_type for r in results[1:]} == {"nack"}


@pytest.fixture
def named_case(rabbitmq_case: RabbitMQCase) -> RabbitMQCase:
    """The case, its transport's connections named uniquely so a test can close them."""
    rabbitmq_case.transport.close()
    rabbitmq_case.transport = RabbitMQTransport.from_url(
        RABBITMQ_URL, connection_name=rabbitmq_case.unique("outboxer-test")
    )
    return rabbitmq_case


def test_the_publisher_reconnects_after_its_connection_is_force_closed(
    named_case: RabbitMQCase,
) -> None:
    transport = named_case.transport
    destination = named_case.new_destination()
    receiver = named_case.subscribe(destination)
    try:
        assert transport.send([envelope(destination, 1)])[0].outcome is Outcome.SENT
        assert force_close(f"{transport.connection_name} publisher") == 1
        after = envelope(destination, 2)
        assert transport.send([after])[0].outcome is Outcome.SENT
        assert transport._publisher is not None
        assert transport._publisher.connections_opened == 2
        assert str(after.message_id) in ids(receive_all(receiver, 2))
    finally:
        receiver.close()


def test_a_receiver_reconnects_after_its_connection_is_force_closed(
    named_case: RabbitMQCase,
) -> None:
    transport = named_case.transport
    destination = named_case.new_destination()
    receiver = named_case.subscribe(destination)
    queue = named_case.queues[-1]
    try:
        batch = [envelope(destination, 1), envelope(destination, 2)]
        assert {r.outcome for r in transport.send(batch)} == {Outcome.SENT}
        old = receive_all(receiver, 2)
        assert len(old) == 2
        assert force_close(f"{transport.connection_name} consumer {queue}") == 1

        again = receive_all(receiver, 2)
        assert sorted(ids(again)) == sorted(ids(old))
        assert all(d.redelivered for d in again)
        # Tags restart on the new channel: settling old deliveries must not touch these.
        for d in old:
            d.ack()
        for d in again:
            d.release()
        back = receive_all(receiver, 2)
        assert sorted(ids(back)) == sorted(ids(old))
        for d in back:
            d.ack()
        assert receive_all(receiver, 1, deadline=1.0) == []
    finally:
        receiver.close()


def test_a_receiver_that_cannot_reconnect_raises_and_recovers_later(
    named_case: RabbitMQCase,
) -> None:
    transport = named_case.transport
    destination = named_case.new_destination()
    receiver = named_case.subscribe(destination)
    queue = named_case.queues[-1]
    try:
        real_port = receiver._params.port  # type: ignore[attr-defined]
        receiver._params.port = free_port()  # type: ignore[attr-defined]
        assert force_close(f"{transport.connection_name} consumer {queue}") == 1
        started = time.monotonic()
        with pytest.raises(TransportError, match="Connection refused"):
            receive_all(receiver, 1, deadline=5.0)
        assert time.monotonic() - started >= 0.4  # it waited out the timeout, no spin

        receiver._params.port = real_port  # type: ignore[attr-defined]
        sent = envelope(destination, 1)
        assert transport.send([sent])[0].outcome is Outcome.SENT
        assert ids(receive_all(receiver, 1)) == [str(sent.message_id)]
    finally:
        receiver.close()


def test_an_idle_transport_keeps_its_connection_with_heartbeats(
    rabbitmq_case: RabbitMQCase,
) -> None:
    destination = rabbitmq_case.new_destination()
    receiver = rabbitmq_case.subscribe(destination)
    transport = RabbitMQTransport.from_url(RABBITMQ_URL + "?heartbeat=2")
    try:
        assert transport.parameters.heartbeat == 2
        assert transport.send([envelope(destination, 1)])[0].outcome is Outcome.SENT
        # Idle for three heartbeat intervals: a connection nobody services is dropped by then.
        time.sleep(6)
        assert transport.send([envelope(destination, 2)])[0].outcome is Outcome.SENT
        assert transport._publisher is not None
        assert transport._publisher.connections_opened == 1
        assert len(receive_all(receiver, 2)) == 2
    finally:
        transport.close()
        receiver.close()


def test_ack_and_release_work_from_other_threads(rabbitmq_case: RabbitMQCase) -> None:
    destination = rabbitmq_case.new_destination()
    receiver = rabbitmq_case.subscribe(destination)
    try:
        keep, give_back = envelope(destination, 1), envelope(destination, 2)
        rabbitmq_case.transport.send([keep, give_back])
        by_id = {d.headers[wire.MESSAGE_ID]: d for d in receive_all(receiver, 2)}
        acked, released = by_id[str(keep.message_id)], by_id[str(give_back.message_id)]
        assert not released.redelivered

        def settle() -> None:
            acked.ack()
            acked.ack()  # twice is harmless
            released.release()
            released.ack()  # already settled: ignored

        workers = [threading.Thread(target=settle) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        [again] = receive_all(receiver, 1, quiet=0.5)
        assert again.headers[wire.MESSAGE_ID] == str(give_back.message_id)
        assert again.redelivered
        threading.Thread(target=again.ack).start()
        assert receive_all(receiver, 1, deadline=1.0) == []
    finally:
        receiver.close()
    again.ack()  # after close: a no-op, no error


def test_subscribing_to_an_exchange_of_another_type_fails_clearly(
    rabbitmq_case: RabbitMQCase,
) -> None:
    wrong = rabbitmq_case.new_destination()
    admin = rabbitmq_case.admin()
    try:
        admin.declare_exchange(wrong, "fanout")
    finally:
        admin.close()
    with pytest.raises(TransportError) as caught:
        rabbitmq_case.subscribe(wrong)
    assert "406" in str(caught.value)
    assert wrong in str(caught.value)


def test_a_closed_transport_stops_its_thread_and_sends_nothing(
    rabbitmq_case: RabbitMQCase,
) -> None:
    destination = rabbitmq_case.new_destination()
    receiver = rabbitmq_case.subscribe(destination)
    transport = RabbitMQTransport.from_url(RABBITMQ_URL)
    try:
        assert transport.send([envelope(destination)])[0].outcome is Outcome.SENT
        io = transport._io
        assert io is not None
        transport.close()
        transport.close()
        assert not io._thread.is_alive()
        [result] = transport.send([envelope(destination)])
        assert result.outcome is Outcome.UNAVAILABLE
        assert result.error_type == "TransportClosed"
    finally:
        transport.close()
        receiver.close()


def test_from_url_takes_outboxer_options_and_gives_the_rest_to_pika() -> None:
    transport = RabbitMQTransport.from_url(
        "amqp://app:pw@rabbit.example:5673/orders?heartbeat=30&confirm_timeout=2.5"
        "&max_message_bytes=2048&connect_timeout=3&connection_name=relay-1"
    )
    assert transport.confirm_timeout == 2.5
    assert transport.max_message_bytes == 2048
    assert transport.connect_timeout == 3.0
    assert transport.connection_name == "relay-1"
    params = transport.parameters
    assert (params.host, params.port, params.virtual_host) == ("rabbit.example", 5673, "orders")
    assert params.heartbeat == 30
    assert params.socket_timeout == 3.0
    assert transport.description.system == "rabbitmq"
    assert transport.description.attributes == {
        "server.address": "rabbit.example",
        "server.port": 5673,
    }
    via_factory = transport_from_url("amqp://guest:guest@localhost/", confirm_timeout=4)
    assert isinstance(via_factory, RabbitMQTransport)
    assert via_factory.confirm_timeout == 4.0


def test_options_given_as_keywords_override_the_url() -> None:
    transport = RabbitMQTransport.from_url(
        "amqp://localhost/?confirm_timeout=2.5&max_message_bytes=2048",
        confirm_timeout=9,
        max_message_bytes=4096,
    )
    assert (transport.confirm_timeout, transport.max_message_bytes) == (9.0, 4096)


@pytest.mark.parametrize(
    ("url", "options", "expected"),
    [
        ("amqp://localhost/?confirm_timeout=soon", {}, "confirm_timeout must be a number"),
        ("amqp://localhost/?confirm_timeout=0", {}, "confirm_timeout must be a number of seconds"),
        ("amqp://localhost/?max_message_bytes=1.5", {}, "max_message_bytes must be a whole"),
        ("amqp://localhost/?max_message_bytes=10", {}, "at least 1024"),
        ("amqp://localhost/?heartbeat=often", {}, "heartbeat"),
        ("amqp://localhost/?colour=red", {}, "colour"),
        ("amqp://localhost:port/", {}, "invalid RabbitMQ URL"),
        ("http://localhost/", {}, "not an amqp"),
        ("amqp://localhost/", {"colour": "red"}, "unknown RabbitMQ option colour"),
    ],
)
def test_bad_urls_and_options_are_refused_clearly(
    url: str, options: dict[str, object], expected: str
) -> None:
    with pytest.raises(ConfigurationError, match=expected):
        RabbitMQTransport.from_url(url, **options)


def test_the_password_never_shows_in_repr_or_errors() -> None:
    secret = "Sup3r-S3cret-pw"
    with pytest.raises(ConfigurationError) as bad_option:
        RabbitMQTransport.from_url(f"amqp://alice:{secret}@localhost/?heartbeat=often")
    with pytest.raises(ConfigurationError) as bad_port:
        RabbitMQTransport.from_url(f"amqp://alice:{secret}@localhost:port/")
    assert secret not in str(bad_option.value)
    assert secret not in str(bad_port.value)
    transport = RabbitMQTransport.from_url(
        f"amqp://alice:{secret}@127.0.0.1:{free_port()}/", connect_timeout=2
    )
    try:
        assert secret not in repr(transport)
        assert "alice" in repr(transport)
        [result] = transport.send([envelope("anywhere")])
        assert result.outcome is Outcome.UNAVAILABLE
        assert secret not in (result.error or "")
    finally:
        transport.close()


def test_wrong_credentials_make_messages_unavailable_without_showing_them(
    rabbitmq_case: RabbitMQCase,
) -> None:
    secret = "Wr0ng-pw-" + uuid.uuid4().hex[:6]
    url = rabbitmq_case.url.replace("guest:guest@", f"guest:{secret}@")
    transport = RabbitMQTransport.from_url(url)
    try:
        [result] = transport.send([envelope(rabbitmq_case.new_destination())])
        assert result.outcome is Outcome.UNAVAILABLE
        assert result.error
        assert secret not in result.error
    finally:
        transport.close()
    transport = RabbitMQTransport.from_url(url)
    try:
        with pytest.raises(TransportError) as caught:
            transport.receiver(Subscription(queue=rabbitmq_case.unique("q")))
        assert secret not in str(caught.value)
    finally:
        transport.close()
