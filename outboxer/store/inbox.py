"""SQL on ``outboxer_inbox``: the record that a handler processed a message.

Every function runs in the caller's transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any
from uuid import UUID

from sqlalchemy import and_, bindparam, delete, func, select, tuple_
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect

from ..tables import inbox
from .clock import clock_params, db_now_plus, now
from .compiled import Compiled

__all__ = [
    "MESSAGE_ID_KEY",
    "InboxRow",
    "count_inbox",
    "prune_inbox",
    "record_inbox",
    "record_inbox_many",
    "stored_key",
]

_HASHED = "sha256:"
_KEY_LIMIT = 255

MESSAGE_ID_KEY = "message-id:"
"""How a handler with a business key records a message that has none: ``message-id:`` and
its id, so that no key ever stands for another message's id. Releases before 2026-11-30
recorded the bare id: a message in that form whose row an earlier release wrote (its bare
id, for this very message) is a duplicate too, so a redelivery across a rolling upgrade
does not run twice (:func:`_recorded_earlier`)."""


def stored_key(dedup_key: str) -> str:
    """The form of ``dedup_key`` the inbox stores, so that keys compare exactly everywhere.

    A key of at most 255 characters of plain text is stored as it is. A longer one (which
    a column would refuse, or MariaDB's ``INSERT IGNORE`` would silently cut, making two
    keys one), one with control characters or lone surrogates (which PostgreSQL refuses),
    and one that itself starts with ``sha256:`` is stored as ``sha256:`` and the hex
    SHA-256 of its UTF-8 bytes. Distinct keys stay distinct.
    """
    if (
        len(dedup_key) <= _KEY_LIMIT
        and dedup_key.isprintable()
        and not dedup_key.startswith(_HASHED)
        and _encodable(dedup_key)
    ):
        return dedup_key
    digest = hashlib.sha256(dedup_key.encode("utf-8", "surrogatepass")).hexdigest()
    return _HASHED + digest


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_inbox(
    connection: Connection, *, handler: str, dedup_key: str, message_id: UUID, message_type: str
) -> bool:
    """Insert the inbox row in the caller's transaction; False if it was already there.

    A concurrent transaction inserting the same row makes this wait until that one
    commits (then False) or rolls back (then True): a message is handled at most once per
    handler even when two consumers get it at the same time.
    """
    dialect = connection.dialect
    plan = _insert_if_absent(dialect)
    values = {
        "handler": handler,
        "dedup_key": stored_key(dedup_key),
        "message_id": message_id,
        "message_type": message_type[:255],
        **clock_params(dialect.name),
    }
    result = connection.exec_driver_sql(
        plan.sql,
        plan.parameters(values),
        # SQLAlchemy keeps an INSERT's rowcount only when asked (otherwise -1: truthy).
        execution_options={"preserve_rowcount": True},
    )
    if result.rowcount != 1:
        return False
    return not _recorded_earlier(connection, [(handler, dedup_key)])


@dataclass(frozen=True)
class InboxRow:
    """One row for :func:`record_inbox_many`."""

    handler: str
    dedup_key: str
    message_id: UUID
    message_type: str


def record_inbox_many(connection: Connection, rows: Sequence[InboxRow]) -> list[bool]:
    """Insert ``rows`` in one statement, in the caller's transaction; per row, whether it
    was inserted (False: it was already there).

    The rows must have distinct ``(handler, stored_key(dedup_key))``. They are inserted in
    key order, so two batches that share keys wait for each other instead of deadlocking
    (mostly: a deadlock the database still detects is an error, and the caller falls
    back). Rows locked by a concurrent transaction make this wait, as in
    :func:`record_inbox`.
    """
    if not rows:
        return []
    dialect = connection.dialect
    keys = [(row.handler, stored_key(row.dedup_key)) for row in rows]
    order = sorted(range(len(rows)), key=lambda i: keys[i])
    if dialect.name == "postgresql" and dialect.driver in ("psycopg", "psycopg2"):
        # Four array parameters, whatever the count: one short statement that the driver
        # parses once (psycopg caches no statement of more than 50 parameters).
        arrays = {
            "handlers": [keys[i][0] for i in order],
            "keys": [keys[i][1] for i in order],
            "ids": [str(rows[i].message_id) for i in order],
            "types": [rows[i].message_type[:255] for i in order],
        }
        returned = connection.exec_driver_sql(_unnest_insert(dialect), arrays).all()
        return _fresh(connection, rows, keys, {(handler, _text(key)) for handler, key in returned})
    plan = _insert_many(dialect, len(rows))
    values: dict[str, Any] = dict(clock_params(dialect.name))
    for position, index in enumerate(order):
        row = rows[index]
        values[f"handler_{position}"] = keys[index][0]
        values[f"dedup_key_{position}"] = keys[index][1]
        values[f"message_id_{position}"] = row.message_id
        values[f"message_type_{position}"] = row.message_type[:255]
    returned = connection.exec_driver_sql(plan.sql, plan.parameters(values)).all()
    return _fresh(connection, rows, keys, {(handler, _text(key)) for handler, key in returned})


def _fresh(
    connection: Connection,
    rows: Sequence[InboxRow],
    keys: list[tuple[str, str]],
    inserted: set[tuple[str, str]],
) -> list[bool]:
    """Per row, whether it is new: inserted now, and not recorded by an earlier release."""
    earlier = _recorded_earlier(
        connection,
        [
            (row.handler, row.dedup_key)
            for row, key in zip(rows, keys, strict=True)
            if key in inserted
        ],
    )
    return [
        key in inserted and (row.handler, row.dedup_key) not in earlier
        for row, key in zip(rows, keys, strict=True)
    ]


def _earlier_form(dedup_key: str) -> UUID | None:
    """The message id of a key in the :data:`MESSAGE_ID_KEY` form, else None (a business
    key that starts with the prefix carries it twice, and is no id)."""
    if not dedup_key.startswith(MESSAGE_ID_KEY):
        return None
    rest = dedup_key[len(MESSAGE_ID_KEY) :]
    try:
        message_id = UUID(rest)
    except ValueError:
        return None
    return message_id if str(message_id) == rest else None


def _recorded_earlier(
    connection: Connection, keys: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Which of ``(handler, dedup key)`` are in the :data:`MESSAGE_ID_KEY` form of a message
    an earlier release recorded under its bare id: a row with that id as its key *and* as
    its message id (a row another message wrote with a key spelling this id is not it)."""
    wanted = {}
    for handler, key in keys:
        message_id = _earlier_form(key)
        if message_id is not None:
            wanted[(handler, str(message_id))] = (handler, key, message_id)
    if not wanted:
        return set()
    found = connection.execute(
        select(inbox.c.handler, inbox.c.dedup_key, inbox.c.message_id).where(
            tuple_(inbox.c.handler, inbox.c.dedup_key).in_(list(wanted))
        )
    ).all()
    recorded = set()
    for handler, bare, message_id in found:
        match = wanted.get((handler, _text(bare)))
        if match is not None and match[2] == message_id:
            recorded.add((match[0], match[1]))
    return recorded


def _text(value: object) -> str:
    # MariaDB's binary key column returns bytes.
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


@cache
def _unnest_insert(dialect: Dialect) -> str:
    table = dialect.identifier_preparer.format_table(inbox)
    return (
        f"INSERT INTO {table} (handler, dedup_key, message_id, message_type, processed_at) "
        "SELECT h, k, m, t, statement_timestamp() FROM unnest(%(handlers)s::varchar[], "
        "%(keys)s::varchar[], %(ids)s::uuid[], %(types)s::varchar[]) AS rows(h, k, m, t) "
        "ON CONFLICT DO NOTHING RETURNING handler, dedup_key"
    )


@cache
def _insert_many(dialect: Dialect, count: int) -> Compiled:
    """Compiled once per dialect and row count (a batch holds at most a few hundred)."""
    name = dialect.name
    # Typed bind parameters: in a multi-row VALUES, only the first row's would be.
    columns = ("handler", "dedup_key", "message_id", "message_type")
    rows = [
        {
            **{c: bindparam(f"{c}_{i}", type_=inbox.c[c].type) for c in columns},
            "processed_at": now(name),
        }
        for i in range(count)
    ]
    stmt: Any
    if name == "postgresql":
        stmt = postgresql.insert(inbox).values(rows).on_conflict_do_nothing()
    elif name in ("mysql", "mariadb"):
        stmt = mysql.insert(inbox).values(rows).prefix_with("IGNORE")
    else:
        stmt = sqlite.insert(inbox).values(rows).on_conflict_do_nothing()
    stmt = stmt.returning(inbox.c.handler, inbox.c.dedup_key)
    return Compiled.of(stmt, dialect)


def inbox_has(connection: Connection, *, handler: str, dedup_key: str) -> bool:
    """Whether ``handler`` has an inbox row for ``dedup_key`` (a handler without a
    transaction looks before it runs; :func:`record_inbox` writes the row after)."""
    found = connection.execute(
        select(inbox.c.handler).where(
            inbox.c.handler == handler, inbox.c.dedup_key == stored_key(dedup_key)
        )
    ).first()
    return found is not None or bool(_recorded_earlier(connection, [(handler, dedup_key)]))


@cache
def _insert_if_absent(dialect: Dialect) -> Compiled:
    """Compiled once per dialect: this runs once per handler per message."""
    name = dialect.name
    values = {
        "handler": bindparam("handler"),
        "dedup_key": bindparam("dedup_key"),
        "message_id": bindparam("message_id"),
        "message_type": bindparam("message_type"),
        "processed_at": now(name),
    }
    stmt: Any
    if name == "postgresql":
        stmt = postgresql.insert(inbox).values(**values).on_conflict_do_nothing()
    elif name in ("mysql", "mariadb"):
        stmt = mysql.insert(inbox).values(**values).prefix_with("IGNORE")
    else:
        stmt = sqlite.insert(inbox).values(**values).on_conflict_do_nothing()
    return Compiled.of(stmt, dialect)


def prune_inbox(
    connection: Connection, *, older_than: float, limit: int = 1000, consumer: str | None = None
) -> int:
    """Delete up to ``limit`` inbox rows older than ``older_than`` seconds: the rows of
    ``consumer``'s handlers (None: every consumer's).

    Runs in the caller's transaction: call it in a loop, one short transaction per batch,
    so pruning never holds long locks.
    """
    cutoff = db_now_plus(connection.dialect, -older_than)
    old = inbox.c.processed_at < cutoff
    if consumer is not None:  # handler ids are "consumer:handler"
        old = and_(old, inbox.c.handler.startswith(f"{consumer}:", autoescape=True))
    if connection.dialect.name in ("mysql", "mariadb"):
        stmt = delete(inbox).where(old).with_dialect_options(mysql_limit=limit)
    else:
        keys = select(inbox.c.handler, inbox.c.dedup_key).where(old).limit(limit)
        stmt = delete(inbox).where(tuple_(inbox.c.handler, inbox.c.dedup_key).in_(keys))
    return connection.execute(stmt).rowcount or 0


def count_inbox(connection: Connection) -> int:
    return int(connection.execute(select(func.count()).select_from(inbox)).scalar_one())
