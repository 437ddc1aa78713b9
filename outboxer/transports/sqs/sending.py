"""Sending: FIFO ids, and how a batch is split into lanes and ``SendMessageBatch`` calls.

See the package docstring: all messages with one key (per queue) share a lane, in batch
order, and a keyed message that was not sent holds back the later ones with its key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...message import Envelope
from .options import MAX_BATCH_ENTRIES

if TYPE_CHECKING:
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef

_GROUP_ID = re.compile(r"[!-~]{1,128}")
"""What SQS accepts as a MessageGroupId: 1-128 printable ASCII characters, no spaces."""


def group_id(envelope: Envelope) -> str:
    """The FIFO ``MessageGroupId``: the key (hashed if SQS would refuse it), else the id."""
    key = envelope.key
    if key is None:
        return str(envelope.message_id)
    if _GROUP_ID.fullmatch(key):
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def deduplication_id(envelope: Envelope) -> str:
    """The FIFO ``MessageDeduplicationId``: one per send that must reach a consumer.

    SQS drops a message whose deduplication id it saw in the last 5 minutes. Every outbox
    row is one such send (the first publish, each retry of a handler, each replay), so the
    id is the message id and the outbox row's id: a relay sending the same row again
    (after a lost confirmation) is deduplicated, a retry or a replay never is. Without a
    row (a transport used directly) it is the message id with the handler and attempt.
    """
    if envelope.outbox_id is not None:
        return f"{envelope.message_id}:{envelope.outbox_id}"
    if not envelope.handler:
        return str(envelope.message_id)
    seed = f"{envelope.message_id}:{envelope.handler}:{envelope.attempt}"
    return hashlib.sha256(seed.encode()).hexdigest()


@dataclass
class _Item:
    """One message on its way: its place in the batch and its prepared entry."""

    index: int
    url: str
    group: object
    """Messages of one group stay in one lane (same queue and key); unkeyed: the index."""
    key: str | None
    size: int
    entry: SendMessageBatchRequestEntryTypeDef


def _plan_lanes(items: list[_Item], lanes: int) -> list[list[_Item]]:
    """Spread ``items`` over at most ``lanes`` lanes, each group whole, filling calls of ten.

    Groups go largest first to the lane where they add the fewest calls (then the least
    loaded one), so single messages top up partly filled calls before opening new ones.
    """
    if lanes <= 1:
        return [items]
    groups: dict[object, list[_Item]] = {}
    for item in items:
        group = groups.get(item.group)
        if group is None:
            groups[item.group] = [item]
        else:
            group.append(item)
    plan: list[list[_Item]] = [[] for _ in range(lanes)]
    counts = [0] * lanes
    if len(groups) == len(items):
        # No two messages share a key: deal out whole calls of ten, round robin.
        for n, start in enumerate(range(0, len(items), MAX_BATCH_ENTRIES)):
            plan[n % lanes].extend(items[start : start + MAX_BATCH_ENTRIES])
        return [lane for lane in plan if lane]
    for group in sorted(groups.values(), key=len, reverse=True):
        size = len(group)
        best, best_score = 0, (1 << 30, 1 << 30)
        for lane, count in enumerate(counts):
            score = (-(-(count + size) // 10) - -(-count // 10), count)
            if score < best_score:
                best, best_score = lane, score
        plan[best].extend(group)
        counts[best] += size
    for lane_items in plan:
        lane_items.sort(key=_by_index)
    return [lane for lane in plan if lane]


def _by_index(item: _Item) -> int:
    return item.index


def _chunks(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    """Consecutive calls for a lane: one queue each, at most ten entries and ``max_bytes``."""
    by_url: dict[str, list[_Item]] = {}
    for item in items:
        by_url.setdefault(item.url, []).append(item)
    chunks: list[list[_Item]] = []
    for queue_items in by_url.values():
        chunk: list[_Item] = []
        size = 0
        for item in queue_items:
            if chunk and (len(chunk) == MAX_BATCH_ENTRIES or size + item.size > max_bytes):
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += item.size
        if chunk:
            chunks.append(chunk)
    return chunks
