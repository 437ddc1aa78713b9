"""One contract test suite, several brokers: each broker supplies a BrokerCase.

A case gives a transport, fresh destinations, receivers bound to them, a destination
where sends are unroutable, and a transport whose broker cannot be reached.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence

from outboxer.transports import Receiver, Subscription, Transport
from outboxer.transports.memory import MemoryBroker, MemoryTransport


class BrokerCase(abc.ABC):
    name: str
    transport: Transport

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    @abc.abstractmethod
    def new_destination(self) -> str:
        """A fresh destination messages can be sent to (created if the broker needs it)."""

    def subscribe(self, destination: str, types: Sequence[str] = ("#",)) -> Receiver:
        """A receiver for a fresh consumer queue that gets ``destination``'s messages."""
        queue = self.unique("consumer")
        return self.transport.receiver(
            Subscription(queue=queue, bindings=[(destination, t) for t in types], prefetch=100)
        )

    @abc.abstractmethod
    def unroutable_destination(self) -> str:
        """A destination where a send is rejected as unroutable."""

    @abc.abstractmethod
    def unreachable_transport(self) -> Transport:
        """A transport whose broker does not answer (a closed port)."""

    def close(self) -> None:
        self.transport.close()


class MemoryCase(BrokerCase):
    name = "memory"

    def __init__(self) -> None:
        self.broker = MemoryBroker(mandatory=True, max_message_bytes=256 * 1024)
        self.transport = MemoryTransport(self.broker)

    def new_destination(self) -> str:
        return self.unique("dest")

    def unroutable_destination(self) -> str:
        return self.unique("nobody-listens")

    def unreachable_transport(self) -> Transport:
        broker = MemoryBroker()
        broker.available = False
        return MemoryTransport(broker)
