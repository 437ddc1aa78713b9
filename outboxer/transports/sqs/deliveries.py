"""The deliveries an SQS receiver hands out, and the batch calls that settle or extend
many of them at once (ten entries per call and queue).

Settling never raises: a failed delete or extend is a warning, and the message comes back
after its visibility timeout; one that is gone already (deleted, its receipt handle
expired) is a debug line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from ..base import Delivery
from .attributes import decode_attributes
from .errors import _GONE, _error_message, error_code
from .options import MAX_BATCH_ENTRIES, MAX_VISIBILITY_SECONDS

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


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return f"{error_code(exc) or 'ClientError'}: {_error_message(exc)}"[:300]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


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
