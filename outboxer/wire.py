"""The wire format: an :class:`Envelope` as a body plus a flat map of string headers.

Every transport maps this canonical header map onto its broker's metadata (AMQP
properties and headers, SQS message attributes) and back; docs/wire-format.md shows
each mapping. The body is the payload's JSON, untouched, so a consumer written in any
language reads the event directly and finds the envelope in the headers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from uuid import UUID

from .errors import DecodeError
from .message import CONTENT_TYPE_JSON, Envelope
from .times import STORED_TIMES, in_utc

__all__ = [
    "ATTEMPT",
    "BROKER_MESSAGE_ID",
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
    "UNDECODABLE",
    "control_at",
    "decode",
    "encode_headers",
    "surrogate_at",
    "traceparent_fields",
    "unencodable",
    "user_headers",
    "valid_traceparent",
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
    message_id = str(envelope.message_id)
    headers = {
        MESSAGE_ID: message_id,
        TYPE: envelope.type,
        OCCURRED_AT: envelope.occurred_at.isoformat(),
        # envelope.correlation, without turning the id into text a second time
        CORRELATION_ID: envelope.correlation_id or message_id,
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


def unencodable(headers: Mapping[str, str]) -> str | None:
    """Which header name or value of ``headers`` is not UTF-8 text, and where (None when
    all are): a str holding a lone surrogate (``"caf\\udce9"``, what
    ``errors="surrogateescape"`` makes of undecodable bytes), which no broker carries.

    ``publish()`` refuses such text; a row written by an older version or by hand may
    still hold one, in its JSON-escaped headers. Only the slow path of a failed encode
    calls this, to say which header it was.
    """
    for name, value in headers.items():
        for what, text in (("name", name), ("value", value)):
            where = surrogate_at(text)
            if where is not None:
                subject = f"header name {name!r}" if what == "name" else f"header {name!r}'s value"
                return (
                    f"{subject} is not UTF-8 text: it holds a lone surrogate "
                    f"({text[where]!r} at position {where}), which UTF-8 cannot encode"
                )
    return None


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
"""Unicode's control characters (category Cc: C0, DEL and C1). Other text that
``str.isprintable()`` refuses is no control: a no-break space, a soft hyphen, the
zero-width joiner inside an emoji, a right-to-left mark."""


def control_at(text: str) -> int | None:
    """The position of the first control character of ``text`` (tab, newline, escape,
    NUL...), or None. Envelope text (type, key, correlation id) holds none: ``publish()``
    refuses it and a consumer dead-letters it."""
    if text.isprintable():  # printable text holds no control (one C loop, as a rule)
        return None
    found = _CONTROL.search(text)
    return None if found is None else found.start()


def surrogate_at(text: str) -> int | None:
    """The position of the first character of ``text`` that UTF-8 cannot encode (a lone
    surrogate), or None."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def user_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The application's own headers in a canonical map (everything not reserved)."""
    return {k: v for k, v in headers.items() if k not in RESERVED}


BROKER_MESSAGE_ID = "x-outboxer-broker-message-id"
"""Set by a receiver on a delivery from an inbound adapter's queue: the broker's own id of
the message (AMQP ``message_id``, SQS ``MessageId``); a sender cannot set it."""

UNDECODABLE = "x-outboxer-undecodable"
"""Set by a receiver on a delivery whose metadata the broker client could not decode (the
value says why); the consumer dead-letters such a delivery with that reason."""

# Bounds of the envelope fields, from the columns they are stored in (outbox, dead letter).
_LIMITS = {
    TYPE: 255,
    CORRELATION_ID: 255,
    CAUSATION_ID: 255,
    KEY: 255,
    HANDLER: 255,
    CONTENT_TYPE: 100,
}
_TRACESTATE_MAX = 512


def decode(body: bytes, headers: Mapping[str, str], destination: str) -> Envelope:
    """Rebuild the envelope of a delivered message; :class:`DecodeError` says what is wrong.

    The envelope fields are checked against what outboxer can store: text of bounded
    length without control characters, an aware occurred-at time that every database and
    time zone can hold (:mod:`outboxer.times`), given in UTC. Trace context that is
    not valid W3C is dropped (the message starts a new trace), as the W3C rules ask. The
    payload itself is not parsed here: the consumer decodes it for the type it handles.
    """
    undecodable = headers.get(UNDECODABLE)
    if undecodable:
        raise DecodeError(f"the broker client could not decode this delivery: {undecodable}")
    missing = [name for name in (MESSAGE_ID, TYPE) if not headers.get(name)]
    if missing:
        raise DecodeError(
            f"message is missing envelope header{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}: it was not published by outboxer, or its headers were "
            "stripped on the way"
        )
    for name, limit in _LIMITS.items():
        value = headers.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DecodeError(f"{name} is not text")
        if len(value) > limit:
            raise DecodeError(f"{name} is {len(value)} characters long; the limit is {limit}")
        where = control_at(value)
        if where is not None:
            raise DecodeError(
                f"{name} holds a control character (U+{ord(value[where]):04X} at position "
                f"{where}): {value[:80]!r}"
            )
    try:
        message_id = UUID(headers[MESSAGE_ID])
    except (ValueError, TypeError, AttributeError) as exc:
        raise DecodeError(f"{MESSAGE_ID} is not a UUID: {headers[MESSAGE_ID]!r:.80}") from exc
    occurred_raw = headers.get(OCCURRED_AT)
    try:
        occurred_at = datetime.fromisoformat(occurred_raw) if occurred_raw else None
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"{OCCURRED_AT} is not an ISO 8601 time: {occurred_raw!r:.80}") from exc
    if occurred_at is None:
        raise DecodeError(f"message {message_id} is missing envelope header {OCCURRED_AT}")
    if occurred_at.tzinfo is None:
        raise DecodeError(f"{OCCURRED_AT} has no time zone: {occurred_raw!r:.80}")
    utc = in_utc(occurred_at)
    if utc is None:  # a hostile publisher's: the database could store it, no read load it
        raise DecodeError(
            f"{OCCURRED_AT} {occurred_raw!r:.80} is not a time outboxer takes: it takes "
            f"times {STORED_TIMES}"
        )
    attempt_raw = headers.get(ATTEMPT, "1")
    try:
        attempt = int(attempt_raw)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"{ATTEMPT} is not a whole number: {attempt_raw!r:.80}") from exc
    correlation = headers.get(CORRELATION_ID)
    traceparent = headers.get(TRACEPARENT) or None
    tracestate = headers.get(TRACESTATE) or None
    if traceparent is not None:
        if valid_traceparent(traceparent):
            # A later version may add fields; the ones version 00 defines are what we keep.
            traceparent = traceparent[:55]
        else:
            traceparent = tracestate = None
    if tracestate is not None and (
        len(tracestate) > _TRACESTATE_MAX or not tracestate.isprintable()
    ):
        tracestate = None
    return Envelope(
        message_id=message_id,
        type=headers[TYPE],
        destination=destination,
        payload=body,
        occurred_at=utc,
        key=headers.get(KEY),
        correlation_id=None if correlation in (None, "", str(message_id)) else correlation,
        causation_id=headers.get(CAUSATION_ID) or None,
        headers=user_headers(headers),
        traceparent=traceparent,
        tracestate=tracestate,
        content_type=headers.get(CONTENT_TYPE) or CONTENT_TYPE_JSON,
        handler=headers.get(HANDLER) or None,
        attempt=attempt,
    )


_HEX = frozenset("0123456789abcdef")


def traceparent_fields(traceparent: str) -> tuple[int, int, int] | None:
    """(trace id, parent id, flags) of a W3C ``traceparent``, or None if it is invalid.

    The rules of W3C Trace Context, level 1: lower-case hex fields; version ``ff`` is
    invalid; version ``00`` has exactly four fields (55 characters); a later version is
    read by the fields ``00`` defines, and what follows must start with ``-``; the trace
    id and parent id must not be all zeros.
    """
    if len(traceparent) < 55:
        return None
    version, trace_id, parent_id, flags = (
        traceparent[0:2],
        traceparent[3:35],
        traceparent[36:52],
        traceparent[53:55],
    )
    if traceparent[2] != "-" or traceparent[35] != "-" or traceparent[52] != "-":
        return None
    if not set(version + trace_id + parent_id + flags) <= _HEX or version == "ff":
        return None
    if version == "00" and len(traceparent) != 55:
        return None
    if len(traceparent) > 55 and traceparent[55] != "-":
        return None
    trace, parent = int(trace_id, 16), int(parent_id, 16)
    if not trace or not parent:
        return None
    return trace, parent, int(flags, 16)


def valid_traceparent(traceparent: str) -> bool:
    """Whether ``traceparent`` is a valid W3C traceparent (see :func:`traceparent_fields`)."""
    return traceparent_fields(traceparent) is not None
