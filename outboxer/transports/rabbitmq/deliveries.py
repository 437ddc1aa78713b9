"""A delivery from a receiver's buffer, and acknowledging deliveries on the I/O thread.

:class:`_RabbitDelivery` may be settled from any thread: it queues the settlement on its
:class:`~outboxer.transports.rabbitmq.receiver._RabbitReceiver`, whose I/O thread
acknowledges with :func:`_ack_tags` (see the package docstring).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pika.channel import Channel
from pika.spec import BasicProperties

from ... import wire
from ..base import Delivery
from .amqp import canonical_headers, source_headers

if TYPE_CHECKING:
    from .receiver import _RabbitReceiver

# A delivery waiting in a receiver's buffer: (connection generation, delivery tag,
# destination, redelivered, properties, body, whether it came from an adapter's queue).
# The destination is the exchange it was published to, or the adapter's queue.
_Incoming = tuple[int, int, str, bool, BasicProperties, bytes, bool]


class _RabbitDelivery(Delivery):
    def __init__(self, receiver: _RabbitReceiver, incoming: _Incoming) -> None:
        generation, tag, destination, redelivered, properties, body, from_source = incoming
        self._receiver = receiver
        self._generation = generation
        self._tag = tag
        self._settled = False
        self.body = body
        read = source_headers if from_source else canonical_headers
        self.headers: Mapping[str, str] = read(properties)
        self.destination = destination
        self.redelivered = redelivered

    def __repr__(self) -> str:
        return (
            f"<RabbitMQ delivery {self.headers.get(wire.MESSAGE_ID, '?')} from "
            f"{self.destination!r} tag={self._tag}>"
        )

    def ack(self) -> None:
        if not self._settled:
            self._settled = True
            self._receiver._settle(self._generation, self._tag, requeue=False)

    def release(self) -> None:
        if not self._settled:
            self._settled = True
            self._receiver._settle(self._generation, self._tag, requeue=True)


def _ack_tags(channel: Channel, unacked: set[int], tags: list[int]) -> None:
    """Acknowledge ``tags`` (all in ``unacked``): one multiple-ack for the longest run of
    them that leaves no other unacknowledged tag below it, then one ack each."""
    chosen = set(tags)
    others = unacked - chosen
    below = min(others) if others else None
    covered = [tag for tag in tags if below is None or tag < below]
    if len(covered) > 1:
        channel.basic_ack(max(covered), multiple=True)
        unacked.difference_update(covered)
        chosen.difference_update(covered)
    for tag in sorted(chosen):
        unacked.discard(tag)
        channel.basic_ack(tag)
