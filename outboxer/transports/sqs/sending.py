"""Sending: one message as the AWS services take it (body, attributes, FIFO ids).

SQS's ``SendMessageBatch`` and SNS's ``PublishBatch`` take the same text body, message
attributes and FIFO ids (:func:`encode_message`, :func:`group_id`,
:func:`deduplication_id`). How a batch is split into lanes and calls is
:mod:`outboxer.transports.lanes`, shared with the SNS transport too.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import wire
from ...message import Envelope
from ..base import SendResult
from .attributes import SQS_REFUSES, encode_attributes

if TYPE_CHECKING:
    from mypy_boto3_sqs.type_defs import MessageAttributeValueTypeDef

__all__ = ["Encoded", "deduplication_id", "encode_message", "group_id"]


@dataclass(frozen=True)
class Encoded:
    """A message ready for a batch entry: its text, attributes, and size as AWS counts it."""

    body: str
    attributes: dict[str, MessageAttributeValueTypeDef]
    size: int


def encode_message(envelope: Envelope, limit: int, service: str) -> Encoded | SendResult:
    """``envelope`` as ``service`` (``SQS``, ``SNS``) takes it, or why it cannot: a body
    that is not UTF-8 text, is empty or holds a character SQS refuses (a control
    character other than tab, newline and carriage return, U+FFFE, U+FFFF), a header
    that is not UTF-8 text (a lone surrogate), or body and attributes over ``limit``
    bytes."""
    try:
        body = envelope.payload.decode()
    except UnicodeDecodeError as exc:
        return SendResult.rejected(
            "invalid_body",
            f"{service} message bodies are text, and this payload is not UTF-8: {exc}",
        )
    if not body:
        return SendResult.rejected(
            "invalid_body", f"{service} does not accept an empty message body"
        )
    refused = None if body.isascii() and body.isprintable() else SQS_REFUSES.search(body)
    if refused is not None:
        return SendResult.rejected(
            "invalid_body",
            f"{service} refuses the character U+{ord(refused.group()):04X} at position "
            f"{refused.start()} of this message body (it takes tab, newline, carriage return "
            "and text from U+0020 on, without U+FFFE and U+FFFF): leave it out of the "
            "payload, or escape it (JSON: \\u escapes)",
        )
    headers = wire.encode_headers(envelope)
    try:
        attributes, size = encode_attributes(headers)
    except UnicodeEncodeError as exc:  # raising would fail the whole batch as an outage
        problem = wire.unencodable(headers) or f"a field is not UTF-8 text ({exc})"
        return SendResult.rejected(
            "invalid_message", f"{service} cannot carry this message: {problem}"
        )
    size += len(envelope.payload)
    if size > limit:
        return SendResult.rejected(
            "message_too_large",
            f"the message is {size} bytes (body plus attributes); {service}'s limit is "
            f"{limit} bytes: send a reference to the data instead",
        )
    return Encoded(body, attributes, size)


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
