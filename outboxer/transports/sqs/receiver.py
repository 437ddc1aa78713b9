"""Receiving: the long-polling receiver and the deliveries it hands out.

See the package docstring: one poll in flight per queue, and settling never raises.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from ... import wire
from ...errors import TransportError
from ...retry import Backoff
from ..base import Delivery, Receiver
from .attributes import decode_attributes, sns_notification
from .errors import _GONE, _error_message, error_code
from .options import MAX_BATCH_ENTRIES, MAX_VISIBILITY_SECONDS, MAX_WAIT_SECONDS

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient
    from mypy_boto3_sqs.type_defs import MessageTypeDef

log = logging.getLogger("outboxer.transports.sqs")


class _SQSDelivery(Delivery):
    def __init__(self, client: SQSClient, queue: str, url: str, message: MessageTypeDef) -> None:
        self._client = client
        self._url = url
        self._receipt = message.get("ReceiptHandle", "")
        self._lock = threading.Lock()
        self._settled = False
        self.message_id = message.get("MessageId", "")
        self.body = message.get("Body", "").encode("utf-8", "surrogatepass")
        self.headers: dict[str, str] = decode_attributes(message.get("MessageAttributes", {}))
        self.destination = queue
        count = message.get("Attributes", {}).get("ApproximateReceiveCount", "1")
        self.redelivered = count.isdigit() and int(count) > 1
        self.received_at = time.monotonic()
        """When SQS handed it out: its visibility timeout runs from about then."""

    def __repr__(self) -> str:
        return f"<SQS delivery {self.message_id} from {self.destination!r}>"

    def ack(self) -> None:
        with self._lock:
            if not self._settled:
                self._settled = self._call("delete", self._delete)

    def release(self) -> None:
        with self._lock:
            if not self._settled:
                self._settled = self._call("release", lambda: self._set_visibility(0))

    @classmethod
    def ack_many(cls, deliveries: Sequence[Delivery]) -> None:
        """``DeleteMessageBatch`` per queue, ten at a time; what it cannot delete is
        deleted one by one (which knows a message that is already gone)."""
        for group in _by_queue(deliveries):
            for start in range(0, len(group), MAX_BATCH_ENTRIES):
                _delete_batch(group[start : start + MAX_BATCH_ENTRIES])

    def extend(self, seconds: float) -> None:
        timeout = _visibility_seconds(seconds)
        with self._lock:
            if not self._settled:
                self._call("extend", lambda: self._set_visibility(timeout))

    @classmethod
    def extend_many(cls, deliveries: Sequence[Delivery], seconds: float) -> None:
        """``ChangeMessageVisibilityBatch`` per queue, ten at a time (one left over: one
        ``ChangeMessageVisibility``); never raises (see :func:`_extend_batch`)."""
        timeout = _visibility_seconds(seconds)
        for group in _by_queue(deliveries):
            for start in range(0, len(group), MAX_BATCH_ENTRIES):
                chunk = group[start : start + MAX_BATCH_ENTRIES]
                if len(chunk) == 1:
                    chunk[0].extend(seconds)
                else:
                    _extend_batch(chunk, timeout)

    def _delete(self) -> None:
        self._client.delete_message(QueueUrl=self._url, ReceiptHandle=self._receipt)

    def _set_visibility(self, seconds: int) -> None:
        self._client.change_message_visibility(
            QueueUrl=self._url, ReceiptHandle=self._receipt, VisibilityTimeout=seconds
        )

    def _call(self, what: str, call: Callable[[], None]) -> bool:
        """Run ``call``; True when the message is settled (done, or already gone)."""
        try:
            call()
        except ClientError as exc:
            if error_code(exc) in _GONE or "receipt handle" in _error_message(exc).lower():
                log.debug("%s of %r: the message is gone (%s)", what, self, exc)
                return True
            log.warning(
                "%s of %r failed: %s; it comes back after its visibility timeout", what, self, exc
            )
            return False
        except Exception as exc:
            log.warning(
                "%s of %r failed: %s; it comes back after its visibility timeout", what, self, exc
            )
            return False
        return True


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


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return f"{error_code(exc) or 'ClientError'}: {_error_message(exc)}"[:300]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


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


def _visibility_seconds(seconds: float) -> int:
    """``seconds`` as SQS takes a visibility timeout: whole seconds, 0 to 12 hours."""
    return min(MAX_VISIBILITY_SECONDS, max(0, math.ceil(seconds)))


def _by_queue(deliveries: Sequence[Delivery]) -> list[list[_SQSDelivery]]:
    """``deliveries`` (all SQS's) by queue and client, in order: one batch call's worth."""
    queues: dict[tuple[int, str], list[_SQSDelivery]] = {}
    for delivery in deliveries:
        assert isinstance(delivery, _SQSDelivery)
        queues.setdefault((id(delivery._client), delivery._url), []).append(delivery)
    return list(queues.values())


def _gone(code: str, message: str) -> bool:
    """Whether an error (SQS's code and message) says the message is no longer held."""
    code = code.removeprefix("AWS.SimpleQueueService.")
    return code in _GONE or "receipt handle" in message.lower()


def _extend_batch(deliveries: list[_SQSDelivery], seconds: int) -> None:
    """One ``ChangeMessageVisibilityBatch`` for up to ten deliveries of one queue.

    A delivery being settled meanwhile (its lock taken) and a settled one are left out.
    An entry that fails because its message is gone (deleted, or its receipt handle
    expired) is logged at debug level, as :meth:`_SQSDelivery.extend` does; one that fails
    otherwise is extended alone (which warns if that fails too). A call that SQS refuses
    as a whole (an operation it does not support...): each alone. A call that does not
    reach SQS (connection, timeout), or that SQS throttles or fails on (5xx): one
    warning; each alone would wait for the same timeout, one after another, while the
    others' time runs out, or add to a load SQS is refusing already."""
    taken = [d for d in deliveries if d._lock.acquire(blocking=False)]
    try:
        waiting = {str(i): d for i, d in enumerate(taken) if not d._settled}
        if not waiting:
            return
        first = next(iter(waiting.values()))
        alone: list[_SQSDelivery] = []
        try:
            response = first._client.change_message_visibility_batch(
                QueueUrl=first._url,
                Entries=[
                    {"Id": key, "ReceiptHandle": d._receipt, "VisibilityTimeout": seconds}
                    for key, d in waiting.items()
                ],
            )
        except Exception as exc:
            if not isinstance(exc, ClientError) or _overloaded(exc):
                _extend_failed(first, len(waiting), exc)
                return
            log.debug(
                "ChangeMessageVisibilityBatch on %s failed (%s); one at a time", first._url, exc
            )
            alone = list(waiting.values())
        else:
            for entry in response.get("Failed", ()):
                delivery = waiting.get(entry.get("Id", ""))
                if delivery is None:
                    continue
                code, message = entry.get("Code", ""), entry.get("Message", "")
                if _gone(code, message):
                    log.debug("extend of %r: the message is gone (%s: %s)", delivery, code, message)
                else:
                    alone.append(delivery)
        for delivery in alone:
            delivery._call("extend", functools.partial(delivery._set_visibility, seconds))
    finally:
        for delivery in taken:
            delivery._lock.release()


def _extend_failed(first: _SQSDelivery, count: int, exc: BaseException) -> None:
    log.warning(
        "extend of %d messages from %r failed: %s; they come back after their visibility timeout",
        count,
        first.destination,
        _one_line(exc),
    )
    log.debug("ChangeMessageVisibilityBatch failed", exc_info=True)


_OVERLOADED = frozenset(
    {
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
    }
)


def _overloaded(exc: ClientError) -> bool:
    """Whether SQS refused a call for its load (throttling) or its own fault (5xx): a
    call per message would only add to the load, or fail the same way."""
    code = error_code(exc)
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (
        "Throttl" in code
        or code in _OVERLOADED
        or (isinstance(status, int) and (status >= 500 or status == 429))
    )


def _delete_batch(deliveries: list[_SQSDelivery]) -> None:
    with contextlib.ExitStack() as locks:
        for delivery in deliveries:
            locks.enter_context(delivery._lock)
        waiting = {str(i): d for i, d in enumerate(deliveries) if not d._settled}
        if not waiting:
            return
        first = next(iter(waiting.values()))
        try:
            response = first._client.delete_message_batch(
                QueueUrl=first._url,
                Entries=[{"Id": i, "ReceiptHandle": d._receipt} for i, d in waiting.items()],
            )
            deleted = [entry["Id"] for entry in response.get("Successful", ())]
        except Exception as exc:
            log.debug("DeleteMessageBatch on %s failed (%s); one at a time", first._url, exc)
            deleted = []
        for key in deleted:
            if key in waiting:
                waiting.pop(key)._settled = True
        for delivery in waiting.values():
            delivery._settled = delivery._call("delete", delivery._delete)


def _renewed(deliveries: list[_SQSDelivery], seconds: int) -> list[_SQSDelivery]:
    """``deliveries`` whose visibility timeout was set to ``seconds`` from now (one
    ``ChangeMessageVisibilityBatch`` per ten of a queue), without those SQS says are no
    longer held (received by another consumer meanwhile, or visible again). A call that
    fails as a whole hands them all out as they are (a warning)."""
    kept: list[_SQSDelivery] = []
    for group in _by_queue(deliveries):
        for start in range(0, len(group), MAX_BATCH_ENTRIES):
            chunk = group[start : start + MAX_BATCH_ENTRIES]
            first = chunk[0]
            try:
                response = first._client.change_message_visibility_batch(
                    QueueUrl=first._url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": d._receipt, "VisibilityTimeout": seconds}
                        for i, d in enumerate(chunk)
                    ],
                )
            except Exception as exc:
                _extend_failed(first, len(chunk), exc)
                kept.extend(chunk)
                continue
            gone: set[str] = set()
            for entry in response.get("Failed", ()):
                if _gone(entry.get("Code", ""), entry.get("Message", "")):
                    gone.add(entry.get("Id", ""))
            for i, delivery in enumerate(chunk):
                if str(i) in gone:
                    delivery._settled = True
                    log.debug("%r waited too long to be handed out: gone", delivery)
                else:
                    kept.append(delivery)
    return kept


def _release_all(future: concurrent.futures.Future[list[_SQSDelivery]]) -> None:
    """Give back what a poll brought after its receiver closed."""
    if future.cancelled() or future.exception() is not None:
        return
    for delivery in future.result():
        delivery.release()
