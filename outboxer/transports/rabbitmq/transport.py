"""The transport: configuration, the I/O thread, the publisher and the receivers together."""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
from pika.connection import Parameters

from ...errors import ConfigurationError, TransportError
from ...instrumentation import TransportDescription
from ...message import Envelope
from ..base import Receiver, SendResult, Subscription, Transport
from .amqp import _Outgoing, _prepare
from .confirms import _Batch, _closed_result
from .ioloop import _IOThread
from .options import DEFAULT_MAX_MESSAGE_BYTES, _parse_url, _positive_number, _queue_arguments
from .publisher import _Publisher
from .receiver import _RabbitReceiver

__all__ = ["RabbitMQTransport"]


class RabbitMQTransport(Transport):
    """Publishes to durable topic exchanges with confirms; consumes from durable queues.

    ``parameters`` are pika connection parameters (default: ``amqp://guest:guest@localhost``).
    ``confirm_timeout``: seconds to wait for the confirms of a batch. ``max_message_bytes``:
    a message whose body and headers are larger is rejected without being sent (RabbitMQ 4's
    default ``max_message_size``, 16 MiB). ``connect_timeout`` bounds connecting (TCP, TLS
    and AMQP handshake; it sets pika's ``socket_timeout`` and ``stack_timeout``) and, again,
    the exchange declarations of a batch. ``connection_name`` shows in the management UI and
    ``rabbitmqctl list_connections client_properties``, followed by ``publisher`` or
    ``consumer <queue>``. ``queue_type="quorum"`` declares consumer queues as quorum queues;
    with ``delivery_limit=N`` the broker moves a message delivered N times without being
    settled (a message that keeps dropping the consumer's connection) to the queue
    ``<queue>.poison`` (through the fanout exchange of that name) instead of redelivering it
    forever. A queue keeps the type it was created with: set these before the first consumer
    starts. See the package docstring for the threading model and the mapping.
    """

    def __init__(
        self,
        parameters: Parameters | None = None,
        *,
        confirm_timeout: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        connect_timeout: float = 5.0,
        connection_name: str | None = None,
        queue_type: str | None = None,
        delivery_limit: int | None = None,
    ) -> None:
        self.queue_arguments = _queue_arguments(queue_type, delivery_limit)
        """Arguments of the consumer queues' declaration (queue type, delivery limit)."""
        self.confirm_timeout = _positive_number("confirm_timeout", confirm_timeout)
        self.connect_timeout = _positive_number("connect_timeout", connect_timeout)
        if (
            isinstance(max_message_bytes, bool)
            or not isinstance(max_message_bytes, int)
            or max_message_bytes < 1024
        ):
            raise ConfigurationError(
                "RabbitMQ option max_message_bytes must be a whole number of at least 1024, "
                f"got {max_message_bytes!r}"
            )
        self.max_message_bytes = self._limit = max_message_bytes
        params = copy.copy(parameters) if parameters is not None else pika.ConnectionParameters()
        params.socket_timeout = self.connect_timeout
        params.stack_timeout = self.connect_timeout
        self.parameters = self._params = params
        """The pika connection parameters (a copy; the timeouts are set from connect_timeout)."""
        properties = dict(params.client_properties or {})
        self.connection_name = str(
            connection_name or properties.get("connection_name") or "outboxer"
        )
        self._where = f"{params.host}:{params.port}"
        self.description = TransportDescription(
            "rabbitmq", {"server.address": params.host, "server.port": params.port}
        )
        # Properties and table must fit in one AMQP frame; keep room for the fixed fields.
        self._max_table_bytes = max(1024, (params.frame_max or 131072) - 4096)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._io: _IOThread | None = None
        self._publisher: _Publisher | None = None
        self._receivers: set[_RabbitReceiver] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RabbitMQTransport:
        """``amqp://user:pass@host:5672/vhost?heartbeat=30&confirm_timeout=10``.

        outboxer's own query options (``confirm_timeout``, ``max_message_bytes``,
        ``connect_timeout``, ``connection_name``) are taken out; the rest are pika's URL
        parameters (``heartbeat``, ``ssl_options``, ``client_properties``...). Keyword
        ``options`` override the URL's.
        """
        parameters, kwargs = _parse_url(url, options)
        return cls(parameters, **kwargs)

    def __repr__(self) -> str:
        params = self._params
        user = getattr(params.credentials, "username", "")
        return (
            f"RabbitMQTransport(amqp://{user}@{self._where}/{quote(params.virtual_host, '')}, "
            f"confirm_timeout={self.confirm_timeout:g})"
        )

    def _parameters(self, role: str) -> Parameters:
        params = copy.copy(self._params)
        properties = dict(params.client_properties or {})
        properties["connection_name"] = f"{self.connection_name} {role}"
        params.client_properties = properties
        return params

    def _io_thread(self) -> _IOThread:
        with self._lock:
            if self._closed:
                raise TransportError("the RabbitMQ transport is closed")
            if self._io is None:
                self._io = _IOThread()
            return self._io

    # Sending ------------------------------------------------------------------------------

    def send(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        pending = self.send_async(envelopes)
        # The I/O thread bounds every step itself; this only guards against a stuck loop.
        try:
            return pending.result(self.connect_timeout * 2 + self.confirm_timeout + 5.0)
        except TimeoutError:
            stuck = SendResult.unavailable(
                "TimeoutError", "the RabbitMQ I/O thread did not answer in time"
            )
            return [stuck] * len(envelopes)

    def send_async(
        self, envelopes: Sequence[Envelope], *, after: Future[list[SendResult]] | None = None
    ) -> Future[list[SendResult]]:
        """Hand the batch to the I/O thread and return at once.

        Up to four batches are on the wire together: the next is published while the
        broker is still confirming the previous ones (RabbitMQ spends most of a batch's
        time persisting and confirming), on the same channel, so the broker receives them
        in order. A batch chained ``after`` one that lost the connection fails with it.
        """
        if not envelopes or self._closed:
            done: Future[list[SendResult]] = Future()
            done.set_result([_closed_result()] * len(envelopes))
            return done
        results: list[SendResult | None] = [None] * len(envelopes)
        outgoing: list[_Outgoing] = []
        destinations: dict[str, None] = {}
        limit, max_table_bytes = self._limit, self._max_table_bytes
        for index, envelope in enumerate(envelopes):
            item = _prepare(index, envelope, limit, max_table_bytes)
            if isinstance(item, SendResult):
                results[index] = item
            else:
                outgoing.append(item)
                destinations[envelope.destination] = None
        batch = _Batch(results, outgoing, list(destinations))
        if not outgoing:
            batch.complete()
            return batch.future
        with self._send_lock:
            try:
                io = self._io_thread()
            except TransportError:
                batch.fill(_closed_result())
                batch.complete()
                return batch.future
            with self._lock:
                if self._publisher is None:
                    self._publisher = _Publisher(
                        self._parameters("publisher"),
                        io,
                        setup_timeout=self.connect_timeout * 2,
                        confirm_timeout=self.confirm_timeout,
                        where=self._where,
                    )
                publisher = self._publisher
            io.call(functools.partial(publisher.submit, batch, after))
        return batch.future

    # Receiving ----------------------------------------------------------------------------

    def receiver(self, subscription: Subscription) -> Receiver:
        io = self._io_thread()
        receiver = _RabbitReceiver(
            self,
            io,
            subscription,
            parameters=self._parameters(f"consumer {subscription.queue}"),
            connect_timeout=self.connect_timeout,
            where=self._where,
            queue_arguments=self.queue_arguments,
        )
        with self._lock:
            self._receivers.add(receiver)
        return receiver

    def check(self) -> None:
        """Open and close one connection (pika's error, e.g. ProbableAuthenticationError,
        stays in ``__cause__``)."""
        try:
            pika.BlockingConnection(self._parameters("check")).close()
        except pika.exceptions.AMQPError as exc:
            raise TransportError(f"cannot connect to RabbitMQ at {self._where}: {exc!r}") from exc

    def _forget(self, receiver: _RabbitReceiver) -> None:
        with self._lock:
            self._receivers.discard(receiver)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            receivers = list(self._receivers)
        for receiver in receivers:
            receiver.close()
        with self._lock:
            self._closed = True
            io, publisher = self._io, self._publisher
        if io is None:
            return
        if publisher is not None:
            done = threading.Event()
            io.call(functools.partial(publisher.shutdown, done))
            done.wait(self.connect_timeout)
        io.stop(self.connect_timeout)
