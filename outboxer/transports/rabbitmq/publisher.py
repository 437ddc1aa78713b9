"""The publisher: one connection and confirm-mode channel that sends batches.

It declares each destination's exchange, publishes a batch in one go and settles every
message from the broker's confirms and returns (see the package docstring). It runs only
on the I/O thread; :class:`_Batch` is what a ``send`` call hands it and waits on.

This module owns the connection and channel lifecycle and the publishing;
:mod:`.confirms` (its base class :class:`_Confirms`, and :class:`_Batch`) owns the
confirm bookkeeping: settling batches from confirms, returns and failures.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from concurrent.futures import Future

import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel
from pika.connection import Parameters

from ..base import HELD_BACK, SendResult, unavailable_after
from .confirms import _Batch, _closed_result, _Confirms
from .frames import batch_frames
from .ioloop import _cause, _IOThread, _logged, log


class _Publisher(_Confirms):
    """The sending connection and its confirm-mode channel. Runs only on the I/O thread."""

    def __init__(
        self,
        parameters: Parameters,
        io: _IOThread,
        setup_timeout: float,
        confirm_timeout: float,
        where: str,
        max_in_flight: int = 4,
    ) -> None:
        self._params = parameters
        self._io = io
        self._setup_timeout = setup_timeout
        self._confirm_timeout = confirm_timeout
        self._where = where
        self._connection: SelectConnection | None = None
        self._channel: Channel | None = None
        self._ready = False
        self._declared: set[str] = set()
        self._declaring: str | None = None
        self._next_tag = 1
        self._batch: _Batch | None = None
        """The batch being set up and published (connection, channel, declarations)."""
        self._in_flight: deque[_Batch] = deque()
        """Published batches waiting for their confirms, oldest first."""
        self._max_in_flight = max_in_flight
        self._waiting: deque[_Batch] = deque()
        self._shutdown: threading.Event | None = None
        self._blocked: tuple[str, float] | None = None
        """While RabbitMQ blocks the connection (a resource alarm): its reason, and since when."""
        self.connections_opened = 0
        """How many connections were opened (tests tell a kept connection from a new one)."""

    # Batches ----------------------------------------------------------------------------

    def submit(self, batch: _Batch, after: Future[list[SendResult]] | None = None) -> None:
        """Queue ``batch`` behind the batches already here (on the I/O thread).

        ``after`` is the caller's previous send: when it already lost the broker, this
        batch fails with it instead of going out on a new connection ahead of its retry.
        When it has not finished, it is ahead of this batch in this publisher, and a lost
        connection fails both.
        """
        if self._shutdown is not None:
            self._finish_now(batch, _closed_result())
            return
        fenced = unavailable_after(after)
        if fenced is not None:
            self._finish_now(batch, fenced)
            return
        self._waiting.append(batch)
        self._next_batch()

    def _next_batch(self) -> None:
        """Start the next waiting batch if nothing is being set up and there is room on
        the wire: a batch is published while earlier ones still wait for confirms."""
        if (
            self._batch is None
            and self._waiting
            and len(self._in_flight) < self._max_in_flight
            and self._blocked is None
        ):
            self._begin(self._waiting.popleft())

    def _begin(self, batch: _Batch) -> None:
        self._batch = batch
        batch.timer = self._io.ioloop.call_later(self._setup_timeout, self._on_setup_timeout)
        self._advance()

    def _advance(self) -> None:
        """Take the current batch one step further: connect, open, declare, publish."""
        batch = self._batch
        if batch is None or batch.published:
            return
        if self._connection is None:
            self._connect()
            return
        if not self._connection.is_open:
            return  # opening: _on_connection_open comes back here
        if self._channel is None:
            self._open_channel()
            return
        if not self._ready or self._declaring is not None:
            return
        for destination in batch.destinations:
            if destination not in self._declared and destination not in batch.refused:
                self._declare(destination)
                return
        self._publish(batch)

    def _publish(self, batch: _Batch) -> None:
        """Write the whole batch to the socket at once (see :mod:`.frames`)."""
        assert self._channel is not None and self._connection is not None
        connection = self._connection
        tag_index = batch.tag_index
        data, count = batch_frames(
            batch.outgoing,
            batch.refused,
            batch.results,
            tag_index,
            self._channel.channel_number,
            connection.params.frame_max,
            getattr(connection, "_body_max_length", 0),
        )
        if data:
            connection.bytes_sent += len(data)  # type: ignore[attr-defined]
            connection.frames_sent += count  # type: ignore[attr-defined]
            connection._adapter_emit_data(data)  # type: ignore[attr-defined]
        count = len(tag_index)
        batch.published = True
        batch.first_tag = self._next_tag
        self._next_tag += count
        batch.confirmed = bytearray(count)
        batch.unconfirmed = count
        if count == 0:
            self._finish(batch)
            return
        self._stop_timer(batch)
        if self._blocked is None:
            self._confirm_timer(batch)
        self._batch = None
        self._in_flight.append(batch)
        self._next_batch()

    def _confirm_timer(self, batch: _Batch) -> None:
        batch.timer = self._io.ioloop.call_later(
            self._confirm_timeout, functools.partial(self._on_confirm_timeout, batch)
        )

    def _stop_timer(self, batch: _Batch) -> None:
        if batch.timer is not None:
            self._io.ioloop.remove_timeout(batch.timer)  # type: ignore[arg-type]
            batch.timer = None

    # A resource alarm ----------------------------------------------------------------------

    @_logged
    def _on_blocked(self, connection: SelectConnection, frame: object) -> None:
        """RabbitMQ is low on memory or disk: it stops reading from publishing connections
        until the alarm clears. The broker is not gone: what was written is stored once it
        reads on. So no timeout runs while it lasts (giving the connection up would send
        every batch on the wire again on a new connection, and the blocked one would store
        its copy when the alarm clears), and no new batch is written."""
        if connection is not self._connection or self._blocked is not None:
            return
        reason = str(getattr(getattr(frame, "method", None), "reason", "") or "no reason given")
        self._blocked = (reason, time.monotonic())
        for batch in (self._batch, *self._in_flight):
            if batch is not None:
                self._stop_timer(batch)
        log.warning(
            "RabbitMQ at %s blocked publishing (%s): a resource alarm on the broker (memory "
            "or disk; `rabbitmq-diagnostics alarms` shows it); the messages sent wait for "
            "their confirms and the rest wait until the alarm clears",
            self._where,
            reason,
        )

    @_logged
    def _on_unblocked(self, connection: SelectConnection, _frame: object) -> None:
        if connection is not self._connection or self._blocked is None:
            return
        since = self._blocked[1]
        self._blocked = None
        took = time.monotonic() - since
        log.info("RabbitMQ at %s unblocked publishing after %.1f s", self._where, took)
        for batch in self._in_flight:
            self._confirm_timer(batch)
        if self._batch is not None and not self._batch.published:
            self._batch.timer = self._io.ioloop.call_later(
                self._setup_timeout, self._on_setup_timeout
            )
        self._advance()
        self._next_batch()

    @_logged
    def _on_setup_timeout(self) -> None:
        batch = self._batch
        if batch is None or batch.published:
            return
        batch.timer = None
        connection, self._connection = self._connection, None
        self._blocked = None
        self._reset_channel()
        if connection is not None and not (connection.is_closing or connection.is_closed):
            connection.close()
        self._finish_now(
            batch,
            SendResult.unavailable(
                "TimeoutError",
                f"RabbitMQ at {self._where} did not complete the connection and exchange "
                f"declarations within {self._setup_timeout:g} s",
            ),
        )

    @_logged
    def _on_confirm_timeout(self, batch: _Batch) -> None:
        if batch not in self._in_flight:
            return
        batch.timer = None
        # The broker is stuck, or the connection silently dead. Give up on the connection:
        # everything not confirmed fails together, this batch and those behind it, so no
        # later message of a key goes out ahead of the retry of an earlier one.
        connection, self._connection = self._connection, None
        self._blocked = None
        self._reset_channel()
        self._fail_all(
            SendResult.unavailable(
                "confirm_timeout",
                f"RabbitMQ at {self._where} did not confirm the messages within "
                f"{self._confirm_timeout:g} s; they may or may not have been stored",
            )
        )
        if connection is not None and not (connection.is_closing or connection.is_closed):
            connection.close()

    # Connection and channel --------------------------------------------------------------

    def _connect(self) -> None:
        try:
            self._connection = connection = SelectConnection(
                self._params,
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_connection_error,
                on_close_callback=self._on_connection_closed,
                custom_ioloop=self._io.ioloop,
            )
        except Exception as exc:
            self._connection = None
            self._fail_unavailable(exc, "cannot connect to")
            return
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)

    @_logged
    def _on_connection_open(self, connection: SelectConnection) -> None:
        if connection is not self._connection:
            return
        self.connections_opened += 1
        self._declared.clear()  # the broker may have lost them while we were away
        self._advance()

    @_logged
    def _on_connection_error(self, connection: SelectConnection, error: BaseException) -> None:
        if connection is not self._connection:
            return
        self._lost()
        self._fail_unavailable(error, "cannot connect to")

    @_logged
    def _on_connection_closed(self, connection: SelectConnection, error: BaseException) -> None:
        if connection is self._connection:
            self._lost()
            self._fail_unavailable(error, "lost the connection to")
        if self._shutdown is not None and self._connection is None:
            self._shutdown.set()

    def _lost(self) -> None:
        self._connection = None
        self._blocked = None
        self._reset_channel()

    def _fail_unavailable(self, error: BaseException, what: str) -> None:
        """Every message not confirmed yet is UNAVAILABLE: in flight, being set up, and
        waiting (a waiting batch was handed over behind the failed ones, and must not go
        out on the next connection ahead of their retry)."""
        name, text = _cause(error)
        self._fail_all(SendResult.unavailable(name, f"{what} RabbitMQ at {self._where}: {text}"))

    def _reset_channel(self) -> None:
        self._channel = None
        self._ready = False
        self._declaring = None

    def _open_channel(self) -> None:
        assert self._connection is not None
        self._ready = False
        self._channel = channel = self._connection.channel(on_open_callback=self._on_channel_open)
        channel.add_on_close_callback(self._on_channel_closed)

    @_logged
    def _on_channel_open(self, channel: Channel) -> None:
        if channel is not self._channel:
            return
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(
            ack_nack_callback=self._on_confirm,
            callback=lambda _frame: self._on_confirm_mode(channel),
        )

    @_logged
    def _on_confirm_mode(self, channel: Channel) -> None:
        if channel is not self._channel:
            return
        self._ready = True
        self._next_tag = 1  # delivery tags count from 1 on each channel
        self._advance()

    @_logged
    def _on_channel_closed(self, channel: Channel, reason: Exception) -> None:
        if channel is not self._channel:
            return
        declaring = self._declaring
        self._reset_channel()
        if not isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            return  # the connection is going: _on_connection_closed settles the batch
        if self._in_flight:
            # Their confirms will never come on the closed channel. An exchange deleted
            # behind our back (404) is the usual cause: declare again next time. The
            # batches behind them were not published: they are held back, not failed, so
            # that none of their messages goes out ahead of a retried earlier one.
            self._declared.clear()
            lost = SendResult.retry(
                "channel_closed",
                f"RabbitMQ closed the channel: {reason.reply_code} {reason.reply_text}",
            )
            for published in list(self._in_flight):
                self._finish_now(published, lost)
            behind = SendResult.retry(
                HELD_BACK, "not sent: the channel closed while earlier messages were unconfirmed"
            )
            waiting = list(self._waiting)
            self._waiting.clear()
            for batch in (self._batch, *waiting):
                if batch is not None:
                    self._finish_now(batch, behind)
            return
        batch = self._batch
        if batch is None:
            return
        if declaring is not None:
            batch.refused[declaring] = _declare_failure(declaring, reason)
        self._advance()  # a new channel for the batch being set up

    def _declare(self, destination: str) -> None:
        assert self._channel is not None
        self._declaring = destination
        channel = self._channel
        channel.exchange_declare(
            destination,
            "topic",
            durable=True,
            callback=lambda _frame: self._on_declared(channel, destination),
        )

    @_logged
    def _on_declared(self, channel: Channel, destination: str) -> None:
        if channel is not self._channel:
            return
        self._declaring = None
        self._declared.add(destination)
        self._advance()

    # Shutdown ------------------------------------------------------------------------------

    def shutdown(self, done: threading.Event) -> None:
        self._shutdown = done
        for batch in (self._batch, *self._in_flight, *self._waiting):
            if batch is not None:
                batch.fill(_closed_result())
                batch.complete()
        self._batch = None
        self._in_flight.clear()
        self._waiting.clear()
        connection = self._connection
        if connection is None or connection.is_closing or connection.is_closed:
            self._lost()
            done.set()
            return
        if self._blocked is not None:
            # A blocked broker reads nothing, not even connection.close: waiting for its
            # close-ok would hold the stop until the alarm clears. The socket goes with the
            # process (or the ioloop's connection when it is collected).
            self._lost()
            done.set()
            return
        connection.close()


def _declare_failure(destination: str, reason: pika.exceptions.ChannelClosedByBroker) -> SendResult:
    said = f"RabbitMQ said: {reason.reply_code} {reason.reply_text}"
    if reason.reply_code == 406:
        return SendResult.rejected(
            "destination_mismatch",
            f"exchange {destination!r} already exists with other settings than the durable "
            f"topic exchange outboxer needs ({said}); delete it (outboxer declares it again on "
            "the next send) or send to another destination",
        )
    if reason.reply_code == 403:
        return SendResult.retry(
            "access_refused",
            f"cannot declare exchange {destination!r} ({said}); give the user configure "
            "permission on it, or use a name without the reserved 'amq.' prefix",
        )
    return SendResult.retry("channel_closed", f"cannot declare exchange {destination!r} ({said})")
