"""Consumers that share a plain SQS queue: found at start-up, and told what to do instead.

An SQS queue is point to point: two consumers (different names) that poll one queue
compete for its messages, so each processes only part of them, with no error anywhere.
That is right for several processes of one consumer, and wrong for two consumers that
each want every message (billing and audit of the same orders), which is what ``sns://``
is for.

SQS does not say who reads a queue, so each consumer says it: at start-up it tags every
destination queue it reads with ``outboxer-consumer:<its name>`` (the value: the date it
last started), then reads the queue's tags; another consumer's tag means the queue is
shared, and the consumer logs one warning naming the queue, the other consumers and the
fix. A consumer that was renamed or retired leaves its tag behind: the warning says which
tag to remove. Tagging needs ``sqs:TagQueue`` and ``sqs:ListQueueTags``; without them the
check is skipped (logged at debug level).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

__all__ = ["TAG_PREFIX", "shared_queues", "sharing_warning"]

log = logging.getLogger(__name__)

TAG_PREFIX = "outboxer-consumer:"
"""The queue tag a consumer reading the queue leaves: this prefix and its name."""


def shared_queues(
    client: SQSClient, consumer: str, queues: Sequence[tuple[str, str]]
) -> dict[str, list[str]]:
    """Tag ``queues`` (name, URL) as read by ``consumer``; the other consumers that tagged
    each of them, for those that have any."""
    today = datetime.now(timezone.utc).date().isoformat()
    own = TAG_PREFIX + consumer
    shared: dict[str, list[str]] = {}
    for name, url in queues:
        try:
            client.tag_queue(QueueUrl=url, Tags={own: today})
            tags = client.list_queue_tags(QueueUrl=url).get("Tags", {})
        except (ClientError, BotoCoreError) as exc:
            log.debug("cannot tell whether SQS queue %r is shared: %s", name, exc)
            continue
        others = sorted(
            tag.removeprefix(TAG_PREFIX)
            for tag in tags
            if tag.startswith(TAG_PREFIX) and tag != own
        )
        if others:
            shared[name] = others
    return shared


def sharing_warning(consumer: str, queue: str, others: Sequence[str]) -> str:
    """One sentence: what is shared, what it does, what to do instead."""
    names = ", ".join(repr(other) for other in others)
    which = f"consumer {names} also reads" if len(others) == 1 else f"consumers {names} also read"
    tags = ", ".join(repr(TAG_PREFIX + other) for other in others)
    return (
        f"consumer {consumer!r} reads SQS queue {queue!r}, which {which}, so each "
        "message goes to only one of them: to give every consumer every "
        "message, use an sns:// broker URL for the relay and the consumers (SNS topics, one "
        f"queue per consumer; see docs/operations.md), or remove the queue's tag {tags} "
        "of a consumer that no longer runs"
    )
