"""The wire mapping: outboxer's canonical header map to SQS message attributes, and back.

See the package docstring for which header gets an attribute of its own and which travel
packed in ``outboxer-headers``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ... import wire

if TYPE_CHECKING:
    from mypy_boto3_sqs.type_defs import MessageAttributeValueTypeDef

PACKED_HEADERS = "outboxer-headers"
"""The message attribute carrying the headers that have no attribute of their own (JSON)."""

OWN_ATTRIBUTES = frozenset(
    {
        wire.MESSAGE_ID,
        wire.TYPE,
        wire.OCCURRED_AT,
        wire.CORRELATION_ID,
        wire.CAUSATION_ID,
        wire.KEY,
        wire.TRACEPARENT,
        wire.TRACESTATE,
        wire.CONTENT_TYPE,
    }
)

_OWN_OVERHEAD = {name: len(name) + len("String") for name in OWN_ATTRIBUTES}

SQS_REFUSES = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""A character SQS refuses in a message body or a String attribute value: it takes tab,
newline, carriage return and the rest of Unicode from U+0020 on, except the surrogates
and the noncharacters U+FFFE and U+FFFF (SNS passes both on to its SQS subscribers)."""

_NONCHARACTER = re.compile("[\ufffe\uffff]")
"""What SQS refuses and ``json.dumps`` leaves raw (it escapes the controls below U+0020)."""


def _carried(value: str) -> bool:
    """Whether SQS takes ``value`` as an attribute value as it is."""
    if value.isascii() and value.isprintable():
        return True
    return SQS_REFUSES.search(value) is None


def encode_attributes(
    headers: Mapping[str, str],
) -> tuple[dict[str, MessageAttributeValueTypeDef], int]:
    """SQS message attributes for a canonical header map, and their size as SQS counts it.

    SQS counts each attribute's name, data type and value (UTF-8 bytes). A value SQS
    refuses as it is (a control character in an older row's key, a noncharacter such as
    U+FFFF, which ``publish()`` accepts) travels in the packed JSON object, escaped: every
    reader takes a field from there when it has no attribute of its own.
    """
    attributes: dict[str, MessageAttributeValueTypeDef] = {}
    packed: dict[str, str] | None = None
    size = 0
    for name, value in headers.items():
        overhead = _OWN_OVERHEAD.get(name)
        # SQS refuses empty attribute values, and some characters: those travel in the
        # packed object.
        if overhead is not None and value and _carried(value):
            attributes[name] = {"DataType": "String", "StringValue": value}
            size += overhead + (len(value) if value.isascii() else len(value.encode()))
        elif packed is None:
            packed = {name: value}
        else:
            packed[name] = value
    if packed is not None:
        text = json.dumps(packed, ensure_ascii=False, separators=(",", ":"))
        if not text.isascii():
            # Only inside JSON strings, where an escape reads back as the character.
            text = _NONCHARACTER.sub(lambda found: f"\\u{ord(found.group()):04x}", text)
        attributes[PACKED_HEADERS] = {"DataType": "String", "StringValue": text}
        size += len(PACKED_HEADERS) + 6 + len(text.encode())
    return attributes, size


def decode_attributes(attributes: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The canonical header map of a received message's attributes; never raises."""
    headers: dict[str, str] = {}
    packed: str | None = None
    for name, value in attributes.items():
        text = value.get("StringValue")
        if not isinstance(text, str):
            continue  # a Binary attribute some other sender set: not a header
        if name == PACKED_HEADERS:
            packed = text
        else:
            headers[name] = text
    if packed is not None:
        try:
            extra = json.loads(packed)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
            extra = None
        if isinstance(extra, dict) and all(isinstance(v, str) for v in extra.values()):
            # A field's own attribute wins over the same name packed here, as
            # docs/wire-format.md tells every reader (outboxer packs only what has none).
            for name, value in extra.items():
                headers.setdefault(name, value)
        else:
            # Kept as it came: the consumer dead-letters it with this reason.
            headers[wire.UNDECODABLE] = (
                f"the {PACKED_HEADERS} attribute is not a JSON object of strings"
            )
            headers[PACKED_HEADERS] = packed[:1024]
    return headers


_NOTIFICATION_FIELDS = ("Type", "TopicArn", "Message")


def sns_notification(body: str) -> str | None:
    """The topic ARN if ``body`` is an SNS notification (what a queue subscribed without
    raw message delivery gets instead of the message), else None; never raises."""
    if not body.startswith("{") or '"Notification"' not in body:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict) or parsed.get("Type") != "Notification":
        return None
    if not all(isinstance(parsed.get(name), str) for name in _NOTIFICATION_FIELDS):
        return None
    return str(parsed["TopicArn"])
