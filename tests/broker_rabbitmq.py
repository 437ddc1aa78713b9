"""The rabbitmq BrokerCase and fixtures: a real RabbitMQ (``OUTBOXER_TEST_RABBITMQ``)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import pika
import pytest

from outboxer.transports import Receiver, Subscription, Transport
from outboxer.transports.rabbitmq import RabbitMQTransport

from .broker_cases import BrokerCase
from .services import RABBITMQ_URL, port_open, require


def rabbitmq_address(url: str = RABBITMQ_URL) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def free_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RabbitMQAdmin:
    """A plain blocking connection for test set-up, inspection and clean-up."""

    def __init__(self, url: str = RABBITMQ_URL) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()

    def declare_exchange(self, name: str, exchange_type: str = "topic") -> None:
        self.channel.exchange_declare(name, exchange_type, durable=True)

    def declare_queue(
        self, name: str, bind_to: str, routing_key: str = "#", **arguments: object
    ) -> None:
        self.channel.queue_declare(name, durable=True, arguments=arguments or None)
        self.channel.queue_bind(name, bind_to, routing_key)

    def delete(self, exchanges: Sequence[str] = (), queues: Sequence[str] = ()) -> None:
        for queue in queues:
            self.channel.queue_delete(queue)
        for exchange in exchanges:
            self.channel.exchange_delete(exchange)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


class RabbitMQCase(BrokerCase):
    """Destinations are exchanges; every exchange and queue made here is deleted on close."""

    name = "rabbitmq"

    def __init__(self, url: str = RABBITMQ_URL) -> None:
        self.url = url
        self.transport: RabbitMQTransport = RabbitMQTransport.from_url(url)
        self.exchanges: list[str] = []
        self.queues: list[str] = []
        self._closed = False

    def new_destination(self) -> str:
        name = self.unique("dest")
        self.exchanges.append(name)
        return name

    def subscribe(self, destination: str, types: Sequence[str] = ("#",)) -> Receiver:
        queue = self.unique("consumer")
        self.queues.append(queue)
        self.exchanges.append(queue)  # the consumer's own retry exchange
        return self.transport.receiver(
            Subscription(queue=queue, bindings=[(destination, t) for t in types], prefetch=100)
        )

    def unroutable_destination(self) -> str:
        return self.new_destination()  # declared on send, nothing bound to it

    def unreachable_transport(self) -> Transport:
        return RabbitMQTransport.from_url(
            f"amqp://guest:guest@127.0.0.1:{free_port()}/", connect_timeout=3
        )

    def admin(self) -> RabbitMQAdmin:
        return RabbitMQAdmin(self.url)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.transport.close()
        admin = self.admin()
        try:
            admin.delete(self.exchanges, self.queues)
        finally:
            admin.close()


@pytest.fixture
def rabbitmq_case() -> Iterator[RabbitMQCase]:
    require("RabbitMQ", port_open(*rabbitmq_address()), "start it with: rabbitmq-server -detached")
    case = RabbitMQCase()
    try:
        yield case
    finally:
        case.close()
