"""An in-process broker: for the demo, and for testing applications without a broker.

It behaves like a small RabbitMQ: a destination is an exchange, a consumer's queue is
bound to (destination, type) pairs, a message goes to every bound queue. It keeps a log
of everything it accepted (``broker.published``) so tests can assert what was sent, and
it can be told to fail (``broker.available = False``, ``broker.fail_next(...)``) to test
retries and outages.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar
from uuid import uuid4

from .. import wire
from ..instrumentation import TransportDescription
from ..message import Envelope
from .base import Delivery, Outcome, Receiver, SendResult, Subscription, Transport, held_back

__all__ = ["MemoryBroker", "MemoryTransport"]


@dataclass(frozen=True)
class _Item:
    body: bytes
    headers: Mapping[str, str]
    destination: str
    broker_id: str = field(default_factory=lambda: str(uuid4()))
    """The broker's own message id (what SQS calls MessageId), kept across redeliveries."""


class _Queue:
    def __init__(self, name: str) -> None:
        self.name = name
        self.bindings: set[tuple[str, str]] = set()
        self.ready: deque[_Item] = deque()
        self.redelivered: set[int] = set()


class MemoryBroker:
    """Exchanges, queues and a log of accepted messages, shared by transports and receivers."""

    _named: ClassVar[dict[str, MemoryBroker]] = {}
    _named_lock = threading.Lock()

    def __init__(self, *, mandatory: bool = False, max_message_bytes: int | None = None) -> None:
        self.mandatory = mandatory
        """When True, a message no queue is bound for is rejected as unroutable."""
        self.max_message_bytes = max_message_bytes
        self.available = True
        """Set False to simulate an outage: sends return UNAVAILABLE."""
        self.published: list[Envelope] = []
        """Every message the broker accepted, in order."""
        self._queues: dict[str, _Queue] = {}
        self._failures: deque[SendResult] = deque()
        self._cond = threading.Condition()

    @classmethod
    def named(cls, name: str, **options: object) -> MemoryBroker:
        """The process-wide broker called ``name`` (created on first use)."""
        with cls._named_lock:
            broker = cls._named.get(name)
            if broker is None:
                broker = cls._named[name] = cls(**options)  # type: ignore[arg-type]
            return broker

    def fail_next(self, count: int, result: SendResult) -> None:
        """Answer the next ``count`` messages sent with ``result`` instead of accepting them."""
        with self._cond:
            self._failures.extend([result] * count)

    def messages(self, destination: str | None = None, type: str | None = None) -> list[Envelope]:
        """Accepted messages, optionally only those of one destination and/or type."""
        with self._cond:
            return [
                e
                for e in self.published
                if (destination is None or e.destination == destination)
                and (type is None or e.type == type)
            ]

    def inject(
        self, queue: str, body: bytes, headers: Mapping[str, str], destination: str = ""
    ) -> None:
        """Put a raw message straight onto ``queue`` (to test duplicates or malformed input)."""
        with self._cond:
            q = self._queues.setdefault(queue, _Queue(queue))
            q.ready.append(_Item(body, dict(headers), destination or queue))
            self._cond.notify_all()

    def queue_depth(self, queue: str) -> int:
        with self._cond:
            q = self._queues.get(queue)
            return len(q.ready) if q else 0

    def declare(self, subscription: Subscription) -> None:
        with self._cond:
            q = self._queues.setdefault(subscription.queue, _Queue(subscription.queue))
            q.bindings.add((subscription.queue, "#"))
            q.bindings.update(subscription.bindings)
            for source in subscription.sources:
                # An adapter's queue takes raw messages (inject); an exchange and routing
                # key bind it like any queue.
                q = self._queues.setdefault(source.queue, _Queue(source.queue))
                if source.exchange is not None:
                    q.bindings.add((source.exchange, source.routing_key))

    def publish(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        """Accept or refuse each message, in order; once a message of a key is refused, the
        later ones of that key in the call are held back (as SQS lanes do)."""
        results: list[SendResult] = []
        failed: dict[str, SendResult] = {}
        with self._cond:
            for envelope in envelopes:
                key = envelope.key
                cause = failed.get(key) if key is not None else None
                result = held_back(key, cause) if cause else self._publish_one(envelope)
                if key is not None and result.outcome is not Outcome.SENT:
                    failed.setdefault(key, result)
                results.append(result)
            self._cond.notify_all()
        return results

    def _publish_one(self, envelope: Envelope) -> SendResult:
        if self._failures:
            return self._failures.popleft()
        if not self.available:
            return SendResult.unavailable("ConnectionRefused", "memory broker is unavailable")
        if self.max_message_bytes is not None and len(envelope.payload) > self.max_message_bytes:
            return SendResult.rejected(
                "message_too_large",
                f"payload is {len(envelope.payload)} bytes; the limit is {self.max_message_bytes}",
            )
        item = _Item(envelope.payload, wire.encode_headers(envelope), envelope.destination)
        routed = [
            q
            for q in self._queues.values()
            if (envelope.destination, "#") in q.bindings
            or (envelope.destination, envelope.type) in q.bindings
        ]
        if not routed and self.mandatory:
            return SendResult.rejected(
                "unroutable", f"no queue is bound to {envelope.destination!r} for {envelope.type!r}"
            )
        for q in routed:
            q.ready.append(item)
        self.published.append(envelope)
        return SendResult.sent(str(envelope.message_id))

    def _take(
        self, queues: Sequence[str], max_messages: int, timeout: float, sources: frozenset[str]
    ) -> list[_MemoryDelivery]:
        """Up to ``max_messages`` from ``queues``, the first ones first; deliveries from
        ``sources`` (adapters' queues) carry the broker's message id."""
        with self._cond:
            held = [self._queues[name] for name in queues]
            if not any(q.ready for q in held):
                self._cond.wait_for(lambda: any(q.ready for q in held), timeout=timeout)
            taken: list[_MemoryDelivery] = []
            for q in held:
                while q.ready and len(taken) < max_messages:
                    item = q.ready.popleft()
                    delivery = _MemoryDelivery(self, q, item, id(item) in q.redelivered)
                    if q.name in sources:
                        delivery.destination = q.name
                        delivery.headers = {
                            **{
                                k: v for k, v in item.headers.items() if k != wire.BROKER_MESSAGE_ID
                            },
                            wire.BROKER_MESSAGE_ID: item.broker_id,
                        }
                    taken.append(delivery)
            return taken

    def _requeue(self, q: _Queue, item: _Item) -> None:
        with self._cond:
            q.redelivered.add(id(item))
            q.ready.appendleft(item)
            self._cond.notify_all()


class _MemoryDelivery(Delivery):
    def __init__(self, broker: MemoryBroker, queue: _Queue, item: _Item, redelivered: bool) -> None:
        self._broker = broker
        self._queue = queue
        self._item = item
        self._settled = False
        self.body = item.body
        self.headers: Mapping[str, str] = item.headers
        self.destination = item.destination
        self.redelivered = redelivered

    def ack(self) -> None:
        self._settled = True

    def release(self) -> None:
        if not self._settled:
            self._settled = True
            self._broker._requeue(self._queue, self._item)


class _MemoryReceiver(Receiver):
    def __init__(self, broker: MemoryBroker, subscription: Subscription) -> None:
        self._broker = broker
        self._sources = frozenset(source.queue for source in subscription.sources)
        self._queues = [subscription.queue, *sorted(self._sources)]
        broker.declare(subscription)

    def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        return list(self._broker._take(self._queues, max_messages, timeout, self._sources))

    def close(self) -> None:
        pass


class MemoryTransport(Transport):
    """A transport to a :class:`MemoryBroker` (by default the process-wide ``default`` one)."""

    def __init__(self, broker: MemoryBroker | None = None) -> None:
        self.broker = broker if broker is not None else MemoryBroker.named("default")
        self.description = TransportDescription("memory")
        self.max_message_bytes = self.broker.max_message_bytes

    def send(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        return self.broker.publish(envelopes)

    def receiver(self, subscription: Subscription) -> Receiver:
        return _MemoryReceiver(self.broker, subscription)
