"""Receiving: the long-polling receiver (its deliveries: :mod:`.deliveries`).

See the package docstring: one poll in flight per queue, and settling never raises.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from ... import wire
from ...errors import TransportError
from ...retry import Backoff
from ..base import Delivery, Receiver
from .attributes import sns_notification
from .deliveries import _one_line, _renewed, _SQSDelivery, _visibility_seconds
from .errors import error_code
from .options import MAX_BATCH_ENTRIES, MAX_WAIT_SECONDS

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

log = logging.getLogger("outboxer.transports.sqs")


HELD_FOR_ZERO = 30
"""Seconds a receive from a queue whose own visibility timeout is 0 asks for (SQS's
default timeout); the consumer extends it while a handler runs."""

STALE_FRACTION = 0.25
"""A delivery that waited in its receiver longer than this part of its visibility timeout
has its visibility renewed before it is handed out (see :meth:`_SQSReceiver._take`)."""

_REPORT_EVERY = 60.0
"""Seconds between warnings about one queue's failed polls that were not raised."""

_REST = Backoff(initial=1.0, multiplier=2.0, max_delay=30.0, jitter=0.2)
"""How long a queue whose poll failed rests before it is polled again (per queue: a
deleted queue must not be polled on every receive, nor slow its receiver's other queues)."""


class _PollFailed(TransportError):
    """Receiving from one queue failed (``queue``: its name)."""

    def __init__(self, queue: str, message: str) -> None:
        super().__init__(message)
        self.queue = queue


def _poll_error(name: str, exc: BaseException) -> str:
    """One line: receiving from queue ``name`` failed with ``exc``, and the fix if known."""
    if isinstance(exc, ClientError) and error_code(exc) == "QueueDoesNotExist":
        return (
            f"SQS queue {name!r} does not exist (deleted while the consumer ran?): create "
            "it again, or restart the consumer, which creates its queues"
        )
    return f"receiving from SQS queue {name!r} failed: {exc}"


class _SQSReceiver(Receiver):
    """Long polls; with several queues, one poll in flight per queue (see the docstring)."""

    def __init__(
        self,
        client: SQSClient,
        queues: list[tuple[str, str]],
        visibility_timeout: int | None,
        sources: frozenset[str] = frozenset(),
    ) -> None:
        self._client = client
        self._queues = queues
        self._sources = sources
        self._visibility = visibility_timeout
        self._held_for: dict[int, int] = {}
        """Queues (by index) whose own visibility timeout is 0: their receives ask for
        this many seconds instead (see :meth:`_shortest`)."""
        self.visibility_timeout = (
            float(visibility_timeout) if visibility_timeout is not None else self._shortest()
        )
        self._stale_after = (
            None if self.visibility_timeout is None else self.visibility_timeout * STALE_FRACTION
        )
        read_timeout = getattr(client.meta.config, "read_timeout", None) or 60
        self._max_wait = max(0, min(MAX_WAIT_SECONDS, int(read_timeout) - 2))
        self._lock = threading.Lock()
        self._closed = False
        self._buffer: deque[_SQSDelivery] = deque()
        self._polls: dict[int, concurrent.futures.Future[list[_SQSDelivery]]] = {}
        self._turn = itertools.count()
        self._reported: dict[str, float] = {}
        """When a failed poll of each queue was last logged as a warning."""
        self._resting: dict[int, tuple[float, int]] = {}
        """Queues whose last polls failed: until when they rest, and how many failed."""
        self._last_error: _PollFailed | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if len(queues) > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=len(queues), thread_name_prefix="outboxer-sqs-poll"
            )

    def _shortest(self) -> float | None:
        """The shortest visibility timeout of the queues (each queue's own setting, which
        a receive without ``VisibilityTimeout`` gets); None if SQS did not say.

        A queue whose timeout is 0 hands a message out again at once, to every poll,
        while the handler still runs (dozens of duplicates a second, and a redrive
        policy's receive count spent in seconds): its receives ask for
        :data:`HELD_FOR_ZERO` seconds instead, which the consumer extends, and one
        warning names the fix."""
        found: list[float] = []
        for index, (name, url) in enumerate(self._queues):
            try:
                attributes = self._client.get_queue_attributes(
                    QueueUrl=url, AttributeNames=["VisibilityTimeout"]
                )["Attributes"]
                seconds = float(attributes["VisibilityTimeout"])
            except (ClientError, BotoCoreError, KeyError, ValueError) as exc:
                # Not knowing it, the consumer extends what it holds after its own
                # extend_after: a queue whose timeout is shorter redelivers slow messages.
                log.debug("reading the visibility timeout of %r failed", name, exc_info=True)
                log.warning(
                    "could not read the visibility timeout of SQS queue %r (%s): if it is "
                    "shorter than twice the consumer's extend_after, a message whose handler "
                    "runs longer is delivered again meanwhile; allow sqs:GetQueueAttributes, "
                    "or pass visibility_timeout= to the transport",
                    name,
                    _one_line(exc),
                )
                continue
            if seconds < 1:
                self._held_for[index] = HELD_FOR_ZERO
                seconds = HELD_FOR_ZERO
                log.warning(
                    "SQS queue %r has a visibility timeout of 0: it would hand each message "
                    "out again while its handler runs; the consumer asks for %d s on each "
                    "receive instead. Give the queue a visibility timeout (aws sqs "
                    "set-queue-attributes --attributes VisibilityTimeout=30), or pass "
                    "visibility_timeout= to the transport",
                    name,
                    HELD_FOR_ZERO,
                )
            found.append(seconds)
        return min(found, default=None)

    def _poll(self, index: int, max_messages: int, wait: int) -> list[_SQSDelivery]:
        name, url = self._queues[index]
        request: dict[str, Any] = {
            "QueueUrl": url,
            "MaxNumberOfMessages": max(1, min(MAX_BATCH_ENTRIES, max_messages)),
            "WaitTimeSeconds": wait,
            "MessageAttributeNames": ["All"],
            "MessageSystemAttributeNames": ["ApproximateReceiveCount"],
        }
        if self._visibility is not None:
            request["VisibilityTimeout"] = self._visibility
        elif index in self._held_for:
            request["VisibilityTimeout"] = self._held_for[index]
        try:
            response = self._client.receive_message(**request)
        except (ClientError, BotoCoreError) as exc:
            raise _PollFailed(name, _poll_error(name, exc)) from exc
        deliveries = [
            _SQSDelivery(self._client, name, url, m) for m in response.get("Messages", ())
        ]
        if name in self._sources:
            for delivery in deliveries:  # an inbound adapter's: it takes the broker's id
                delivery.headers[wire.BROKER_MESSAGE_ID] = delivery.message_id
        else:
            for delivery in deliveries:
                _mark_notification(delivery, name)
        return list(deliveries)

    def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        if max_messages < 1:
            return []
        wait = min(self._max_wait, max(0, int(timeout)))
        if self._pool is None:
            return [] if self._closed else list(self._poll(0, max_messages, wait))
        with self._lock:
            if self._closed:
                return []
            earlier = self._harvest()
            self._take(0)  # drop the expired ones, so that the queues are polled again
            if not self._buffer:
                now = time.monotonic()
                start = next(self._turn) % len(self._queues)
                for offset in range(len(self._queues)):
                    index = (start + offset) % len(self._queues)
                    if index not in self._polls and self._rests_until(index) <= now:
                        self._polls[index] = self._pool.submit(
                            self._poll, index, max_messages, wait
                        )
                if not self._polls and self._last_error is not None:
                    raise self._last_error  # every queue failed and rests: an outage
                pending = list(self._polls.values())
            else:
                pending = []
        if pending:
            # A poll answers within ``wait`` plus a round trip; don't wait for the slowest.
            concurrent.futures.wait(
                pending, timeout=max(0.0, timeout) + 1.0, return_when="FIRST_COMPLETED"
            )
        with self._lock:
            error = self._harvest() or earlier
            taken, stale = self._take(max_messages)
        if stale:
            taken.extend(_renewed(stale, _visibility_seconds(self.visibility_timeout or 0)))
        if error is not None:
            if not taken and not self._any_healthy():
                raise error
            # Other queues brought messages, or are being read: hand those out, and say
            # what failed (a queue that keeps failing while another is busy would otherwise
            # never be heard of).
            self._report(error)
        return taken

    def _take(self, count: int) -> tuple[list[Delivery], list[_SQSDelivery]]:
        """Up to ``count`` buffered deliveries to hand out (lock held): the fresh ones,
        and the stale ones, whose visibility the caller renews first. Expired ones met on
        the way (all of them with ``count`` 0) are dropped.

        What a poll brought after ``receive`` returned waits here for the next
        ``receive``, which a consumer whose workers are all busy does not make: meanwhile
        nothing extends it (the consumer extends what it was handed, counting from the
        hand-out), and once its visibility timeout runs out SQS hands it to another
        consumer too. So a delivery that waited more than :data:`STALE_FRACTION` of the
        timeout has it renewed before it is handed out (one call per ten of a queue), and
        one that waited the whole timeout is not handed out at all: it is visible again,
        or another consumer has it, and it comes back as any message does."""
        taken: list[Delivery] = []
        stale: list[_SQSDelivery] = []
        limit = self._stale_after
        now = time.monotonic()
        kept: deque[_SQSDelivery] = deque()
        while self._buffer and (count == 0 or len(taken) + len(stale) < count):
            delivery = self._buffer.popleft()
            age = now - delivery.received_at
            if limit is not None and age >= limit / STALE_FRACTION:
                delivery._settled = True  # its receipt handle is no longer ours to use
                log.debug("%r waited past its visibility timeout: dropped", delivery)
            elif not count:
                kept.append(delivery)
            elif limit is not None and age > limit:
                stale.append(delivery)
            else:
                taken.append(delivery)
        self._buffer.extendleft(reversed(kept))
        return taken, stale

    def _rests_until(self, index: int) -> float:
        resting = self._resting.get(index)
        return 0.0 if resting is None else resting[0]

    def _any_healthy(self) -> bool:
        """Whether some queue's last poll did not fail (it is read as usual)."""
        with self._lock:
            return len(self._resting) < len(self._queues)

    def _harvest(self) -> _PollFailed | None:
        """Move finished polls' deliveries into the buffer (lock held); the last failure."""
        error: _PollFailed | None = None
        for index, future in list(self._polls.items()):
            if not future.done():
                continue
            del self._polls[index]
            try:
                self._buffer.extend(future.result())
            except _PollFailed as exc:
                error = self._last_error = exc
                failures = self._resting.get(index, (0.0, 0))[1] + 1
                self._resting[index] = (time.monotonic() + _REST.delay(failures), failures)
            else:
                self._resting.pop(index, None)
                if not self._resting:
                    self._last_error = None
        return error

    def _report(self, error: _PollFailed) -> None:
        """Log a failed poll that ``receive`` does not raise: a warning per queue at most
        every minute, debug level in between."""
        now = time.monotonic()
        last = self._reported.get(error.queue)
        if last is not None and now - last < _REPORT_EVERY:
            log.debug("%s", error)
            return
        self._reported[error.queue] = now
        log.warning("%s; the receiver's other queues are still read", error)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            buffered = list(self._buffer)
            self._buffer.clear()
            polls = list(self._polls.values())
            self._polls.clear()
        for delivery in buffered:
            delivery.release()
        for future in polls:
            future.add_done_callback(_release_all)
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _mark_notification(delivery: _SQSDelivery, queue: str) -> None:
    """An SNS notification without envelope attributes (the queue's subscription has raw
    delivery off) is marked undecodable with the fix, so its dead letter says what to do."""
    headers = delivery.headers
    if headers.get(wire.MESSAGE_ID) or headers.get(wire.TYPE) or wire.UNDECODABLE in headers:
        return
    topic = sns_notification(delivery.body.decode("utf-8", "replace"))
    if topic is not None:
        headers[wire.UNDECODABLE] = (
            f"it is an SNS notification from topic {topic[:300]!r}, not the message: the "
            f"subscription of SQS queue {queue!r} to that topic has raw message delivery "
            "off; turn it on (RawMessageDelivery=true; outboxer-inbox with sns:// sets it "
            "at start), then publish the notification's Message again"
        )


def _release_all(future: concurrent.futures.Future[list[_SQSDelivery]]) -> None:
    """Give back what a poll brought after its receiver closed."""
    if future.cancelled() or future.exception() is not None:
        return
    for delivery in future.result():
        delivery.release()
