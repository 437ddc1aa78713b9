"""The wire format: an :class:`Envelope` as a body plus a flat map of string headers.

Every transport maps this canonical header map onto its broker's metadata (AMQP
properties and headers, SQS message attributes) and back; docs/wire-format.md shows
each mapping. The body is the payload's JSON, untouched, so a consumer written in any
language reads the event directly and finds the envelope in the headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from uuid import UUID

from .errors import DecodeError
from .message import CONTENT_TYPE_JSON, Envelope

__all__ = [
    "ATTEMPT",
    "CAUSATION_ID",
    "CONTENT_TYPE",
    "CORRELATION_ID",
    "HANDLER",
    "KEY",
    "MESSAGE_ID",
    "OCCURRED_AT",
    "RESERVED",
    "TRACEPARENT",
    "TRACESTATE",
    "TYPE",
    "decode",
    "encode_headers",
    "user_headers",
]

MESSAGE_ID = "outboxer-id"
TYPE = "outboxer-type"
OCCURRED_AT = "outboxer-occurred-at"
CORRELATION_ID = "outboxer-correlation-id"
CAUSATION_ID = "outboxer-causation-id"
KEY = "outboxer-key"
HANDLER = "outboxer-handler"
ATTEMPT = "outboxer-attempt"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
CONTENT_TYPE = "content-type"

RESERVED = frozenset(
    {
        MESSAGE_ID,
        TYPE,
        OCCURRED_AT,
        CORRELATION_ID,
        CAUSATION_ID,
        KEY,
        HANDLER,
        ATTEMPT,
        TRACEPARENT,
        TRACESTATE,
        CONTENT_TYPE,
    }
)


def encode_headers(envelope: Envelope) -> dict[str, str]:
    """The canonical header map of ``envelope``: envelope fields, then user headers.

    Optional fields are left out when empty; ``outboxer-correlation-id`` is always set
    (a message that starts a conversation correlates to itself).
    """
    headers = {
        MESSAGE_ID: str(envelope.message_id),
        TYPE: envelope.type,
        OCCURRED_AT: envelope.occurred_at.isoformat(),
        CORRELATION_ID: envelope.correlation,
        CONTENT_TYPE: envelope.content_type,
    }
    if envelope.causation_id:
        headers[CAUSATION_ID] = envelope.causation_id
    if envelope.key is not None:
        headers[KEY] = envelope.key
    if envelope.handler:
        headers[HANDLER] = envelope.handler
        headers[ATTEMPT] = str(envelope.attempt)
    if envelope.traceparent:
        headers[TRACEPARENT] = envelope.traceparent
        if envelope.tracestate:
            headers[TRACESTATE] = envelope.tracestate
    headers.update(envelope.headers)
    return headers


def user_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The application's own headers in a canonical map (everything not reserved)."""
    return {k: v for k, v in headers.items() if k not in RESERVED}


def decode(body: bytes, headers: Mapping[str, str], destination: str) -> Envelope:
    """Rebuild the envelope of a delivered message; :class:`DecodeError` says what is missing.

    The payload itself is not parsed here: the consumer decodes it for the type it handles.
    """
    missing = [name for name in (MESSAGE_ID, TYPE) if not headers.get(name)]
    if missing:
        raise DecodeError(
            f"message is missing envelope header{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}: it was not published by outboxer, or its headers were "
            "stripped on the way"
        )
    try:
        message_id = UUID(headers[MESSAGE_ID])
    except ValueError as exc:
        raise DecodeError(f"{MESSAGE_ID} is not a UUID: {headers[MESSAGE_ID]!r}") from exc
    occurred_raw = headers.get(OCCURRED_AT)
    try:
        occurred_at = datetime.fromisoformat(occurred_raw) if occurred_raw else None
    except ValueError as exc:
        raise DecodeError(f"{OCCURRED_AT} is not an ISO 8601 time: {occurred_raw!r}") from exc
    if occurred_at is None:
        raise DecodeError(f"message {message_id} is missing envelope header {OCCURRED_AT}")
    attempt_raw = headers.get(ATTEMPT, "1")
    try:
        attempt = int(attempt_raw)
    except ValueError as exc:
        raise DecodeError(f"{ATTEMPT} is not a whole number: {attempt_raw!r}") from exc
    correlation = headers.get(CORRELATION_ID)
    return Envelope(
        message_id=message_id,
        type=headers[TYPE],
        destination=destination,
        payload=body,
        occurred_at=occurred_at,
        key=headers.get(KEY),
        correlation_id=None if correlation in (None, "", str(message_id)) else correlation,
        causation_id=headers.get(CAUSATION_ID) or None,
        headers=user_headers(headers),
        traceparent=headers.get(TRACEPARENT) or None,
        tracestate=headers.get(TRACESTATE) or None,
        content_type=headers.get(CONTENT_TYPE) or CONTENT_TYPE_JSON,
        handler=headers.get(HANDLER) or None,
        attempt=attempt,
    )
