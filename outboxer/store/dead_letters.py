"""SQL on ``outboxer_dead_letter``: park, list, fetch, replay bookkeeping, delete, purge.

Every function runs in the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.sql.elements import ColumnElement

from ..message import CONTENT_TYPE_JSON, Envelope
from ..tables import UTCDateTime, dead_letter
from .clock import db_now, db_now_plus

__all__ = [
    "DeadLetter",
    "count_matching",
    "DeadLetterFilter",
    "NewDeadLetter",
    "count_dead_letters",
    "delete_dead_letters",
    "get_dead_letter",
    "insert_dead_letters",
    "list_dead_letters",
    "mark_replayed",
    "prune_dead_letters",
]

ORIGINS = ("relay", "handler", "consumer")


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
                where.append(column == value)
        if self.since is not None:
            where.append(c.last_failed_at >= bindparam("since", self.since, type_=UTCDateTime()))
        if self.until is not None:
            where.append(c.last_failed_at < bindparam("until", self.until, type_=UTCDateTime()))
        if not self.include_replayed:
            where.append(c.replayed_at.is_(None))
        return where


def insert_dead_letters(connection: Connection, rows: Sequence[NewDeadLetter]) -> None:
    """Park ``rows`` in the caller's transaction (failure times on the database clock)."""
    if not rows:
        return
    now = db_now(connection.dialect)
    stmt = insert(dead_letter).values(
        first_failed_at=func.coalesce(bindparam("first_failed", type_=UTCDateTime()), now),
        last_failed_at=now,
    )
    connection.execute(stmt, [_values(row) for row in rows])


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
    values.update(
        origin=row.origin,
        consumer=row.consumer,
        handler=row.handler,
        headers=json.dumps(dict(headers)) if headers else None,
        error_type=row.error_type[:255],
        error_message=row.error_message,
        traceback=row.traceback,
        attempts=row.attempts,
        first_failed=row.first_failed_at,
        replayed_at=None,
    )
    return values


def list_dead_letters(
    connection: Connection,
    where: DeadLetterFilter,
    *,
    limit: int = 50,
    before_id: int | None = None,
) -> list[DeadLetter]:
    """Newest first; pass the last id seen as ``before_id`` for the next page."""
    conditions = where.conditions()
    if before_id is not None:
        conditions.append(dead_letter.c.id < before_id)
    rows = connection.execute(
        select(dead_letter).where(*conditions).order_by(dead_letter.c.id.desc()).limit(limit)
    ).mappings()
    return [_read(row) for row in rows]


def get_dead_letter(
    connection: Connection, dead_letter_id: int, *, for_update: bool = False
) -> DeadLetter | None:
    """The dead letter ``dead_letter_id``, in the caller's transaction.

    ``for_update`` locks it (PostgreSQL, MariaDB) so two replays of one letter cannot
    both happen.
    """
    query = select(dead_letter).where(dead_letter.c.id == dead_letter_id)
    if for_update and connection.dialect.name != "sqlite":
        query = query.with_for_update()
    row = connection.execute(query).mappings().first()
    return None if row is None else _read(row)


def count_matching(connection: Connection, where: DeadLetterFilter) -> int:
    return int(
        connection.execute(
            select(func.count()).select_from(dead_letter).where(*where.conditions())
        ).scalar_one()
    )


def ids_matching(
    connection: Connection, where: DeadLetterFilter, *, after_id: int, limit: int
) -> list[int]:
    """Ids in ascending order after ``after_id``: for walking a filter in small batches."""
    return list(
        connection.execute(
            select(dead_letter.c.id)
            .where(*where.conditions(), dead_letter.c.id > after_id)
            .order_by(dead_letter.c.id)
            .limit(limit)
        ).scalars()
    )


def mark_replayed(connection: Connection, ids: Sequence[int]) -> None:
    """Keep the rows as history, hidden from default lists (caller's transaction)."""
    connection.execute(
        update(dead_letter)
        .where(dead_letter.c.id.in_(bindparam("ids", expanding=True)))
        .values(replayed_at=db_now(connection.dialect)),
        {"ids": list(ids)},
    )


def delete_dead_letters(connection: Connection, ids: Sequence[int]) -> int:
    """Delete these dead letters (caller's transaction); returns how many existed."""
    if not ids:
        return 0
    result = connection.execute(
        delete(dead_letter).where(dead_letter.c.id.in_(bindparam("ids", expanding=True))),
        {"ids": list(ids)},
    )
    return result.rowcount or 0


def prune_dead_letters(connection: Connection, *, older_than: float, limit: int = 1000) -> int:
    """Delete up to ``limit`` dead letters last failed more than ``older_than`` seconds ago
    (in the caller's transaction; loop for more)."""
    cutoff = db_now_plus(connection.dialect, -older_than)
    ids = list(
        connection.execute(
            select(dead_letter.c.id)
            .where(dead_letter.c.last_failed_at < cutoff)
            .order_by(dead_letter.c.id)
            .limit(limit)
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
        headers=json.loads(row["headers"]) if row["headers"] else {},
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
