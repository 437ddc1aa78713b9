"""SQL on ``outboxer_outbox``: the producer's insert."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, func, insert, literal_column
from sqlalchemy.engine import Connection, Dialect

from ..message import CONTENT_TYPE_JSON, Envelope
from ..tables import outbox
from .clock import clock_params, later
from .compiled import Compiled

__all__ = ["NOTIFY_CHANNEL", "NewMessage", "insert_messages"]

NOTIFY_CHANNEL = "outboxer_outbox"
"""The PostgreSQL channel a producer notifies after inserting messages; relays LISTEN on it."""

_MAX_ROWS_PER_STATEMENT = 500
_ALWAYS = ("message_id", "message_type", "destination", "payload", "occurred_at", "delay")
# Sent only when some message of the statement needs them; otherwise the column's
# default applies (NULL, or the server default for content_type and handler_attempt).
_OPTIONAL = (
    "message_key",
    "headers",
    "content_type",
    "correlation_id",
    "causation_id",
    "traceparent",
    "tracestate",
    "target_handler",
    "handler_attempt",
)


@dataclass(frozen=True)
class NewMessage:
    """A message to store: its envelope, and how long to hold it back (seconds)."""

    envelope: Envelope
    delay: float = 0.0


def insert_messages(
    connection: Connection, messages: Sequence[NewMessage], *, notify: bool = True
) -> None:
    """Insert ``messages`` with one multi-row INSERT in the connection's transaction.

    On PostgreSQL, ``notify`` adds ``pg_notify`` to the statement: notifications with the
    same channel and payload are folded into one per transaction, delivered to the relays
    when (and only if) the transaction commits.

    This is the producer's hot path, run in every publishing transaction, so the SQL is
    compiled once per shape (dialect, row count, columns in use) and run with
    ``exec_driver_sql`` (SQLAlchemy's cursor events still see it); values are converted by
    the columns' own types.
    """
    dialect = connection.dialect
    notify = notify and dialect.name == "postgresql"
    for start in range(0, len(messages), _MAX_ROWS_PER_STATEMENT):
        rows = [_row(m, dialect) for m in messages[start : start + _MAX_ROWS_PER_STATEMENT]]
        used = frozenset(name for name in _OPTIONAL if any(row[name] is not None for row in rows))
        columns, plan = _plan(dialect, len(rows), used, notify)
        values = {f"{name}_{i}": row[name] for i, row in enumerate(rows) for name in columns}
        connection.exec_driver_sql(plan.sql, plan.parameters(values))


@lru_cache(maxsize=256)
def _plan(
    dialect: Dialect, rows: int, optional: frozenset[str], notify: bool
) -> tuple[tuple[str, ...], Compiled]:
    columns = _ALWAYS + tuple(name for name in _OPTIONAL if name in optional)
    value_rows = []
    for i in range(rows):
        row: dict[str, Any] = {
            name: bindparam(f"{name}_{i}", type_=outbox.c[name].type)
            for name in columns
            if name != "delay"
        }
        # The earliest send time is computed by the database from a per-row delay, so
        # every relay and producer agrees on one clock.
        row["available_at"] = later(dialect.name, f"delay_{i}")
        value_rows.append(row)
    stmt = insert(outbox).values(value_rows)
    if notify:
        channel: Any = literal_column(f"'{NOTIFY_CHANNEL}'")
        stmt = stmt.returning(func.pg_notify(channel, literal_column("''")))
    return columns, Compiled.of(stmt, dialect)


def _row(message: NewMessage, dialect: Dialect) -> dict[str, Any]:
    env = message.envelope
    delay = clock_params(dialect.name, delay=message.delay)["delay"]
    return {
        "message_id": env.message_id,
        "message_type": env.type,
        "destination": env.destination,
        "payload": env.payload,
        "occurred_at": env.occurred_at,
        "delay": delay,
        "message_key": env.key,
        "headers": json.dumps(dict(env.headers), separators=(",", ":")) if env.headers else None,
        "content_type": None if env.content_type == CONTENT_TYPE_JSON else env.content_type,
        "correlation_id": env.correlation_id,
        "causation_id": env.causation_id,
        "traceparent": env.traceparent,
        "tracestate": env.tracestate,
        "target_handler": env.handler,
        "handler_attempt": None if env.attempt == 1 else env.attempt,
    }
