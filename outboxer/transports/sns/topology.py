"""A consumer's SNS topology: its queues, the topics they subscribe to, and the queue policy.

RabbitMQ's bindings, done the AWS way (see the package docstring). Every step is
idempotent, so ``outboxer-inbox`` does them all at each start and a restarted consumer
changes only what its handlers changed:

* the queues are created if missing (:meth:`SQSTransport.ensure_queue`);
* the topics are created if missing (``CreateTopic`` returns the ARN of an existing one);
* each queue's policy gets one statement, ``outboxer-sns``, that lets SNS send to the
  queue from those topics (topics allowed before stay allowed: a subscription the
  consumer no longer needs still delivers, and the consumer dead-letters what it cannot
  handle rather than SNS dropping it); other statements are kept;
* each queue is subscribed to its topics with ``RawMessageDelivery`` and a filter policy
  on ``outboxer-type`` (none for the consumer's own topic, or for a ``#`` binding); an
  existing subscription has its attributes brought up to date.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from ... import wire
from ...errors import TransportError
from ..base import Subscription

if TYPE_CHECKING:
    from ..sqs import SQSTransport

__all__ = [
    "POLICY_SID",
    "Route",
    "allow_topics",
    "plan_routes",
    "subscribe_queues",
    "subscribed_types",
    "topic_arn",
]

log = logging.getLogger(__name__)

POLICY_SID = "outboxer-sns"
"""The queue policy statement outboxer owns."""

NO_FILTER = "{}"
"""The filter policy that lets every message through (SNS has no "remove" call)."""


@dataclass(frozen=True)
class Route:
    """Topic ``topic`` delivers to queue ``queue`` the types ``types`` (None: every type)."""

    topic: str
    queue: str
    types: frozenset[str] | None


MAX_FILTER_VALUES = 150
"""SNS takes at most 150 values (combinations) in a subscription's filter policy."""


def too_many_types(subscription: Subscription) -> tuple[str, int] | None:
    """A topic from which the consumer takes more message types than one filter policy can
    name, and how many; None when every route fits."""
    for route in plan_routes(subscription):
        if route.types is not None and len(route.types) > MAX_FILTER_VALUES:
            return route.topic, len(route.types)
    return None


def plan_routes(subscription: Subscription) -> list[Route]:
    """The routes a consumer needs, its own topic's first.

    The consumer's queue is named after it; FIFO topics (names ending in ``.fifo``) deliver
    to its FIFO queue, ``<name>.fifo``, as SNS requires.
    """
    base = subscription.queue.removesuffix(".fifo")
    topics: dict[str, set[str] | None] = {subscription.queue: None}
    for destination, type_name in subscription.bindings:
        types = topics.setdefault(destination, set())
        if types is None:
            continue
        if type_name == "#":
            topics[destination] = None
        else:
            types.add(type_name)
    return [
        Route(
            topic,
            base + ".fifo" if topic.endswith(".fifo") else base,
            None if types is None else frozenset(types),
        )
        for topic, types in topics.items()
    ]


def subscribe_queues(sns: Any, queues: SQSTransport, subscription: Subscription) -> list[str]:
    """Create and subscribe the consumer's queues (see the module docstring); returns the
    names of the queues to read. Failures raise :class:`~outboxer.errors.TransportError`."""
    by_queue: dict[str, list[Route]] = {}
    for route in plan_routes(subscription):
        by_queue.setdefault(route.queue, []).append(route)
    for queue, routes in by_queue.items():
        url = queues.ensure_queue(queue)
        doing = f"subscribing SQS queue {queue!r} to SNS topics"
        try:
            sqs = queues.queue_client
            attributes = sqs.get_queue_attributes(
                QueueUrl=url, AttributeNames=["QueueArn", "Policy"]
            )["Attributes"]
            queue_arn = attributes["QueueArn"]
            arns = {route.topic: topic_arn(sns, route.topic) for route in routes}
            policy = allow_topics(attributes.get("Policy"), queue_arn, arns.values())
            if policy is not None:
                sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": policy})
            for route in routes:
                doing = f"subscribing SQS queue {queue!r} to SNS topic {route.topic!r}"
                _subscribe(sns, arns[route.topic], queue_arn, route)
        except (ClientError, BotoCoreError) as exc:
            raise TransportError(f"{doing}: {exc}") from exc
    return list(by_queue)


def topic_arn(sns: Any, name: str) -> str:
    """The ARN of topic ``name``, created if missing (a FIFO topic if its name says so):
    ``CreateTopic`` is idempotent, and the way to learn a topic's ARN from its name."""
    attributes = {"FifoTopic": "true"} if name.endswith(".fifo") else {}
    return str(sns.create_topic(Name=name, Attributes=attributes)["TopicArn"])


def allow_topics(current: str | None, queue_arn: str, topic_arns: Iterable[str]) -> str | None:
    """The queue policy ``current`` with outboxer's statement allowing ``topic_arns`` (and
    those it allowed already) to send to the queue; None when nothing changes."""
    policy: dict[str, Any] = json.loads(current) if current else {}
    found = policy.get("Statement", [])
    # IAM's grammar takes one statement object as well as a list of them.
    statements: list[dict[str, Any]] = [found] if isinstance(found, dict) else list(found)
    ours = next((s for s in statements if s.get("Sid") == POLICY_SID), None)
    before: set[str] = set()
    if ours is not None:
        allowed = ours.get("Condition", {}).get("ArnEquals", {}).get("aws:SourceArn", [])
        before = {allowed} if isinstance(allowed, str) else set(allowed)
    wanted = before | set(topic_arns)
    if ours is not None and wanted == before:
        return None
    statement = {
        "Sid": POLICY_SID,
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": {"ArnEquals": {"aws:SourceArn": sorted(wanted)}},
    }
    statements = [s for s in statements if s.get("Sid") != POLICY_SID] + [statement]
    policy.setdefault("Version", "2012-10-17")
    policy["Statement"] = statements
    return json.dumps(policy, separators=(",", ":"))


def _filter_policy(types: frozenset[str] | None) -> str:
    if types is None:
        return NO_FILTER
    return json.dumps({wire.TYPE: sorted(types)}, separators=(",", ":"))


def _subscribe(sns: Any, topic_arn: str, queue_arn: str, route: Route) -> None:
    wanted = {"RawMessageDelivery": "true", "FilterPolicy": _filter_policy(route.types)}
    existing = _find_subscription(sns, topic_arn, queue_arn)
    if existing is None:
        attributes = dict(wanted)
        if route.types is None:
            del attributes["FilterPolicy"]
        sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=queue_arn,
            Attributes=attributes,
            ReturnSubscriptionArn=True,
        )
        log.info("subscribed SQS queue %r to SNS topic %r", route.queue, route.topic)
        return
    current = sns.get_subscription_attributes(SubscriptionArn=existing)["Attributes"]
    for name, value in wanted.items():
        if not _same(name, current.get(name), value):
            sns.set_subscription_attributes(
                SubscriptionArn=existing, AttributeName=name, AttributeValue=value
            )
            log.info(
                "updated %s of the subscription of SQS queue %r to SNS topic %r",
                name,
                route.queue,
                route.topic,
            )


def _same(name: str, current: str | None, wanted: str) -> bool:
    if name != "FilterPolicy":
        return str(current).lower() == wanted
    try:
        return bool(json.loads(current or NO_FILTER) == json.loads(wanted))
    except ValueError:
        return False


def subscribed_types(sns: Any, topic_arn: str) -> frozenset[str] | None:
    """The message types the subscriptions to ``topic_arn`` take: None when one takes
    every type (no filter on ``outboxer-type``, or a filter outboxer cannot read), empty
    when there is no subscription (SNS would drop what is published)."""
    types: set[str] = set()
    for subscription in _subscriptions(sns, topic_arn):
        arn = subscription.get("SubscriptionArn", "")
        if subscription.get("Protocol") != "sqs" or not arn.startswith("arn:"):
            return None  # pending confirmation, or not a queue: assume it takes everything
        try:
            attributes = sns.get_subscription_attributes(SubscriptionArn=arn)["Attributes"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NotFound":
                continue  # deleted since it was listed: it takes nothing now
            raise
        try:
            policy = json.loads(attributes.get("FilterPolicy") or NO_FILTER)
        except ValueError:
            return None
        taken = policy.get(wire.TYPE) if isinstance(policy, dict) else None
        if set(policy) != {wire.TYPE} or not isinstance(taken, list):
            return None
        if not all(isinstance(t, str) for t in taken):
            return None  # a prefix, anything-but...: types outboxer cannot list
        types.update(taken)
    return frozenset(types)


def _find_subscription(sns: Any, topic_arn: str, queue_arn: str) -> str | None:
    """The ARN of the subscription of ``queue_arn`` to ``topic_arn``, if there is one."""
    for found in _subscriptions(sns, topic_arn):
        if found.get("Protocol") == "sqs" and found.get("Endpoint") == queue_arn:
            return str(found["SubscriptionArn"])
    return None


def _subscriptions(sns: Any, topic_arn: str) -> Iterator[dict[str, Any]]:
    """Every subscription to ``topic_arn`` (ListSubscriptionsByTopic, page by page)."""
    request: dict[str, Any] = {"TopicArn": topic_arn}
    while True:
        page = sns.list_subscriptions_by_topic(**request)
        yield from page.get("Subscriptions", ())
        token = page.get("NextToken")
        if not token:
            return
        request["NextToken"] = token
