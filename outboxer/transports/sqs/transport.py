"""The transport: configuration, the boto3 clients, sending a batch, and opening receivers."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from botocore.exceptions import BotoCoreError, ClientError

from ...errors import ConfigurationError, TransportError
from ..aws import ClientOptions, describe
from ..base import Receiver, SendResult, Subscription
from ..lanes import Item
from ..names import name_problem
from .batch import BatchTransport, Entry
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
from .sharing import shared_queues, sharing_warning

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient
    from mypy_boto3_sqs.literals import QueueAttributeNameType
    from mypy_boto3_sqs.type_defs import (
        SendMessageBatchRequestEntryTypeDef,
        SendMessageBatchResultTypeDef,
    )

__all__ = ["SQSTransport"]


class SQSTransport(BatchTransport):
    """Sends to and receives from Amazon SQS queues (see the package docstring).

    ``client`` is a ready boto3 SQS client; without one, a client is built from
    ``region``, ``endpoint_url`` (moto, LocalStack, a VPC endpoint), the credentials given
    (or boto3's usual chain, or ``profile``), ``connect_timeout``/``read_timeout`` and two
    attempts per call, so an unreachable endpoint fails in seconds (a busy server gets
    ``read_timeout`` to answer: a timed-out send may have arrived, and is sent again).
    ``concurrency`` calls are in flight at once. ``max_message_bytes`` is the size limit
    of one message, body plus attributes (256 KiB, SQS's historical limit; raise it to
    1 MiB where supported).
    ``visibility_timeout`` (1 s to 12 h) overrides the queue's for received messages.
    """

    service = "SQS"
    body_field = "MessageBody"

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
        concurrency = _positive_int("concurrency", concurrency, 1, 256)
        self._start(
            concurrency,
            _positive_int("max_message_bytes", max_message_bytes, 1024, 1024 * 1024),
        )
        self.visibility_timeout = (
            None
            if visibility_timeout is None
            # 0 would hand each message out again to the next poll while its handler runs.
            else _positive_int("visibility_timeout", visibility_timeout, 1, MAX_VISIBILITY_SECONDS)
        )
        connect_timeout = _positive_float("connect_timeout", connect_timeout)
        read_timeout = _positive_float("read_timeout", read_timeout)
        options = ClientOptions(
            region=region,
            endpoint_url=endpoint_url,
            concurrency=self.concurrency,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            profile=profile,
        )

        self._owns_clients = client is None
        self._client: SQSClient
        self._receive_client: SQSClient | None
        if client is None:
            # Long polls hold a response for up to 20 s: a longer read timeout.
            region, (self._client, self._receive_client) = options.clients(
                "SQS", read_timeout, read_timeout + MAX_WAIT_SECONDS
            )
        else:
            self._client = client
            self._receive_client = None
            region = region or client.meta.region_name
            endpoint_url = endpoint_url or client.meta.endpoint_url
        self.region = region
        self.endpoint_url = endpoint_url
        self.description = describe("aws_sqs", "sqs", region, endpoint_url)

        self._urls: dict[str, str] = {}
        self._receivers: weakref.WeakSet[_SQSReceiver] = weakref.WeakSet()
        self._warned: set[tuple[str, str]] = set()

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

    # Sending ------------------------------------------------------------------------------

    def _resolve(self, name: str) -> str | SendResult:
        """The URL of queue ``name``, or the result of every message for it."""
        url = self._urls.get(name)
        if url is not None:
            return url
        problem = name_problem("sqs", name)
        if problem is not None:  # SQS would answer with an obscure error, or none
            return SendResult.rejected("invalid_name", problem)
        try:
            url = self._client.get_queue_url(QueueName=name)["QueueUrl"]
        except Exception as exc:
            return self._queue_error(exc, name, "resolving the URL of")
        with self._lock:
            self._urls[name] = url
        return url

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

    def _batch_call(self, chunk: list[Item[Entry]]) -> SendMessageBatchResultTypeDef:
        entries = cast("list[SendMessageBatchRequestEntryTypeDef]", self._entries(chunk))
        return self._client.send_message_batch(QueueUrl=chunk[0].target, Entries=entries)

    def _batch_failed(self, exc: BaseException, url: str) -> SendResult:
        return self._queue_error(exc, url.rsplit("/", 1)[-1], "sending to")

    # Receiving ----------------------------------------------------------------------------

    def receiver(self, subscription: Subscription) -> Receiver:
        """The consumer's queue and its types' destination queues (created if missing).

        A destination queue another consumer reads too gets one warning per process
        (:mod:`outboxer.transports.sqs.sharing`): they would split its messages.
        """
        receiver = self.receive_from(subscription.destinations, adapter_queues(subscription))
        consumer = subscription.queue
        others = [name for name in subscription.destinations if name != consumer]
        queues = [
            (name, self._urls[name]) for name in others if (consumer, name) not in self._warned
        ]
        for name, readers in shared_queues(self.queue_client, consumer, queues).items():
            self._warned.add((consumer, name))
            log.warning("%s", sharing_warning(consumer, name, readers))
        return receiver

    def receive_from(self, queues: Sequence[str], sources: Sequence[str] = ()) -> Receiver:
        """A receiver polling ``queues`` and the inbound adapters' queues ``sources`` (all
        created if missing); deliveries from ``sources`` carry their ``MessageId``."""
        if self._closed:
            raise TransportError("the SQS transport is closed")
        client = self.queue_client
        urls = [(name, self.ensure_queue(name)) for name in [*queues, *sources]]
        receiver = _SQSReceiver(client, urls, self.visibility_timeout, frozenset(sources))
        self._receivers.add(receiver)
        return receiver

    @property
    def queue_client(self) -> SQSClient:
        """The client queues are created and polled with (long polls: a long read timeout)."""
        return self._receive_client or self._client

    def ensure_queue(self, name: str) -> str:
        """The URL of queue ``name``, created (FIFO if its name says so) when missing."""
        client = self.queue_client
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
        if not self._stop_sending():
            return
        for receiver in list(self._receivers):
            receiver.close()
        if self._owns_clients:
            self._client.close()
            if self._receive_client is not None:
                self._receive_client.close()


def adapter_queues(subscription: Subscription) -> list[str]:
    """The queues of ``subscription``'s inbound adapters; ConfigurationError for one that SQS
    cannot serve (an exchange, or a queue that is also one of the consumer's destinations)."""
    names = subscription.destinations
    queues: list[str] = []
    for source in subscription.sources:
        if source.exchange is not None:
            raise ConfigurationError(
                f"inbound adapter on exchange {source.exchange!r}: SQS has no exchanges; "
                "on SQS an adapter reads a queue (queue=...)"
            )
        if source.queue in names:
            raise ConfigurationError(
                f"inbound adapter queue {source.queue!r} is also a destination of "
                f"consumer {subscription.queue!r}: give the adapter a queue of its own"
            )
        queues.append(source.queue)
    return queues
