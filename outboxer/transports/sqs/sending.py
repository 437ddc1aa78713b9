"""Sending: the FIFO group and deduplication ids.

How a batch is split into lanes and ``SendMessageBatch`` calls is
:mod:`outboxer.transports.lanes`, shared with the SNS transport.
"""

from __future__ import annotations

import hashlib
import re

from ...message import Envelope

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
