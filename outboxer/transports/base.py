"""The one small interface every broker implements.

Sending: :meth:`Transport.send` takes a batch of envelopes and returns one
:class:`SendResult` per envelope, in order: sent, retry later, rejected for good, or
broker unavailable. Receiving: :meth:`Transport.receiver` subscribes a consumer's queue
and hands out :class:`Delivery` objects that are acknowledged after the consumer's
transaction commits. Transports do broker I/O only: no SQL, no retry policy.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from ..instrumentation import TransportDescription
from ..message import Envelope
from .names import require_valid_name

# TransportDescription.system -> the broker whose naming rules apply (outboxer.transports.names).
_BROKERS = {"rabbitmq": "rabbitmq", "aws_sqs": "sqs", "aws_sns": "sns"}

__all__ = [
    "HELD_BACK",
    "Delivery",
    "Outcome",
    "Receiver",
    "SendResult",
    "Source",
    "Subscription",
    "Transport",
    "TransportDescription",
    "acknowledge",
    "held_back",
    "unavailable_after",
]


HELD_BACK = "held_back"
"""``SendResult.error_type`` of a message not sent because an earlier message of its key
failed: it is handed back without counting an attempt, and waits behind that message."""


class Outcome(enum.Enum):
    """What happened to one message of a batch."""

    SENT = "sent"
    """The broker confirmed it (RabbitMQ publisher confirm, SQS message id)."""
    RETRY = "retry"
    """A transient failure of this message (nack, throttling, timeout): retry with backoff."""
    REJECTED = "rejected"
    """It can never be sent as it is (unroutable, too large): dead-letter it."""
    UNAVAILABLE = "unavailable"
    """The broker could not be reached: try again later without counting an attempt."""


@dataclass(frozen=True)
class SendResult:
    """The outcome of sending one message, with the reason when it was not sent."""

    outcome: Outcome
    error_type: str | None = None
    """A short, low-cardinality name for the failure (``unroutable``, ``message_too_large``,
    an exception class name)."""
    error: str | None = None
    """A human-readable explanation."""
    broker_message_id: str | None = None

    @classmethod
    def sent(cls, broker_message_id: str | None = None) -> SendResult:
        return cls(Outcome.SENT, broker_message_id=broker_message_id)

    @classmethod
    def retry(cls, error_type: str, error: str) -> SendResult:
        return cls(Outcome.RETRY, error_type, error)

    @classmethod
    def rejected(cls, error_type: str, error: str) -> SendResult:
        return cls(Outcome.REJECTED, error_type, error)

    @classmethod
    def unavailable(cls, error_type: str, error: str) -> SendResult:
        return cls(Outcome.UNAVAILABLE, error_type, error)


@dataclass(frozen=True)
class Source:
    """A queue of messages outboxer did not publish, read by an inbound adapter.

    Without ``exchange``, ``queue`` is consumed as it is: another system owns it (on
    RabbitMQ it must exist; on SQS it is created when missing). With ``exchange`` (RabbitMQ
    only), the consumer declares ``queue`` itself and binds it to that exchange with
    ``routing_key``. Deliveries from a source name ``queue`` as their destination and carry
    the broker's own message id in :data:`outboxer.wire.BROKER_MESSAGE_ID`.
    """

    queue: str
    exchange: str | None = None
    routing_key: str = "#"


@dataclass(frozen=True)
class Subscription:
    """What a consumer wants delivered to its queue.

    ``queue`` is the consumer's name. ``bindings`` are (destination, message type) pairs:
    on RabbitMQ the queue is bound to exchange ``destination`` with routing key ``type``
    (``#`` for every type); on SQS the consumer polls queue ``destination``. The consumer
    always also receives what is sent to the destination named after itself (its retries
    and replays). ``sources`` are the queues of its inbound adapters, read beside its own.
    """

    queue: str
    bindings: Sequence[tuple[str, str]] = ()
    prefetch: int = 50
    sources: Sequence[Source] = ()

    @property
    def destinations(self) -> list[str]:
        """Every destination this subscription reads, its own queue's first."""
        names = [self.queue]
        for destination, _ in self.bindings:
            if destination not in names:
                names.append(destination)
        return names


class Delivery(abc.ABC):
    """One delivered message. ``ack``/``release``/``extend`` may be called from any thread."""

    body: bytes
    headers: Mapping[str, str]
    """The canonical header map (see :mod:`outboxer.wire`), whatever the broker."""
    destination: str
    """The exchange or queue it was delivered from."""
    redelivered: bool = False

    @abc.abstractmethod
    def ack(self) -> None:
        """Done with it: the broker may forget it."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give it back unprocessed, for prompt redelivery (used on shutdown)."""

    def extend(self, seconds: float) -> None:  # noqa: B027 - optional for brokers without it
        """Keep it invisible to other consumers ``seconds`` longer (slow handlers on SQS)."""

    @classmethod
    def extend_many(cls, deliveries: Sequence[Delivery], seconds: float) -> None:
        """:meth:`extend` ``deliveries`` (all of this class) together, where the broker can
        (SQS: ``ChangeMessageVisibilityBatch``); by default one :meth:`extend` each."""
        for delivery in deliveries:
            delivery.extend(seconds)

    @classmethod
    def ack_many(cls, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge ``deliveries`` (all of this class) together, where the broker can
        (SQS: ``DeleteMessageBatch``); by default one :meth:`ack` each."""
        for delivery in deliveries:
            delivery.ack()


def acknowledge(deliveries: Sequence[Delivery]) -> None:
    """Acknowledge ``deliveries`` with as few broker calls as their brokers allow."""
    kinds: dict[type[Delivery], list[Delivery]] = {}
    for delivery in deliveries:
        kinds.setdefault(type(delivery), []).append(delivery)
    for kind, group in kinds.items():
        kind.ack_many(group)


class Receiver(abc.ABC):
    """A consumer's open subscription."""

    visibility_timeout: float | None = None
    """Seconds a received message stays hidden before the broker delivers it again unless
    its visibility is extended (SQS: the shortest of the receiver's queues); None: the
    broker holds it until it is settled (RabbitMQ). A consumer extends what it holds
    before half of this has passed."""

    @abc.abstractmethod
    def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` seconds for at most ``max_messages`` deliveries."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop receiving; unacknowledged deliveries go back to the broker."""


class Transport(abc.ABC):
    """A broker connection: sends batches and opens receivers."""

    description: TransportDescription
    max_message_bytes: int | None = None
    """The broker's size limit for one message (body and metadata), if it has one."""

    @abc.abstractmethod
    def send(self, envelopes: Sequence[Envelope]) -> list[SendResult]:
        """Send ``envelopes``; one result per envelope, in order.

        Must not raise for a problem with one message (that is a result); raising
        :class:`~outboxer.errors.TransportError` means none was attempted and all are
        treated as UNAVAILABLE.
        """

    def send_async(
        self, envelopes: Sequence[Envelope], *, after: Future[list[SendResult]] | None = None
    ) -> Future[list[SendResult]]:
        """Start sending ``envelopes``; the future gives what :meth:`send` would return.

        ``after`` is the previous send of the caller, not necessarily finished: these
        messages must not reach the broker before that send's, and if that send fails
        for want of the broker (UNAVAILABLE), these must fail too rather than go out on
        a new connection (the relay's per-key order depends on it, see
        :mod:`outboxer.relay.pipeline`).

        A transport that can keep a batch on the wire while the broker confirms the
        previous one overrides this (RabbitMQ, on one ordered channel); the default sends
        at once, when ``after`` has finished, and returns a finished future.
        """
        future: Future[list[SendResult]] = Future()
        fenced = unavailable_after(after)
        if fenced is not None:
            future.set_result([fenced] * len(envelopes))
            return future
        try:
            future.set_result(self.send(envelopes))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def receiver(self, subscription: Subscription) -> Receiver:
        """Open ``subscription`` (declaring queues and bindings the broker needs)."""
        raise NotImplementedError(f"{type(self).__name__} cannot receive messages")

    def validate_name(self, name: str, what: str = "name") -> None:
        """Raise :class:`~outboxer.errors.InvalidName` if this broker would refuse ``name``
        as a destination or consumer name (``what`` says which, for the message)."""
        require_valid_name(_BROKERS.get(self.description.system, ""), name, what)

    def validate_subscription(self, subscription: Subscription, what: str) -> None:  # noqa: B027
        """Raise :class:`~outboxer.errors.InvalidName` if this broker cannot route
        ``subscription`` as outboxer would set it up (``what`` names the consumer)."""

    def check(self) -> None:  # noqa: B027 - an in-process broker is always there
        """Connect once and authenticate, or raise the error that stopped it.

        The command line calls it at start-up, so an unreachable broker or refused
        credentials are reported at once (see :mod:`outboxer.diagnosis`).
        """

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release connections and threads."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unavailable_after(after: Future[list[SendResult]] | None) -> SendResult | None:
    """The result for messages chained behind ``after`` when ``after`` lost the broker
    (None: they may go)."""
    if after is None or not after.done():
        return None
    try:
        results = after.result()
    except Exception as exc:
        return SendResult.unavailable(
            type(exc).__name__, f"not sent: the send before it failed ({exc})"
        )
    for result in results:
        if result.outcome is Outcome.UNAVAILABLE:
            return SendResult.unavailable(
                result.error_type or "unavailable",
                f"not sent: the send before it lost the broker ({result.error})",
            )
    return None


def held_back(key: str | None, cause: SendResult) -> SendResult:
    """The result for a message kept back behind ``cause``, an earlier failure of its key."""
    if cause.outcome is Outcome.UNAVAILABLE:
        return cause
    return SendResult.retry(
        HELD_BACK,
        f"not sent: an earlier message with key {key!r} was not sent ({cause.error_type}), "
        "and a later one must not overtake it",
    )
