"""The transport: configuration, the boto3 clients, sending a batch, and opening receivers."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

from ... import wire
from ...errors import ConfigurationError, TransportError
from ...instrumentation import TransportDescription
from ...message import Envelope
from ..base import Outcome, Receiver, SendResult, Subscription, Transport
from ..lanes import Item, send_in_lanes
from ..names import name_problem
from .attributes import encode_attributes
from .errors import error_code, result_for_error
from .options import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_VISIBILITY_SECONDS,
    MAX_WAIT_SECONDS,
    _parse_url,
    _positive_float,
    _positive_int,
)
from .receiver import _SQSReceiver, log
from .sending import deduplication_id, group_id

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient
    from mypy_boto3_sqs.literals import QueueAttributeNameType
    from mypy_boto3_sqs.type_defs import (
        SendMessageBatchRequestEntryTypeDef,
        SendMessageBatchResultTypeDef,
    )

__all__ = ["SQSTransport"]


class SQSTransport(Transport):
    """Sends to and receives from Amazon SQS queues (see the package docstring).

    ``client`` is a ready boto3 SQS client; without one, a client is built from
    ``region``, ``endpoint_url`` (moto, LocalStack, a VPC endpoint), the credentials given
    (or boto3's usual chain, or ``profile``), ``connect_timeout``/``read_timeout`` and two
    attempts per call, so an unreachable endpoint fails in seconds (a busy server gets
    ``read_timeout`` to answer: a timed-out send may have arrived, and is sent again).
    ``concurrency`` calls are in flight at once. ``max_message_bytes`` is the size limit
    of one message, body plus attributes (256 KiB, SQS's historical limit; raise it to
    1 MiB where supported).
    ``visibility_timeout`` overrides the queue's for received messages.
    """

    def __init__(
        self,
        client: SQSClient | None = None,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        concurrency: int = 8,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        visibility_timeout: int | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        profile: str | None = None,
    ) -> None:
        self.concurrency = _positive_int("concurrency", concurrency, 1, 256)
        self.max_message_bytes = _positive_int(
            "max_message_bytes", max_message_bytes, 1024, 1024 * 1024
        )
        self._limit = self.max_message_bytes
        self._batch_bytes = max(self._limit, DEFAULT_MAX_MESSAGE_BYTES)
        self.visibility_timeout = (
            None
            if visibility_timeout is None
            else _positive_int("visibility_timeout", visibility_timeout, 0, MAX_VISIBILITY_SECONDS)
        )
        connect_timeout = _positive_float("connect_timeout", connect_timeout)
        read_timeout = _positive_float("read_timeout", read_timeout)
        if endpoint_url is not None and not re.match(r"https?://[^/]", endpoint_url):
            raise ConfigurationError(
                f"SQS endpoint_url must be an http:// or https:// URL, got {endpoint_url!r}"
            )
        if (aws_access_key_id is None) != (aws_secret_access_key is None):
            raise ConfigurationError(
                "SQS credentials need both an access key id and a secret access key"
            )

        self._owns_clients = client is None
        self._receive_client: SQSClient | None
        if client is None:
            try:
                session = boto3.session.Session(
                    aws_access_key_id=aws_access_key_id,
                    aws_secret_access_key=aws_secret_access_key,
                    aws_session_token=aws_session_token,
                    region_name=region,
                    profile_name=profile,
                )
            except BotoCoreError as exc:  # an unknown profile
                raise ConfigurationError(f"cannot set up the SQS client: {exc}") from exc
            # Typed str, but None when no region is configured anywhere.
            region = region or cast("str | None", session.region_name)
            if region is None:
                if endpoint_url is None:
                    raise ConfigurationError(
                        "SQS needs a region: pass region=..., add ?region=... to the sqs:// "
                        "URL, or set AWS_DEFAULT_REGION"
                    )
                region = "us-east-1"  # a local endpoint (moto, LocalStack) still signs with one
            pool = self.concurrency + 2
            common: dict[str, Any] = {
                "connect_timeout": connect_timeout,
                "retries": {"total_max_attempts": 2, "mode": "standard"},
                "max_pool_connections": pool,
                "parameter_validation": False,  # entries are built here, already valid
            }
            try:
                self._client = session.client(
                    "sqs",
                    region_name=region,
                    endpoint_url=endpoint_url,
                    config=Config(read_timeout=read_timeout, **common),
                )
                # Long polls hold a response for up to 20 s: a longer read timeout.
                self._receive_client = session.client(
                    "sqs",
                    region_name=region,
                    endpoint_url=endpoint_url,
                    config=Config(read_timeout=read_timeout + MAX_WAIT_SECONDS, **common),
                )
            except NoRegionError as exc:  # pragma: no cover - region is always set above
                raise ConfigurationError("SQS needs a region") from exc
        else:
            self._client = client
            self._receive_client = None
            region = region or client.meta.region_name
            endpoint_url = endpoint_url or client.meta.endpoint_url
        self.region = region
        self.endpoint_url = endpoint_url

        attributes: dict[str, Any] = {"cloud.region": region}
        server = urlsplit(endpoint_url) if endpoint_url else None
        if server is not None and server.hostname:
            attributes["server.address"] = server.hostname
            if server.port:
                attributes["server.port"] = server.port
        else:
            attributes["server.address"] = f"sqs.{region}.amazonaws.com"
        self.description = TransportDescription("aws_sqs", attributes)

        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self._receivers: weakref.WeakSet[_SQSReceiver] = weakref.WeakSet()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQSTransport:
        """``sqs://?region=eu-west-1&endpoint_url=http://127.0.0.1:4566&concurrency=8``.

        ``sqs://KEY:SECRET@?region=...`` gives credentials (percent-encode ``/`` and ``@``
        in the secret); otherwise boto3's usual chain finds them. Query options:
        ``region``, ``endpoint_url``, ``concurrency``, ``max_message_bytes``,
        ``connect_timeout``, ``read_timeout``, ``visibility_timeout``, ``profile``;
        keyword ``options`` override them.
        """
        kwargs = _parse_url(url)
        kwargs.update(options)
        return cls(**kwargs)

    @property
    def client(self) -> SQSClient:
        """The boto3 client messages are sent with."""
        return self._client

    def __repr__(self) -> str:
        where = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"SQSTransport(region={self.region!r}{where}, concurrency={self.concurrency})"

    # Sending ------------------------------------------------------------------------------

    def send(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        if self._closed:
            raise TransportError("the SQS transport is closed")
        results: list[SendResult | None] = [None] * len(envelopes)
        urls = self._resolve({e.destination for e in envelopes}, results, envelopes)
        items: list[Item[SendMessageBatchRequestEntryTypeDef]] = []
        limit = self._limit
        for index, envelope in enumerate(envelopes):
            if results[index] is not None:
                continue
            url = urls[envelope.destination]
            prepared = self._prepare(index, envelope, url, limit)
            if isinstance(prepared, SendResult):
                results[index] = prepared
            else:
                items.append(prepared)
        send_in_lanes(
            items,
            results,
            concurrency=self.concurrency,
            max_bytes=self._batch_bytes,
            call=self._batch_call,
            call_failed=self._batch_failed,
            executor=self._executor,
        )
        return [
            r if r is not None else SendResult.retry("no_result", "SQS did not report on it")
            for r in results
        ]

    def _resolve(
        self,
        destinations: set[str],
        results: list[SendResult | None],
        envelopes: Sequence[Envelope],
    ) -> dict[str, str]:
        """Queue URLs by name; messages to a queue that cannot be resolved get a result."""
        urls: dict[str, str] = {}
        failed: dict[str, SendResult] = {}
        outage: SendResult | None = None
        for name in destinations:
            url = self._urls.get(name)
            problem = name_problem("sqs", name) if url is None else None
            if problem is not None:  # SQS would answer with an obscure error, or none
                failed[name] = SendResult.rejected("invalid_name", problem)
                continue
            if url is None:
                if outage is not None:  # don't wait for a dead endpoint once per queue
                    failed[name] = outage
                    continue
                try:
                    url = self._client.get_queue_url(QueueName=name)["QueueUrl"]
                except Exception as exc:
                    result = self._queue_error(exc, name, "resolving the URL of")
                    failed[name] = result
                    if result.outcome is Outcome.UNAVAILABLE:
                        outage = result
                    continue
                with self._lock:
                    self._urls[name] = url
            urls[name] = url
        if failed:
            for index, envelope in enumerate(envelopes):
                if envelope.destination in failed:
                    results[index] = failed[envelope.destination]
        return urls

    def _queue_error(self, exc: BaseException, name: str, doing: str) -> SendResult:
        if isinstance(exc, ClientError) and error_code(exc) == "QueueDoesNotExist":
            with self._lock:
                self._urls.pop(name, None)
            return SendResult.rejected(
                "unroutable",
                f"SQS queue {name!r} does not exist (create it, or check the destination "
                f"name and region {self.region})",
            )
        return result_for_error(exc, f"{doing} SQS queue {name!r}")

    def _prepare(
        self, index: int, envelope: Envelope, url: str, limit: int
    ) -> Item[SendMessageBatchRequestEntryTypeDef] | SendResult:
        try:
            body = envelope.payload.decode()
        except UnicodeDecodeError as exc:
            return SendResult.rejected(
                "invalid_body", f"SQS message bodies are text, and this payload is not UTF-8: {exc}"
            )
        if not body:
            return SendResult.rejected("invalid_body", "SQS does not accept an empty message body")
        attributes, size = encode_attributes(wire.encode_headers(envelope))
        size += len(envelope.payload)
        if size > limit:
            return SendResult.rejected(
                "message_too_large",
                f"the message is {size} bytes (body plus attributes); SQS's limit is {limit} "
                "bytes: send a reference to the data instead",
            )
        entry: SendMessageBatchRequestEntryTypeDef = {
            "Id": "",
            "MessageBody": body,
            "MessageAttributes": attributes,
        }
        if envelope.destination.endswith(".fifo"):
            entry["MessageGroupId"] = group_id(envelope)
            entry["MessageDeduplicationId"] = deduplication_id(envelope)
        key = envelope.key
        group: object = index if key is None else (url, key)
        return Item(index, url, group, key, size, entry)

    def _batch_call(
        self, chunk: list[Item[SendMessageBatchRequestEntryTypeDef]]
    ) -> SendMessageBatchResultTypeDef:
        entries = []
        for position, item in enumerate(chunk):
            item.entry["Id"] = str(position)
            entries.append(item.entry)
        return self._client.send_message_batch(QueueUrl=chunk[0].target, Entries=entries)

    def _batch_failed(self, exc: BaseException, url: str) -> SendResult:
        return self._queue_error(exc, url.rsplit("/", 1)[-1], "sending to")

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise TransportError("the SQS transport is closed")
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="outboxer-sqs"
                )
            return self._pool

    # Receiving ----------------------------------------------------------------------------

    def receiver(self, subscription: Subscription) -> Receiver:
        if self._closed:
            raise TransportError("the SQS transport is closed")
        client = self._receive_client or self._client
        queues = [(name, self._ensure_queue(client, name)) for name in subscription.destinations]
        receiver = _SQSReceiver(client, queues, self.visibility_timeout)
        self._receivers.add(receiver)
        return receiver

    def _ensure_queue(self, client: SQSClient, name: str) -> str:
        """The URL of queue ``name``, created (FIFO if its name says so) when missing."""
        try:
            try:
                url = client.get_queue_url(QueueName=name)["QueueUrl"]
            except ClientError as exc:
                if error_code(exc) != "QueueDoesNotExist":
                    raise
                attributes: dict[QueueAttributeNameType, str] = {}
                if name.endswith(".fifo"):
                    attributes["FifoQueue"] = "true"
                url = client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
                log.info("created SQS queue %r", name)
        except (ClientError, BotoCoreError) as exc:
            raise TransportError(f"cannot open SQS queue {name!r}: {exc}") from exc
        with self._lock:
            self._urls[name] = url
        return url

    def check(self) -> None:
        """One authenticated call (ListQueues, one result): reachable, credentials valid.

        AccessDenied passes: the credentials were recognised, and a relay or consumer needs
        no permission to list queues.
        """
        try:
            self._client.list_queues(MaxResults=1)
        except ClientError as exc:
            if error_code(exc) in ("AccessDenied", "AccessDeniedException"):
                return
            raise TransportError(f"SQS refused the check: {error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise TransportError(f"cannot reach SQS: {type(exc).__name__}") from exc

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        for receiver in list(self._receivers):
            receiver.close()
        if pool is not None:
            pool.shutdown(wait=True)
        if self._owns_clients:
            self._client.close()
            if self._receive_client is not None:
                self._receive_client.close()
