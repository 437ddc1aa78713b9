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
from .frames import encode_properties
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
        self.returnable: dict[tuple[str, str, str], list[int]] | None = None
        """Tag offsets of the published messages by exchange, routing key and message id,
        in publish order (built when the batch's first return arrives)."""
        self.timer: object | None = None

    def fill(self, result: SendResult) -> None:
        """Give ``result`` to every message that has no outcome yet."""
        results = self.results
        for i, current in enumerate(results):
            if current is None:
                results[i] = result

    def unsettled(self, exchange: str, routing_key: str, message_id: str) -> list[int]:
        """Indexes in ``results`` of the messages published with this exchange, routing key
        and message id and neither confirmed nor returned yet, in publish order."""
        returnable = self.returnable
        if returnable is None:  # the batch's first return: index the published messages
            items = {item[0]: item for item in self.outgoing}
            returnable = self.returnable = {}
            for offset, index in enumerate(self.tag_index):
                item = items[index]
                returnable.setdefault((item[1], item[2], item[5]), []).append(offset)
        offsets = returnable.get((exchange, routing_key, message_id))
        if not offsets:
            return []
        confirmed, tag_index, results = self.confirmed, self.tag_index, self.results
        while offsets and (confirmed[offsets[0]] or results[tag_index[offsets[0]]] is not None):
            del offsets[0]  # settled: no later return is for it
        return [tag_index[o] for o in offsets if not confirmed[o] and results[tag_index[o]] is None]

    def carries(self, index: int, body: bytes, properties: bytes | None) -> bool:
        """Whether message ``index`` was published with this body and these properties."""
        for item in self.outgoing:
            if item[0] == index:
                return item[3] == body and item[4] == properties
        return False

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
        # A return names no delivery tag. It is for the first message, in publish order,
        # with its exchange, routing key and message id that is neither confirmed nor
        # returned yet: RabbitMQ sends a message's return before its ack, and returns in
        # publish order, so the returned message is unsettled; and an earlier message with
        # the same exchange and routing key met the same bindings, so it was returned too
        # (and is settled as such already), unless the bindings changed between the two.
        # Only then can two candidates differ in fate, and their body and properties tell
        # them apart; when those are equal too, the two are the same message: whichever
        # row counts as sent, that message reached a queue, and the other row is sent
        # again. (Matching by message id alone lost a row that shared its id.)
        key = (method.exchange or "", method.routing_key or "", properties.message_id or "")
        candidates = [(b, i) for b in self._in_flight for i in b.unsettled(*key)]
        if not candidates:
            return
        batch, index = candidates[0]
        if len(candidates) > 1:
            encoded = _encoded_properties(properties)
            for candidate, candidate_index in candidates:
                if candidate.carries(candidate_index, body, encoded):
                    batch, index = candidate, candidate_index
                    break
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


def _encoded_properties(properties: BasicProperties) -> bytes | None:
    """A returned message's properties encoded as outboxer published them (to compare with
    the published bytes), or None when they cannot be."""
    table = properties.headers or {}
    headers = {name: value for name, value in table.items() if isinstance(value, str)}
    if len(headers) != len(table):
        return None  # outboxer's tables hold text only
    try:
        return encode_properties(
            content_type=properties.content_type,
            headers=headers,
            correlation_id=properties.correlation_id,
            message_id=properties.message_id or "",
            timestamp=properties.timestamp or 0,
            type_=properties.type or "",
            app_id=properties.app_id or "",
        )
    except Exception:  # not what outboxer publishes: no match by content
        return None


def _closed_result() -> SendResult:
    return SendResult.unavailable("TransportClosed", "the RabbitMQ transport is closed")
