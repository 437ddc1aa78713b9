"""RabbitMQ through pika: a destination is a durable topic exchange, routed by message type.

Threading. pika objects are not thread-safe, so each transport owns one daemon I/O thread
running a ``SelectConnection`` ioloop; every connection of the transport (the publisher's
and one per receiver) lives on that loop, and nothing else touches them. The loop keeps
running while the relay or consumer is idle, so heartbeats are answered and an idle
connection is not dropped by the broker. :meth:`RabbitMQTransport.send` prepares the
batch on the caller's thread, hands it over with ``add_callback_threadsafe`` and waits on
an event; ``Delivery.ack``/``release`` queue the settlement and wake the loop the same
way, so they may be called from any thread.

Sending and confirms. The publisher channel is in confirm mode and every message is
published with ``mandatory``. A batch is published in one go (its frames gathered into a
few large socket writes), then its confirms are collected: the broker numbers publishes
1, 2, 3... per channel, so a batch is a range of delivery tags, and a ``Basic.Ack`` or
``Basic.Nack`` with ``multiple`` settles a whole prefix of that range at once. A
``Basic.Return`` (no queue is bound for that type) arrives before the ack of the same
message and marks it REJECTED ``unroutable``; a nack is RETRY; what is still unconfirmed
after ``confirm_timeout`` is RETRY ``confirm_timeout``. Each destination's exchange is
declared (durable, topic) the first time a connection sends to it; an exchange that exists
with another type or durability closes the channel with 406, which rejects that
destination's messages as ``destination_mismatch`` while the rest of the batch goes out on
a new channel. When the broker cannot be reached or the connection drops, every message not
yet confirmed is UNAVAILABLE, and the next ``send`` connects again.

AMQP mapping of the canonical header map (:func:`outboxer.wire.encode_headers`):
``outboxer-id`` -> ``message_id``, ``outboxer-type`` -> ``type`` (also the routing key),
``outboxer-correlation-id`` -> ``correlation_id``, ``content-type`` -> ``content_type``;
``timestamp`` is the occurred-at time in whole seconds, ``delivery_mode`` 2 (persistent),
``app_id`` ``outboxer``. Every other header (``outboxer-occurred-at`` at full precision,
causation id, key, handler, attempt, trace context, the application's headers) travels as a
string in the ``headers`` table, as do a correlation id or content type longer than the
255 bytes an AMQP property holds. The body is the payload, untouched. A receiver rebuilds
exactly the canonical map from properties and table.

Receiving. A receiver has its own connection. It declares the consumer's durable queue,
an exchange named after the queue bound with ``#`` (the consumer's retries and replays are
sent there), and one binding per ``(destination, type)``; then it consumes with the
subscription's prefetch. Deliveries wait in a local buffer for :meth:`Receiver.receive`.
A lost connection is re-established by the next ``receive``, which raises
:class:`~outboxer.errors.TransportError` (after waiting its timeout) when that fails;
settling a delivery from a lost connection does nothing (the broker redelivers it anyway).
"""

from __future__ import annotations

from .amqp import canonical_headers as canonical_headers
from .options import DEFAULT_MAX_MESSAGE_BYTES
from .transport import RabbitMQTransport

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "RabbitMQTransport"]
