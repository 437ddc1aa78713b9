"""What the SQS and SNS transports share as transports: sending a batch, their thread pool.

Here, in the SQS package, because the SNS transport builds on it (its consumers read SQS
queues). Both send the same message (:mod:`.sending`: text body, attributes,
FIFO ids) in lanes of ten (:mod:`outboxer.transports.lanes`); they differ in what a
destination is (a queue URL, a topic ARN: ``_resolve``), the batch call
(``SendMessageBatch``, ``PublishBatch``: ``_batch_call``), how a failed call reads
(``_batch_failed``) and the name of the body field of an entry (``body_field``).
"""

from __future__ import annotations

import abc
import concurrent.futures
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ...errors import TransportError
from ...message import Envelope
from ..base import SendResult, Transport
from ..lanes import Item, send_batch
from .options import DEFAULT_MAX_MESSAGE_BYTES
from .sending import deduplication_id, encode_message, group_id

__all__ = ["BatchTransport", "Entry"]

Entry = dict[str, Any]
"""One entry of a batch call (``Id``, the body, ``MessageAttributes``, FIFO ids)."""


class BatchTransport(Transport):
    """An AWS transport that sends in lanes (see the module docstring)."""

    service: ClassVar[str]
    """``SQS`` or ``SNS``, for messages."""
    body_field: ClassVar[str]
    """The entry's body field: ``MessageBody`` (SQS) or ``Message`` (SNS)."""
    concurrency: int
    region: str
    endpoint_url: str | None

    def _start(self, concurrency: int, max_message_bytes: int) -> None:
        """Set up sending: ``concurrency`` calls in flight, messages up to the limit."""
        self.concurrency = concurrency
        self.max_message_bytes = max_message_bytes
        self._limit = max_message_bytes
        self._batch_bytes = max(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return (
            f"{type(self).__name__}(region={self.region!r}{where}, concurrency={self.concurrency})"
        )

    def send(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        if self._closed:
            raise TransportError(f"the {self.service} transport is closed")
        return send_batch(
            envelopes,
            service=self.service,
            resolve=self._resolve,
            prepare=self._prepare,
            concurrency=self.concurrency,
            max_bytes=self._batch_bytes,
            call=self._batch_call,
            call_failed=self._batch_failed,
            executor=self._executor,
        )

    @abc.abstractmethod
    def _resolve(self, name: str) -> str | SendResult:
        """The target of destination ``name``, or the result of every message for it."""

    @abc.abstractmethod
    def _batch_call(self, chunk: list[Item[Entry]]) -> Mapping[str, Any]:
        """One batch call to ``chunk[0].target`` (entry ids are set already)."""

    @abc.abstractmethod
    def _batch_failed(self, exc: BaseException, target: str) -> SendResult:
        """The result of each message of a call to ``target`` that raised ``exc``."""

    def _prepare(self, index: int, envelope: Envelope, target: str) -> Item[Entry] | SendResult:
        encoded = encode_message(envelope, self._limit, self.service)
        if isinstance(encoded, SendResult):
            return encoded
        entry: Entry = {
            "Id": "",
            self.body_field: encoded.body,
            "MessageAttributes": encoded.attributes,
        }
        if envelope.destination.endswith(".fifo"):
            entry["MessageGroupId"] = group_id(envelope)
            entry["MessageDeduplicationId"] = deduplication_id(envelope)
        key = envelope.key
        group: object = index if key is None else (target, key)
        return Item(index, target, group, key, encoded.size, entry)

    @staticmethod
    def _entries(chunk: list[Item[Entry]]) -> list[Entry]:
        """The chunk's entries, their ids their positions (as the lanes read the answer)."""
        for position, item in enumerate(chunk):
            item.entry["Id"] = str(position)
        return [item.entry for item in chunk]

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise TransportError(f"the {self.service} transport is closed")
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.concurrency,
                    thread_name_prefix=f"outboxer-{self.service.lower()}",
                )
            return self._pool

    def _stop_sending(self) -> bool:
        """Close for sending and wait for the pool; False when it was closed already."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        return True
