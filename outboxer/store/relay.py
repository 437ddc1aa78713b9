"""The relay's rows: what a claim reads, what a settle writes, and the backlog's figures.

Claiming lives in :mod:`outboxer.store.claims`, settling in :mod:`outboxer.store.settle`,
leases in :mod:`outboxer.store.leases`; this module holds the shapes they share.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection

from ..message import Envelope
from ..tables import outbox
from ..times import EARLIEST, LATEST, STORED_TIMES
from ..wire import control_at, unencodable
from .clock import db_now, db_now_plus

__all__ = [
    "MALFORMED_HEADERS",
    "SENT_COLUMNS",
    "Backlog",
    "Claimed",
    "DeadLetterRow",
    "RetryRow",
    "backlog",
    "claimed_from_row",
    "next_due_in",
]


MALFORMED_HEADERS = "outboxer-malformed-headers"
"""The header that keeps, in a ``malformed_row`` dead letter, the row's headers text."""


@dataclass(frozen=True)
class Claimed:
    """A leased outbox row: what to send, and its failure history so far."""

    id: int
    envelope: Envelope
    attempts: int
    """Failed send attempts before this claim."""
    first_failed_at: datetime | None
    malformed: str | None = None
    """Why the row cannot be sent as it is (headers that are not a JSON object: a row
    written by other SQL than outboxer's); the relay dead-letters it without sending."""
    malformed_type: str = "malformed_row"
    """The dead letter's error type for :attr:`malformed`: ``malformed_row``, or
    ``invalid_message`` for headers no broker can carry (text that is not UTF-8)."""


@dataclass(frozen=True)
class RetryRow:
    """Send again after ``delay`` seconds (on the database clock); counts an attempt."""

    id: int
    delay: float
    error: str


@dataclass(frozen=True)
class DeadLetterRow:
    """Move to ``outboxer_dead_letter`` with the reason; the outbox row is deleted."""

    claimed: Claimed
    error_type: str
    error: str
    attempts: int
    trace: Mapping[str, str] | None = None
    """The dead-letter span's context (a replay continues the trace from it)."""


@dataclass(frozen=True)
class Backlog:
    pending: int
    """Rows not yet sent (due or not)."""
    due: int
    """Rows due now."""
    oldest_due_seconds: float
    """How long the oldest due row has been waiting (0 when none is due)."""
    leased: int


SENT_COLUMNS = (
    outbox.c.id,
    outbox.c.message_id,
    outbox.c.message_type,
    outbox.c.destination,
    outbox.c.payload,
    outbox.c.occurred_at,
    outbox.c.message_key,
    outbox.c.correlation_id,
    outbox.c.causation_id,
    outbox.c.headers,
    outbox.c.traceparent,
    outbox.c.tracestate,
    outbox.c.content_type,
    outbox.c.target_handler,
    outbox.c.handler_attempt,
    outbox.c.attempts,
    outbox.c.first_failed_at,
)
"""What a claim reads back: the envelope and the failure history (the relay's hot path)."""


def next_due_in(
    connection: Connection,
    *,
    destinations: Sequence[str] | None = None,
    since: float | None = None,
) -> float | None:
    """Seconds until the next pending row is due (0 if one is due now; None if none).

    ``destinations`` counts only their rows (a relay limited to them waits for no other).
    ``since`` counts only the rows due less than ``since`` seconds ago, or later: a relay
    whose claim, begun ``since`` seconds ago, came back empty could take none of the rows
    due before it (another relay leases them, or an earlier row of their key), and must
    not claim again at once for them; a row due since may be one it can take.
    """
    dialect = connection.dialect
    current_time = db_now(dialect)
    query = select(func.min(outbox.c.available_at), current_time)
    if destinations is not None:
        query = query.where(outbox.c.destination.in_(list(destinations)))
    if since is not None:
        query = query.where(outbox.c.available_at > db_now_plus(dialect, -max(0.0, since)))
    with connection.begin():
        row = connection.execute(query).one()
    due: datetime | None = row[0]
    current: datetime = row[1]
    if due is None:
        return None
    return max(0.0, (due - current).total_seconds())


def backlog(connection: Connection) -> Backlog:
    """Pending, due and leased counts, and the age of the oldest due row."""
    current_time = db_now(connection.dialect)
    is_due = outbox.c.available_at <= current_time
    with connection.begin():
        row = connection.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((is_due, 1), else_=0)), 0),
                func.min(case((is_due, outbox.c.available_at))),
                func.coalesce(
                    func.sum(case((outbox.c.locked_until > current_time, 1), else_=0)), 0
                ),
                current_time,
            )
        ).one()
    count, due, oldest, leased, current = row
    age = (current - oldest).total_seconds() if oldest is not None else 0.0
    return Backlog(int(count), int(due), max(0.0, age), int(leased))


def claimed_from_row(row: Any, headers_seen: dict[str, Mapping[str, str]] | None = None) -> Claimed:
    """A claimed row (:data:`SENT_COLUMNS`) as a :class:`Claimed`.

    ``headers_seen`` maps header JSON already decoded in this batch to its map: the rows of
    a batch mostly carry the same few header sets, and decoding each once saves a
    ``json.loads`` per row. The maps are shared between envelopes and never modified."""
    (
        row_id,
        message_id,
        message_type,
        destination,
        payload,
        occurred_at,
        key,
        correlation_id,
        causation_id,
        headers,
        traceparent,
        tracestate,
        content_type,
        handler,
        attempt,
        attempts,
        first_failed_at,
    ) = row
    # Envelope(...) less its frozen dataclass __init__ (an object.__setattr__ per field):
    # the same instance, built at half the cost, a thousand times per batch.
    # tests/test_relay.py checks that every field is set.
    malformed: str | None = None
    malformed_type = "malformed_row"
    decoded_headers: Mapping[str, str] = {}
    if headers:
        try:
            decoded_headers = _decode_headers(headers, headers_seen)
        except _NotText as exc:  # an older outboxer's publish(), or other SQL
            malformed_type = "invalid_message"
            malformed = (
                f"outbox row {row_id}: {exc}: no broker can carry it; fix the row's headers "
                "(or delete the row), or replay its dead letter once they are fixed"
            )
            decoded_headers = exc.headers
        except Exception as exc:  # a row written by other SQL than outboxer's
            malformed = (
                f"outbox row {row_id}: its headers are not a JSON object of names to text "
                f"({type(exc).__name__}: {str(exc)[:200]}); fix or delete the row, or replay "
                "its dead letter once the headers are fixed"
            )
            decoded_headers = {MALFORMED_HEADERS: headers}  # kept in the dead letter
    if malformed is None and not (
        message_type.isprintable()
        and (key is None or key.isprintable())
        and (correlation_id is None or correlation_id.isprintable())
    ):  # printable text holds no control character: one C loop a field, as a rule
        malformed = _control_in(row_id, message_type, key, correlation_id)
        if malformed is not None:
            malformed_type = "invalid_message"
    if occurred_at.tzinfo is not timezone.utc:  # rows straight from the driver (PostgreSQL)
        occurred_at = occurred_at.astimezone(timezone.utc)
    if not EARLIEST <= occurred_at <= LATEST:  # an older outboxer's row, or other SQL
        reason, occurred_at = _time_outside(row_id, occurred_at)
        if malformed is None:
            malformed, malformed_type = reason, "invalid_message"
    if first_failed_at is not None:  # the relay's own history: a time it cannot use is none
        if first_failed_at.tzinfo is not timezone.utc:
            first_failed_at = first_failed_at.astimezone(timezone.utc)
        if not EARLIEST <= first_failed_at <= LATEST:
            first_failed_at = None
    envelope = _new_envelope(Envelope)
    envelope.__dict__.update(
        message_id=message_id,
        type=message_type,
        destination=destination,
        payload=bytes(payload),
        occurred_at=occurred_at,
        key=key,
        correlation_id=correlation_id,
        causation_id=causation_id,
        headers=decoded_headers,
        traceparent=traceparent,
        tracestate=tracestate,
        content_type=content_type,
        handler=handler,
        attempt=attempt,
        outbox_id=row_id,
    )
    return Claimed(row_id, envelope, attempts, first_failed_at, malformed, malformed_type)


_new_envelope = object.__new__


def _time_outside(row_id: int, occurred_at: datetime) -> tuple[str, datetime]:
    """Why a row whose occurred-at is outside the times outboxer takes is dead-lettered,
    and the time its dead letter gets instead (the nearest one outboxer takes).

    PostgreSQL reads such a time as :data:`~outboxer.times.BELOW` or
    :data:`~outboxer.times.ABOVE` (``0001-12-31 10:00:00+00 BC``, ``infinity``: see
    :class:`outboxer.tables.UTCDateTime`); another database as it is."""
    early = occurred_at < EARLIEST
    instead = EARLIEST if early else LATEST
    return (
        f"outbox row {row_id}: its occurred_at is {'before' if early else 'after'} the times "
        f"outboxer takes ({STORED_TIMES}), which every consumer refuses and some PostgreSQL "
        f"sessions cannot read; this dead letter holds {instead.isoformat()} instead: replay "
        "it to send the message with that time"
    ), instead


def _control_in(row_id: int, type_: str, key: str | None, correlation: str | None) -> str | None:
    """Why the row cannot be sent, if its type, key or correlation id holds a control
    character (an older outboxer's publish(), or other SQL): every consumer would
    dead-letter it without its id, so the relay keeps it as a dead letter instead."""
    for what, text in (("type", type_), ("key", key), ("correlation id", correlation)):
        where = None if text is None else control_at(text)
        if text is not None and where is not None:
            return (
                f"outbox row {row_id}: its {what} holds a control character "
                f"(U+{ord(text[where]):04X} at position {where}), which every consumer "
                "refuses; fix the row (or delete it), or fix the dead letter's column and "
                "replay it"
            )
    return None


class _NotText(ValueError):
    """Headers holding a str that is not UTF-8 text (a lone surrogate, JSON-escaped)."""

    def __init__(self, problem: str, headers: Mapping[str, str]) -> None:
        super().__init__(problem)
        self.headers = headers


def _decode_headers(text: str, seen: dict[str, Mapping[str, str]] | None) -> Mapping[str, str]:
    """The headers' map; raises when ``text`` is not a JSON object, and :class:`_NotText`
    when a name or value is not UTF-8 text."""
    known = None if seen is None else seen.get(text)
    if known is None:
        decoded = json.loads(text)
        if not isinstance(decoded, dict):
            raise TypeError(f"a JSON {type(decoded).__name__}, not an object")
        for name, value in decoded.items():
            if not isinstance(value, str):  # publish() takes text only; so do the brokers
                raise TypeError(f"the value of {name[:100]!r} is {type(value).__name__}, not text")
        # Text from the database is valid Unicode; only a JSON escape ("\\udce9") makes a
        # lone surrogate, which no broker's encoder takes (it would fail the whole send).
        if "\\u" in text:
            problem = unencodable(decoded)
            if problem is not None:
                raise _NotText(problem, decoded)
        known = decoded
        if seen is not None:
            seen[text] = known
    return known
