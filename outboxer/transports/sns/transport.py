"""The transport: publishing to SNS topics, and receiving through subscribed SQS queues."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ...errors import InvalidName, TransportError
from ...message import Envelope
from ..aws import ClientOptions, describe, parse_url, whole_number
from ..base import Receiver, SendResult, Subscription
from ..lanes import UNROUTABLE, Item
from ..names import name_problem
from ..sqs import SQSTransport
from ..sqs.batch import BatchTransport, Entry
from ..sqs.errors import error_code, result_for_error
from ..sqs.options import DEFAULT_MAX_MESSAGE_BYTES, URL_OPTIONS
from ..sqs.transport import adapter_queues
from .topology import (
    MAX_FILTER_VALUES,
    subscribe_queues,
    subscribed_types,
    too_many_types,
    topic_arn,
)

__all__ = ["SUBSCRIPTIONS_TTL", "SNSTransport"]

SUBSCRIPTIONS_TTL = 60.0
"""Seconds a topic's subscriptions (the types they take) are trusted before they are read
again: SNS drops a message no subscription takes, and a consumer may have been retired
or have stopped handling a type since."""


class SNSTransport(BatchTransport):
    """Publishes to SNS topics; receives from the consumer's SQS queue subscribed to them
    (see the package docstring).

    ``client`` is a ready boto3 SNS client, ``queues`` a ready :class:`SQSTransport` for
    the consumer's queues; without them, both are built from the same options as
    :class:`SQSTransport`'s (``region``, ``endpoint_url``, credentials or ``profile``,
    timeouts), and ``concurrency`` calls are in flight at once. ``max_message_bytes`` is
    the size limit of one message, body plus attributes (SNS's is 256 KiB).
    """

    service = "SNS"
    body_field = "Message"

    def __init__(
        self,
        client: Any = None,
        *,
        queues: SQSTransport | None = None,
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
        options = ClientOptions(
            region=region,
            endpoint_url=endpoint_url,
            concurrency=concurrency,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            profile=profile,
        )
        # The queue side checks the shared options (concurrency, sizes, timeouts) first.
        self._owns_queues = queues is None
        self.queues = queues or SQSTransport(
            max_message_bytes=max_message_bytes,
            visibility_timeout=visibility_timeout,
            **options.keywords(),
        )
        self._start(
            whole_number("SNS", "concurrency", concurrency, 1, 256),
            whole_number("SNS", "max_message_bytes", max_message_bytes, 1024, 1024 * 1024),
        )
        self._owns_client = client is None
        if client is None:
            region, (client,) = options.clients("SNS")
        else:
            region = region or client.meta.region_name
            endpoint_url = endpoint_url or client.meta.endpoint_url
        self._client = client
        self.region: str = str(region)
        self.endpoint_url = endpoint_url
        self.description = describe("aws_sns", "sns", self.region, endpoint_url)
        self._arns: dict[str, str] = {}
        self._read_at: dict[str, float] = {}
        """When each topic's subscriptions were last read (time.monotonic())."""
        self._types: dict[str, frozenset[str] | None] = {}
        """The types each resolved topic's subscriptions take (None: every type)."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SNSTransport:
        """``sns://?region=eu-west-1&endpoint_url=http://127.0.0.1:4566``: the options of
        an ``sqs://`` URL (:meth:`SQSTransport.from_url`), for topics and queues alike."""
        kwargs = parse_url(url, "sns", URL_OPTIONS)
        kwargs.update(options)
        return cls(**kwargs)

    @property
    def client(self) -> Any:
        """The boto3 SNS client messages are published with."""
        return self._client

    # Sending ------------------------------------------------------------------------------

    def _resolve(self, name: str) -> str | SendResult:
        """The ARN of topic ``name`` once it has a subscriber, or the result of every
        message for it. The types its subscriptions take are read at the same time."""
        arn = self._arns.get(name)
        if arn is not None and time.monotonic() - self._read_at[name] < SUBSCRIPTIONS_TTL:
            return arn
        problem = name_problem("sns", name)
        if problem is not None:
            return SendResult.rejected("invalid_name", problem)
        try:
            arn = topic_arn(self._client, name)
            types = subscribed_types(self._client, arn)
        except Exception as exc:
            return self._topic_error(exc, name, "resolving")
        if types is not None and not types:
            return SendResult.rejected(
                UNROUTABLE,
                f"SNS topic {name!r} has no subscription, so SNS would drop the message: "
                "start the consumers that handle its types (outboxer-inbox --broker sns://...)",
            )
        with self._lock:
            self._arns[name] = arn
            self._read_at[name] = time.monotonic()
            self._types[arn] = types
        return arn

    def _prepare(self, index: int, envelope: Envelope, arn: str) -> Item[Entry] | SendResult:
        types = self._types.get(arn)
        if types is not None and envelope.type not in types:
            # Read the subscriptions again next time: the consumer may be starting.
            with self._lock:
                self._arns.pop(envelope.destination, None)
            return SendResult.rejected(
                UNROUTABLE,
                f"no subscription to SNS topic {envelope.destination!r} takes type "
                f"{envelope.type!r}, so SNS would drop the message: start the consumers "
                "that handle it (outboxer-inbox --broker sns://...)",
            )
        return super()._prepare(index, envelope, arn)

    def _topic_error(self, exc: BaseException, name: str, doing: str) -> SendResult:
        if isinstance(exc, ClientError) and error_code(exc) == "NotFound":
            with self._lock:
                self._arns.pop(name, None)
            return SendResult.rejected(
                UNROUTABLE,
                f"SNS topic {name!r} does not exist (start the consumers that handle its "
                f"types, or check the destination name and region {self.region})",
            )
        return result_for_error(exc, f"{doing} SNS topic {name!r}")

    def _batch_call(self, chunk: list[Item[Entry]]) -> Mapping[str, Any]:
        response: Mapping[str, Any] = self._client.publish_batch(
            TopicArn=chunk[0].target, PublishBatchRequestEntries=self._entries(chunk)
        )
        return response

    def _batch_failed(self, exc: BaseException, arn: str) -> SendResult:
        return self._topic_error(exc, arn.rsplit(":", 1)[-1], "publishing to")

    # Receiving ----------------------------------------------------------------------------

    def receiver(self, subscription: Subscription) -> Receiver:
        """The consumer's queue(s), created and subscribed to the topics of its types and
        to its own (see the package docstring); idempotent, so every start does it."""
        if self._closed:
            raise TransportError("the SNS transport is closed")
        queues = subscribe_queues(self._client, self.queues, subscription)
        return self.queues.receive_from(queues, adapter_queues(subscription))

    def validate_subscription(self, subscription: Subscription, what: str) -> None:
        """A consumer's queue subscribes to each topic with a filter policy naming the types
        it handles from there; SNS refuses more than 150 at start-up ("filter policy is
        too complex"), so it is refused here, before anything is created."""
        found = too_many_types(subscription)
        if found is not None:
            topic, count = found
            raise InvalidName(
                f"{what}: it handles {count} message types from SNS topic {topic!r}, and an "
                f"SNS subscription's filter policy takes at most {MAX_FILTER_VALUES}: split "
                "those handlers across two consumers (each has its own queue)"
            )

    def check(self) -> None:
        """One authenticated call to each service (ListTopics, ListQueues).

        Refused permissions pass: the credentials were recognised.
        """
        try:
            self._client.list_topics()
        except ClientError as exc:
            if error_code(exc) not in ("AuthorizationError", "AccessDenied"):
                raise TransportError(f"SNS refused the check: {error_code(exc)}") from exc
        except BotoCoreError as exc:
            raise TransportError(f"cannot reach SNS: {type(exc).__name__}") from exc
        self.queues.check()

    def close(self) -> None:
        if not self._stop_sending():
            return
        if self._owns_queues:
            self.queues.close()
        if self._owns_client:
            self._client.close()
