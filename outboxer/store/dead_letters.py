"""SQL on ``outboxer_dead_letter``: park, list, fetch, delete, purge (the replay's own
bookkeeping is in :mod:`outboxer.store.dead_letter_replay`).

Every function runs in the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from sqlalchemy import and_, bindparam, delete, func, insert, select
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.sql.elements import ColumnElement

from ..message import CONTENT_TYPE_JSON, Envelope
from ..tables import UTCDateTime, dead_letter
from .clock import db_now, db_now_plus
from .relay import MALFORMED_HEADERS

__all__ = [
    "MAX_ID",
    "DeadLetter",
    "count_matching",
    "DeadLetterFilter",
    "NewDeadLetter",
    "count_dead_letters",
    "delete_dead_letters",
    "get_dead_letter",
    "insert_dead_letters",
    "list_dead_letters",
    "prune_dead_letters",
    "quarantine",
    "was_cut",
]

ORIGINS = ("relay", "handler", "consumer")
MAX_ID = 2**63 - 1
"""The largest id a dead letter can have (BIGINT; SQLite's INTEGER). The databases refuse
to compare an id with a larger number ("bigint out of range"), so an id beyond it is looked
for nowhere: no letter has it."""


@dataclass(frozen=True)
class NewDeadLetter:
    """A message to park, with why it failed.

    ``origin`` is ``relay`` (could not be sent), ``handler`` (a handler gave up) or
    ``consumer`` (could not be decoded; ``envelope`` is None and the raw body and
    headers are kept as they arrived).
    """

    origin: str
    error_type: str
    error_message: str
    attempts: int
    envelope: Envelope | None = None
    raw_body: bytes = b""
    raw_headers: Mapping[str, str] = field(default_factory=dict)
    destination: str | None = None
    consumer: str | None = None
    handler: str | None = None
    traceback: str | None = None
    first_failed_at: datetime | None = None


@dataclass(frozen=True)
class DeadLetter:
    """A parked message as stored."""

    id: int
    origin: str
    message_id: UUID | None
    message_type: str | None
    destination: str | None
    message_key: str | None
    consumer: str | None
    handler: str | None
    payload: bytes
    headers: dict[str, str]
    content_type: str | None
    correlation_id: str | None
    causation_id: str | None
    traceparent: str | None
    tracestate: str | None
    occurred_at: datetime | None
    error_type: str
    error_message: str
    traceback: str | None
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    replayed_at: datetime | None

    @property
    def trace_headers(self) -> dict[str, str]:
        headers = {}
        if self.traceparent:
            headers["traceparent"] = self.traceparent
            if self.tracestate:
                headers["tracestate"] = self.tracestate
        return headers


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters a list, replay-all or purge applies to (all given fields must match)."""

    origin: str | None = None
    consumer: str | None = None
    handler: str | None = None
    message_type: str | None = None
    error_type: str | None = None
    since: datetime | None = None
    """Last failed at or after this time."""
    until: datetime | None = None
    """Last failed before this time."""
    include_replayed: bool = False

    def conditions(self) -> list[ColumnElement[bool]]:
        c = dead_letter.c
        where: list[ColumnElement[bool]] = []
        for column, value in (
            (c.origin, self.origin),
            (c.consumer, self.consumer),
            (c.handler, self.handler),
            (c.message_type, self.message_type),
            (c.error_type, self.error_type),
        ):
            if value is not None:
                # As the value was stored (NUL and lone surrogates replaced, cut to the
                # column): it then matches, and no driver refuses it.
                where.append(column == _text(value, _length(column.name)))
        if self.since is not None:
            where.append(c.last_failed_at >= bindparam("since", self.since, type_=UTCDateTime()))
        if self.until is not None:
            where.append(c.last_failed_at < bindparam("until", self.until, type_=UTCDateTime()))
        if not self.include_replayed:
            where.append(c.replayed_at.is_(None))
        return where


def insert_dead_letters(connection: Connection, rows: Sequence[NewDeadLetter]) -> None:
    """Park ``rows`` in the caller's transaction (failure times on the database clock).

    Nothing a message carries can make this fail: every text field is cut to its column
    (with a marker) and stripped of what the databases refuse (NUL, lone surrogates), a
    naive time is read as UTC, and a traceparent that does not fit is left out.
    """
    if not rows:
        return
    now = db_now(connection.dialect)
    stmt = insert(dead_letter).values(
        first_failed_at=func.coalesce(bindparam("first_failed", type_=UTCDateTime()), now),
        last_failed_at=now,
    )
    connection.execute(stmt, [_values(row) for row in rows])


def quarantine(
    *,
    consumer: str | None,
    destination: str | None,
    error_type: str,
    error: str,
    payload: bytes = b"",
) -> NewDeadLetter:
    """The last-resort dead letter: it needs nothing from the message.

    Written when even the bounded dead letter of a message could not be stored (its
    payload is larger than the database accepts, say), so the delivery can still be
    settled; the reason says what was lost. ``payload`` is the start of the body at most:
    bytes, which any database stores.
    """
    return NewDeadLetter(
        origin="consumer",
        error_type=error_type,
        error_message=error,
        attempts=1,
        raw_body=payload,
        destination=destination,
        consumer=consumer,
    )


_TRUNCATED = "…[truncated]"
_TEXT_LIMIT = 64 * 1024
"""Error messages and tracebacks are cut here: enough to debug, never a huge packet."""


def _text(value: object, limit: int | None) -> str | None:
    """``value`` as text every database stores: no NUL, no lone surrogates, at most ``limit``."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if "\x00" in text:
        text = text.replace("\x00", "\\0")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    if limit is not None and len(text) > limit:
        text = text[: limit - len(_TRUNCATED)] + _TRUNCATED
    return text


def was_cut(value: str | None, column: str) -> bool:
    """Whether ``value``, read from ``column``, is text that was longer than the column
    and cut to it (it ends in the marker and fills the column): not the value written."""
    limit = _length(column)
    if value is None or limit is None:
        return False
    return len(value) == limit and value.endswith(_TRUNCATED)


def _length(column: str) -> int | None:
    """The declared length of a text column of the dead-letter table."""
    length = getattr(dead_letter.c[column].type, "length", None)
    return length if isinstance(length, int) else None


def _aware(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def _values(row: NewDeadLetter) -> dict[str, Any]:
    env = row.envelope
    if env is not None:
        headers: Mapping[str, str] = env.headers
        values: dict[str, Any] = {
            "message_id": env.message_id,
            "message_type": env.type,
            "destination": row.destination or env.destination,
            "message_key": env.key,
            "payload": env.payload,
            "content_type": env.content_type,
            "correlation_id": env.correlation_id,
            "causation_id": env.causation_id,
            "traceparent": env.traceparent,
            "tracestate": env.tracestate,
            "occurred_at": env.occurred_at,
        }
    else:
        headers = row.raw_headers
        values = {
            "message_id": None,
            "message_type": None,
            "destination": row.destination,
            "message_key": None,
            "payload": row.raw_body,
            "content_type": None,
            "correlation_id": None,
            "causation_id": None,
            "traceparent": row.raw_headers.get("traceparent"),
            "tracestate": row.raw_headers.get("tracestate"),
            "occurred_at": None,
        }
    for name in (
        "message_type",
        "destination",
        "message_key",
        "content_type",
        "correlation_id",
        "causation_id",
        "tracestate",
    ):
        values[name] = _text(values[name], _length(name))
    traceparent = _text(values["traceparent"], None)
    # A traceparent cut short is no traceparent: leave it out rather than store a wrong one.
    values["traceparent"] = traceparent if traceparent and len(traceparent) <= 64 else None
    values["occurred_at"] = _aware(values["occurred_at"])
    if not isinstance(values["payload"], (bytes, bytearray, memoryview)):
        values["payload"] = str(values["payload"]).encode("utf-8", "replace")
    values.update(
        origin=row.origin,
        consumer=_text(row.consumer, _length("consumer")),
        handler=_text(row.handler, _length("handler")),
        headers=_headers_json(headers),
        error_type=_text(row.error_type, _length("error_type")) or "error",
        error_message=_text(row.error_message, _TEXT_LIMIT) or "",
        traceback=_text(row.traceback, _TEXT_LIMIT),
        attempts=max(0, min(int(row.attempts), 2**31 - 1)),
        first_failed=_aware(row.first_failed_at),
        replayed_at=None,
    )
    return values


def _headers_json(headers: Mapping[str, Any]) -> str | None:
    if not headers:
        return None
    # ASCII JSON: NUL and lone surrogates become escapes, which every database stores.
    return json.dumps({str(k): v if isinstance(v, str) else str(v) for k, v in headers.items()})


def list_dead_letters(
    connection: Connection,
    where: DeadLetterFilter,
    *,
    limit: int = 50,
    before_id: int | None = None,
) -> list[DeadLetter]:
    """Newest first; pass the last id seen as ``before_id`` for the next page."""
    conditions = where.conditions()
    if before_id is not None and before_id < -MAX_ID:  # no id is below the column's least
        return []
    if before_id is not None and before_id <= MAX_ID:  # every id is below a larger one
        conditions.append(dead_letter.c.id < before_id)
    rows = connection.execute(
        select(dead_letter).where(*conditions).order_by(dead_letter.c.id.desc()).limit(limit)
    ).mappings()
    return [_read(row) for row in rows]


def get_dead_letter(
    connection: Connection, dead_letter_id: int, *, for_update: bool = False
) -> DeadLetter | None:
    """The dead letter ``dead_letter_id``, in the caller's transaction.

    ``for_update`` locks it (PostgreSQL, MariaDB): a second replay of the letter waits,
    then finds it gone or replayed (SQLite takes no lock here: see
    :func:`outboxer.store.dead_letter_replay.claim_for_replay`).
    """
    if not -MAX_ID <= dead_letter_id <= MAX_ID:
        return None
    query = select(dead_letter).where(dead_letter.c.id == dead_letter_id)
    if for_update and connection.dialect.name != "sqlite":
        query = query.with_for_update()
    row = connection.execute(query).mappings().first()
    return None if row is None else _read(row)


def count_matching(
    connection: Connection, where: DeadLetterFilter, *, up_to_id: int | None = None
) -> int:
    """How many dead letters match ``where`` (with ids up to ``up_to_id`` if given)."""
    conditions = where.conditions()
    if up_to_id is not None:
        if up_to_id < -MAX_ID:
            return 0
        if up_to_id <= MAX_ID:
            conditions.append(dead_letter.c.id <= up_to_id)
    return int(
        connection.execute(
            select(func.count()).select_from(dead_letter).where(*conditions)
        ).scalar_one()
    )


def delete_dead_letters(connection: Connection, ids: Sequence[int]) -> int:
    """Delete these dead letters (caller's transaction); returns how many existed."""
    ids = [i for i in ids if -MAX_ID <= i <= MAX_ID]
    if not ids:
        return 0
    result = connection.execute(
        delete(dead_letter).where(dead_letter.c.id.in_(bindparam("ids", expanding=True))),
        {"ids": list(ids)},
    )
    return result.rowcount or 0


def prune_dead_letters(
    connection: Connection, *, older_than: float, limit: int = 1000, consumer: str | None = None
) -> int:
    """Delete up to ``limit`` dead letters last failed more than ``older_than`` seconds ago:
    ``consumer``'s (None: all, the relay's included), in the caller's transaction; loop
    for more."""
    cutoff = db_now_plus(connection.dialect, -older_than)
    old = dead_letter.c.last_failed_at < cutoff
    if consumer is not None:
        old = and_(old, dead_letter.c.consumer == consumer)
    ids = list(
        connection.execute(
            select(dead_letter.c.id).where(old).order_by(dead_letter.c.id).limit(limit)
        ).scalars()
    )
    return delete_dead_letters(connection, ids)


def count_dead_letters(connection: Connection) -> dict[str, int]:
    """Dead letters waiting (not replayed), by origin."""
    rows = connection.execute(
        select(dead_letter.c.origin, func.count())
        .where(dead_letter.c.replayed_at.is_(None))
        .group_by(dead_letter.c.origin)
    ).all()
    return {origin: int(count) for origin, count in rows}


def _read(row: RowMapping) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        origin=row["origin"],
        message_id=row["message_id"],
        message_type=row["message_type"],
        destination=row["destination"],
        message_key=row["message_key"],
        consumer=row["consumer"],
        handler=row["handler"],
        payload=bytes(row["payload"]),
        headers=_stored_headers(row["headers"]),
        content_type=row["content_type"] or CONTENT_TYPE_JSON,
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        traceparent=row["traceparent"],
        tracestate=row["tracestate"],
        occurred_at=row["occurred_at"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        traceback=row["traceback"],
        attempts=row["attempts"],
        first_failed_at=row["first_failed_at"],
        last_failed_at=row["last_failed_at"],
        replayed_at=row["replayed_at"],
    )


def _stored_headers(text: str | None) -> dict[str, str]:
    """The headers as stored; text that is not a JSON object of names to text (a row
    edited by hand) is kept whole as the header ``outboxer-malformed-headers``, as the
    relay keeps a malformed outbox row's: the letter is listed and shown, not replayed."""
    if not text:
        return {}
    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError):
        decoded = None
    if isinstance(decoded, dict) and all(isinstance(v, str) for v in decoded.values()):
        return decoded
    return {MALFORMED_HEADERS: text}
