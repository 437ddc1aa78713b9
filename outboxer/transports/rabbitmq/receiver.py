"""Receiving: a consumer's queue on its own connection, and the deliveries it buffers.

The receiver declares its queue, exchanges and bindings and consumes on the transport's
I/O thread; :meth:`_RabbitReceiver.receive` and the settling of a delivery are called from
any thread (see the package docstring).

This module owns the receiver's connection, state and buffer; :mod:`.topology` holds the
AMQP set-up calls it runs in sequence, and :mod:`.deliveries` the delivery it hands out
and the acknowledging of deliveries.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.connection import Parameters
from pika.spec import Basic, BasicProperties

from ...errors import TransportError
from ..base import Delivery, Receiver, Subscription
from .amqp import UNDECODABLE_TABLE, install_tolerant_properties
from .deliveries import _ack_tags, _Incoming, _RabbitDelivery
from .ioloop import _cause, _IOThread, _logged, log
from .topology import _bind, _consume, _declare_exchange, _declare_queue, _run_steps, _Step

# A delivery whose header table pika cannot decode must not drop the connection.
install_tolerant_properties()

if TYPE_CHECKING:
    from .transport import RabbitMQTransport

_IDLE, _CONNECTING, _OPEN, _FAILED, _CLOSED = "idle", "connecting", "open", "failed", "closed"


class _RabbitReceiver(Receiver):
    """A consumer's queue on its own connection (on the transport's I/O thread)."""

    def __init__(
        self,
        transport: RabbitMQTransport,
        io: _IOThread,
        subscription: Subscription,
        *,
        parameters: Parameters,
        connect_timeout: float,
        where: str,
        queue_arguments: dict[str, object] | None = None,
    ) -> None:
        self._transport = transport
        self._queue_arguments = dict(queue_arguments or {})
        self._io = io
        self._subscription = subscription
        self._params = parameters
        self._connect_timeout = connect_timeout
        self._where = where
        self._cond = threading.Condition()
        # Shared between threads, under _cond:
        self._buffer: deque[_Incoming] = deque()
        self._state = _IDLE
        self._error = ""
        self._generation = 0
        self._closed = False
        # Settlements from any thread to the I/O thread (deque appends are atomic).
        self._settles: deque[tuple[int, int, bool]] = deque()
        self._flush_pending = False
        # Only the I/O thread touches these:
        self._connection: SelectConnection | None = None
        self._channel: Channel | None = None
        self._unacked: set[int] = set()
        self._shutdown: threading.Event | None = None
        self._outage = False
        if not self._connect(time.monotonic() + connect_timeout * 2):
            self._abandon()
            raise TransportError(
                f"cannot subscribe queue {subscription.queue!r} on RabbitMQ at {where}: "
                f"{self._error}"
            )

    # Any thread -------------------------------------------------------------------------

    def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            if self._closed or max_messages < 1:
                return []
            connected = self._state == _OPEN
        if not connected:
            if not self._connect(max(deadline, time.monotonic() + self._connect_timeout)):
                if not self._outage:
                    self._outage = True
                    log.warning(
                        "consumer %r lost RabbitMQ: %s", self._subscription.queue, self._error
                    )
                with self._cond:
                    # Wait out the timeout so a caller that retries at once does not spin.
                    self._cond.wait_for(lambda: self._closed, deadline - time.monotonic())
                raise TransportError(
                    f"cannot reach RabbitMQ at {self._where} for queue "
                    f"{self._subscription.queue!r}: {self._error}"
                )
            if self._outage:
                self._outage = False
                log.info("consumer %r is connected to RabbitMQ again", self._subscription.queue)
        with self._cond:
            if not self._buffer:
                self._cond.wait_for(
                    lambda: bool(self._buffer) or self._state != _OPEN,
                    deadline - time.monotonic(),
                )
            count = min(max_messages, len(self._buffer))
            taken = [self._buffer.popleft() for _ in range(count)]
        return [_RabbitDelivery(self, incoming) for incoming in taken]

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._state = _CLOSED
            self._buffer.clear()
            self._cond.notify_all()
        self._abandon()
        self._transport._forget(self)

    def _abandon(self) -> None:
        """Close the connection (unacked messages go back to the queue) and wait a little."""
        done = threading.Event()
        self._io.call(functools.partial(self._shutdown_connection, done))
        done.wait(self._connect_timeout)

    def _connect(self, deadline: float) -> bool:
        """(Re)connect and set the queue up; False (``_error`` says why) if it failed."""
        with self._cond:
            self._generation += 1
            generation = self._generation
            self._state = _CONNECTING
            self._buffer.clear()
        self._io.call(functools.partial(self._open, generation))
        with self._cond:
            self._cond.wait_for(lambda: self._state != _CONNECTING, deadline - time.monotonic())
            if self._state == _CONNECTING:
                self._state = _FAILED
                self._error = "timed out connecting and declaring the queue"
                self._io.call(functools.partial(self._drop_if_current, generation))
            return self._state == _OPEN

    def _settle(self, generation: int, tag: int, requeue: bool) -> None:
        if self._closed:
            return
        self._settles.append((generation, tag, requeue))
        if not self._flush_pending:
            # One wake-up of the I/O thread carries every settlement queued before it runs.
            self._flush_pending = True
            self._io.call(self._flush_settles)

    def _set_state(self, generation: int, state: str, error: str = "") -> None:
        with self._cond:
            if generation != self._generation or self._state in (_CLOSED, state):
                return  # stale, closed, or already failed (the first error is the telling one)
            if state == _OPEN and self._state != _CONNECTING:
                return
            self._state = state
            if error:
                self._error = error
            if state != _OPEN:
                self._buffer.clear()
            self._cond.notify_all()

    # I/O thread ---------------------------------------------------------------------------

    def _open(self, generation: int) -> None:
        if generation != self._generation or self._closed:
            return
        self._drop()
        self._unacked.clear()
        try:
            self._connection = SelectConnection(
                self._params,
                on_open_callback=functools.partial(self._on_open, generation),
                on_open_error_callback=functools.partial(self._on_lost, generation),
                on_close_callback=functools.partial(self._on_lost, generation),
                custom_ioloop=self._io.ioloop,
            )
        except Exception as exc:
            self._connection = None
            self._set_state(generation, _FAILED, "{}: {}".format(*_cause(exc)))

    def _drop_if_current(self, generation: int) -> None:
        if generation == self._generation:
            self._drop()

    def _drop(self) -> None:
        """Close the current connection, if there is one; its callbacks are ignored from now."""
        connection = self._connection
        if connection is None:
            return
        self._connection = None
        self._channel = None
        if not (connection.is_closing or connection.is_closed):
            connection.close()

    @_logged
    def _on_open(self, generation: int, connection: SelectConnection) -> None:
        if generation != self._generation or connection is not self._connection:
            if not (connection.is_closing or connection.is_closed):
                connection.close()
            return
        channel = connection.channel(
            on_open_callback=functools.partial(self._on_channel_open, generation)
        )
        channel.add_on_close_callback(functools.partial(self._on_channel_closed, generation))

    @_logged
    def _on_channel_open(self, generation: int, channel: Channel) -> None:
        if generation != self._generation:
            return
        self._channel = channel
        sub = self._subscription
        queue = sub.queue
        arguments = dict(self._queue_arguments)
        steps: list[_Step] = []
        if "x-delivery-limit" in arguments:
            # Past the limit, the broker moves a message here instead of redelivering it.
            poison = f"{queue}.poison"
            arguments["x-dead-letter-exchange"] = poison
            steps += [
                lambda k: channel.exchange_declare(poison, "fanout", durable=True, callback=k),
                lambda k: channel.queue_declare(poison, durable=True, callback=k),
                lambda k: channel.queue_bind(poison, poison, "", callback=k),
            ]
        steps += [
            lambda k: channel.queue_declare(
                queue, durable=True, arguments=arguments or None, callback=k
            ),
            lambda k: channel.exchange_declare(queue, "topic", durable=True, callback=k),
            lambda k: channel.queue_bind(queue, queue, "#", callback=k),
        ]
        declared = {queue}
        for destination, type_ in sub.bindings:
            if destination not in declared:
                declared.add(destination)
                steps.append(
                    functools.partial(_declare_exchange, channel, destination),
                )
            steps.append(functools.partial(_bind, channel, queue, destination, type_))
        source_arguments = {k: v for k, v in arguments.items() if k == "x-queue-type"}
        for source in sub.sources:
            if source.exchange is not None:
                # The adapter's own queue, bound to another system's exchange (not declared
                # here: that system owns it, and binding to a missing one says so).
                steps += [
                    functools.partial(
                        _declare_queue, channel, source.queue, source_arguments or None
                    ),
                    functools.partial(
                        _bind, channel, source.queue, source.exchange, source.routing_key
                    ),
                ]
        steps.append(lambda k: channel.basic_qos(prefetch_count=sub.prefetch, callback=k))
        steps.append(
            lambda k: channel.basic_consume(
                queue,
                functools.partial(self._on_message, generation, None),
                callback=k,
            )
        )
        for source in sub.sources:
            steps.append(
                functools.partial(
                    _consume,
                    channel,
                    source.queue,
                    functools.partial(self._on_message, generation, source.queue),
                )
            )
        channel.add_on_cancel_callback(functools.partial(self._on_cancelled, generation))
        _run_steps(steps, functools.partial(self._set_state, generation, _OPEN))

    @_logged
    def _on_message(
        self,
        generation: int,
        source: str | None,
        channel: Channel,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        tag = method.delivery_tag or 0
        table = properties.headers
        if isinstance(table, dict) and UNDECODABLE_TABLE in table:
            # Named here, where the queue is known: pika's own logger is quiet by default.
            log.error(
                "queue %r: a delivery's %s; it is dead-lettered (see docs/dead-letters.md)",
                self._subscription.queue,
                str(table[UNDECODABLE_TABLE])[:300],
            )
            table[UNDECODABLE_TABLE] = (
                f"{table[UNDECODABLE_TABLE]} on queue {self._subscription.queue!r}"
            )
        with self._cond:
            if generation != self._generation:
                return
            # Unacknowledged even when dropped here: a multiple-ack must not cover it.
            self._unacked.add(tag)
            # Kept while connecting too: the first queue's consumer gets messages while the
            # others (adapters' queues) are still being set up.
            if self._state not in (_OPEN, _CONNECTING):
                return
            destination = source if source is not None else method.exchange or ""
            redelivered = bool(method.redelivered)
            self._buffer.append(
                (generation, tag, destination, redelivered, properties, body, source is not None)
            )
            self._cond.notify()

    @_logged
    def _on_cancelled(self, generation: int, _frame: object) -> None:
        # The queue was deleted under us: reconnecting declares it again.
        self._set_state(generation, _FAILED, "RabbitMQ cancelled the consumer (queue deleted?)")
        self._drop_if_current(generation)

    @_logged
    def _on_channel_closed(self, generation: int, channel: Channel, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self._set_state(
                generation,
                _FAILED,
                f"RabbitMQ closed the channel: {reason.reply_code} {reason.reply_text}",
            )
            self._drop_if_current(generation)

    @_logged
    def _on_lost(self, generation: int, connection: SelectConnection, error: BaseException) -> None:
        if connection is self._connection:
            self._connection = None
            self._channel = None
            self._unacked.clear()
        self._set_state(generation, _FAILED, "{}: {}".format(*_cause(error)))
        if self._shutdown is not None and self._connection is None:
            self._shutdown.set()

    def _flush_settles(self) -> None:
        self._flush_pending = False
        channel = self._channel
        usable = channel is not None and channel.is_open
        generation = self._generation
        settles = self._settles
        unacked = self._unacked
        acks: list[int] = []
        while settles:
            gen, tag, requeue = settles.popleft()
            if not usable or gen != generation or tag not in unacked:
                continue  # the broker redelivers what a lost channel had unacked
            assert channel is not None
            if requeue:
                unacked.discard(tag)
                channel.basic_nack(tag, requeue=True)
            else:
                acks.append(tag)
        if acks:
            assert channel is not None
            _ack_tags(channel, unacked, acks)

    def _shutdown_connection(self, done: threading.Event) -> None:
        self._shutdown = done
        self._settles.clear()
        connection = self._connection
        if connection is None or connection.is_closing or connection.is_closed:
            self._connection = None
            done.set()
            return
        connection.close()
