"""SQL on ``outboxer_outbox``: the producer's insert, sized to what the database accepts."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import bindparam, func, insert, literal_column, select, text
from sqlalchemy.engine import Connection, Dialect, Engine

from ..errors import MessageTooLarge
from ..message import CONTENT_TYPE_JSON, Envelope
from ..tables import outbox
from .clock import clock_params, later
from .compiled import Compiled

__all__ = [
    "NOTIFY_CHANNEL",
    "NewMessage",
    "check_size",
    "insert_messages",
    "inserted_prefix",
    "learn_statement_limit",
]

NOTIFY_CHANNEL = "outboxer_outbox"
"""The PostgreSQL channel a producer notifies after inserting messages; relays LISTEN on it."""

_MAX_ROWS_PER_STATEMENT = 500
# One statement's values stay under this many bytes where the database sets no lower limit
# (it bounds the memory of one INSERT; PostgreSQL and SQLite take parameters apart from
# the SQL text).
_MAX_STATEMENT_BYTES = 32 * 1024 * 1024
# Room for the SQL text around the values (about 250 bytes a row at 500 rows) and the
# protocol's framing, in a MariaDB/MySQL packet.
_STATEMENT_MARGIN = 256 * 1024
_ROW_OVERHEAD = 256  # ids, timestamps, quotes and commas of one row, beyond its strings
# The largest value one column holds: PostgreSQL's bytea and SQLite's SQLITE_MAX_LENGTH.
_FIELD_LIMITS = {"postgresql": (1 << 30) - 1, "sqlite": 1_000_000_000}
_MYSQL = ("mysql", "mariadb")
_packet_limits: WeakKeyDictionary[Engine, int] = WeakKeyDictionary()
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
    connection: Connection,
    messages: Sequence[NewMessage],
    *,
    notify: bool = True,
    inserted: Callable[[int], None] | None = None,
) -> None:
    """Insert ``messages`` with multi-row INSERTs in the connection's transaction.

    One statement holds up to 500 rows, and no more bytes than the database accepts in one
    statement (MariaDB/MySQL: ``max_allowed_packet``, read once per engine); a message that
    cannot fit alone raises :class:`~outboxer.MessageTooLarge` before anything is sent.

    ``inserted(n)`` is called after each statement with the number of messages it stored
    (the first ``n`` not yet reported), so a caller can forget exactly what is stored.

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
    budget = _statement_budget(dialect.name, learn_statement_limit(connection))
    for chunk in _chunks(messages, dialect.name, budget):
        rows = [_row(m, dialect) for m in chunk]
        used = frozenset(name for name in _OPTIONAL if any(row[name] is not None for row in rows))
        columns, plan = _plan(dialect, len(rows), used, notify)
        values = {f"{name}_{i}": row[name] for i, row in enumerate(rows) for name in columns}
        connection.exec_driver_sql(plan.sql, plan.parameters(values))
        if inserted is not None:
            inserted(len(chunk))


def inserted_prefix(connection: Connection, messages: Sequence[NewMessage]) -> int:
    """How many of the first ``messages`` the connection's transaction holds already: after
    an INSERT whose outcome is unknown (one statement holds at most 500 rows, so the first
    500 are asked about). A message is matched by its id and its publish time, so a
    committed row of another transaction with the same explicit message_id does not count.
    One SELECT."""
    head = messages[:_MAX_ROWS_PER_STATEMENT]
    found = {
        (row.message_id, row.occurred_at)
        for row in connection.execute(
            select(outbox.c.message_id, outbox.c.occurred_at).where(
                outbox.c.message_id.in_([m.envelope.message_id for m in head])
            )
        )
    }
    count = 0
    for message in head:
        if (message.envelope.message_id, message.envelope.occurred_at) not in found:
            break
        count += 1
    return count


def learn_statement_limit(connection: Connection) -> int | None:
    """The most bytes one statement may have on ``connection``'s database, if it has a
    limit below outboxer's own: MariaDB/MySQL's ``max_allowed_packet``, read on the first
    call for each engine and remembered (later calls do no I/O)."""
    if connection.dialect.name not in _MYSQL:
        return None
    engine = connection.engine
    limit = _packet_limits.get(engine)
    if limit is None:
        limit = int(connection.execute(text("SELECT @@max_allowed_packet")).scalar_one())
        _packet_limits[engine] = limit
    return limit


def check_size(message: NewMessage, engine: Engine) -> None:
    """Raise :class:`~outboxer.MessageTooLarge` if ``message`` cannot be stored through
    ``engine``, as far as that is known without I/O (MariaDB's limit is known once a
    connection of this engine has been used by outboxer; until then the INSERT checks)."""
    name = engine.dialect.name
    _check_fits(message, name, _statement_budget(name, _packet_limits.get(engine)))


def _statement_budget(dialect_name: str, packet_limit: int | None) -> int:
    if packet_limit is None:
        return _MAX_STATEMENT_BYTES
    return max(packet_limit - _STATEMENT_MARGIN, packet_limit // 2)


def _chunks(
    messages: Sequence[NewMessage], dialect_name: str, budget: int
) -> Iterator[Sequence[NewMessage]]:
    start, size = 0, 0
    for i, message in enumerate(messages):
        row_size = _check_fits(message, dialect_name, budget)
        if i > start and (i - start == _MAX_ROWS_PER_STATEMENT or size + row_size > budget):
            yield messages[start:i]
            start, size = i, 0
        size += row_size
    if start < len(messages):
        yield messages[start:]


def _check_fits(message: NewMessage, dialect_name: str, budget: int) -> int:
    """The bytes ``message`` takes in an INSERT; raises if it cannot fit in one."""
    size = _row_size(message.envelope, dialect_name)
    if dialect_name in _MYSQL:
        if size > budget:
            raise MessageTooLarge(
                f"message {message.envelope.type!r} ({message.envelope.message_id}) takes "
                f"{size} bytes in an INSERT; the database's max_allowed_packet is "
                f"{budget + _STATEMENT_MARGIN} bytes, {_STATEMENT_MARGIN} of which are kept "
                "for the statement. Raise max_allowed_packet on the server (SET GLOBAL "
                "max_allowed_packet=..., and in the [mysqld] section of its configuration), "
                "or publish a smaller payload: keep the large data elsewhere and publish a "
                "reference to it"
            )
    elif len(message.envelope.payload) > _FIELD_LIMITS.get(dialect_name, 1 << 62):
        raise MessageTooLarge(
            f"message {message.envelope.type!r} ({message.envelope.message_id}) has a "
            f"payload of {len(message.envelope.payload)} bytes; {dialect_name} stores at most "
            f"{_FIELD_LIMITS[dialect_name]} bytes in one column. Publish a smaller payload: "
            "keep the large data elsewhere and publish a reference to it"
        )
    return size


def _row_size(env: Envelope, dialect_name: str) -> int:
    payload = len(env.payload)
    strings = sum(
        len(value)
        for value in (
            env.type,
            env.destination,
            env.key,
            env.correlation_id,
            env.causation_id,
            env.traceparent,
            env.tracestate,
            env.handler,
            env.content_type,
        )
        if value
    ) + sum(len(k) + len(v) + 6 for k, v in env.headers.items())
    if dialect_name in _MYSQL:
        # Values are quoted into the SQL text: PyMySQL sends bytes in hex (two characters
        # a byte), other drivers escape them (up to two); strings may be escaped and UTF-8.
        payload *= 2
        strings *= 2 * 4
    return payload + strings + _ROW_OVERHEAD


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
