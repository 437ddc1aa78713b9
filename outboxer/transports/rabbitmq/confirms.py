"""Confirm bookkeeping: a batch as the I/O thread tracks it, and how the broker's confirms
and returns, and failures, settle its messages.

A published batch is a range of delivery tags on the publisher's channel (see the package
docstring). :class:`_Confirms` is the part of the publisher that settles batches: it gives
each message its outcome and hands the results to the waiting ``send``;
:class:`~outboxer.transports.rabbitmq.publisher._Publisher` adds the connection and
channel they go out on. Runs only on the I/O thread; :class:`_Batch` is what a ``send``
call hands it and waits on.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

from pika.channel import Channel
from pika.frame import Method
from pika.spec import Basic, BasicProperties

from ..base import SendResult
from .amqp import _Outgoing
from .ioloop import _IOThread, _logged

_SENT = SendResult.sent()
_NACKED = SendResult.retry(
    "nack", "RabbitMQ refused the message (basic.nack); it was not stored, try again later"
)


class _Batch:
    """One ``send`` call as the I/O thread works on it."""

    def __init__(
        self, results: list[SendResult | None], outgoing: list[_Outgoing], destinations: list[str]
    ) -> None:
        self.results = results
        self.outgoing = outgoing
        self.destinations = destinations
        self.refused: dict[str, SendResult] = {}
        """Destinations whose exchange could not be declared, with their messages' result."""
        self.done = threading.Event()
        self.future: Future[list[SendResult]] = Future()
        """Completed with the results when every message has an outcome."""
        self.published = False
        self.first_tag = 0
        self.tag_index: list[int] = []
        """Index in ``results`` of the message published with delivery tag first_tag + i."""
        self.confirmed = bytearray()
        self.unconfirmed = 0
        self.low = 0
        """Every tag offset below this one is confirmed (multiple acks start here)."""
        self.by_message_id: dict[str | None, int] | None = None
        self.timer: object | None = None

    def fill(self, result: SendResult) -> None:
        """Give ``result`` to every message that has no outcome yet."""
        results = self.results
        for i, current in enumerate(results):
            if current is None:
                results[i] = result

    def complete(self) -> None:
        """Hand the results to the waiting caller (once)."""
        self.done.set()
        if not self.future.done():
            closed = _closed_result()
            self.future.set_result([closed if r is None else r for r in self.results])


class _Confirms:
    """The publisher's batches and their outcomes: confirms, returns and failures settle
    them. Runs only on the I/O thread; :class:`_Publisher` provides the state below."""

    _io: _IOThread
    _channel: Channel | None
    _batch: _Batch | None
    _in_flight: deque[_Batch]
    _waiting: deque[_Batch]

    def _next_batch(self) -> None:
        raise NotImplementedError  # the publisher starts the next waiting batch

    def _finish(self, batch: _Batch) -> None:
        if batch.timer is not None:
            self._io.ioloop.remove_timeout(batch.timer)  # type: ignore[arg-type]
            batch.timer = None
        if self._batch is batch:
            self._batch = None
        if batch in self._in_flight:
            self._in_flight.remove(batch)
        batch.complete()
        self._next_batch()

    def _finish_now(self, batch: _Batch, result: SendResult) -> None:
        batch.fill(result)
        self._finish(batch)

    @_logged
    def _on_confirm(self, frame: Method[Basic.Ack | Basic.Nack]) -> None:
        method = frame.method
        tag = method.delivery_tag
        outcome = _SENT if isinstance(method, Basic.Ack) else _NACKED
        # Batches are published one after another on this channel: their tag ranges are
        # consecutive, oldest first. A "multiple" confirm settles every tag up to its own.
        for batch in list(self._in_flight):
            first, count = batch.first_tag, len(batch.tag_index)
            if tag < first:
                break
            if method.multiple:
                start, stop = batch.low, min(tag - first + 1, count)
                batch.low = max(batch.low, stop)
            elif tag < first + count:
                start, stop = tag - first, tag - first + 1
            else:
                continue
            confirmed = batch.confirmed
            tag_index = batch.tag_index
            results = batch.results
            settled = 0
            for o in range(start, stop):
                if not confirmed[o]:
                    confirmed[o] = 1
                    settled += 1
                    i = tag_index[o]
                    if results[i] is None:  # a returned message keeps its rejection
                        results[i] = outcome
            batch.unconfirmed -= settled
            if batch.unconfirmed == 0:
                self._finish(batch)
            if not method.multiple:
                break

    @_logged
    def _on_return(
        self, channel: Channel, method: Basic.Return, properties: BasicProperties, body: bytes
    ) -> None:
        if channel is not self._channel:
            return
        for batch in self._in_flight:
            if batch.by_message_id is None:
                batch.by_message_id = {item[5]: item[0] for item in batch.outgoing}
            index = batch.by_message_id.get(properties.message_id)
            if index is not None:
                break
        else:
            return
        batch.results[index] = SendResult.rejected(
            "unroutable",
            f"no queue is bound to exchange {method.exchange!r} for routing key "
            f"{method.routing_key!r} (RabbitMQ: {method.reply_code} {method.reply_text}); "
            "start the consumer that subscribes to this type first, or check the destination "
            "and the message type",
        )

    def _fail_all(self, result: SendResult) -> None:
        waiting = list(self._waiting)
        self._waiting.clear()
        for batch in (*self._in_flight, self._batch, *waiting):
            if batch is not None:
                self._finish_now(batch, result)


def _closed_result() -> SendResult:
    return SendResult.unavailable("TransportClosed", "the RabbitMQ transport is closed")
