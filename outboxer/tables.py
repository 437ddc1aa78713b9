"""The outboxer tables: ``outboxer_outbox``, ``outboxer_inbox``, ``outboxer_dead_letter``.

``outboxer.metadata`` holds them; ``outboxer.create_all(engine)`` creates them for a quick
start, and the Alembic migrations in ``migrations/`` (``outboxer db upgrade``) are the
production path. A test checks that both give the same schema on every database.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Dialect,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    Uuid,
    event,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import DateTime, TypeDecorator

from .message import CONTENT_TYPE_JSON
from .times import ABOVE, BELOW, EARLIEST, LATEST

__all__ = [
    "DedupKey",
    "UTCDateTime",
    "create_all",
    "dead_letter",
    "drop_all",
    "inbox",
    "metadata",
    "outbox",
    "relays",
    "sent",
]


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database.

    PostgreSQL stores ``timestamptz``; MariaDB/MySQL store ``DATETIME(6)`` in UTC and
    SQLite an ISO string in UTC. Values are put in UTC in Python before they are stored,
    on every database (a time whose UTC date Python cannot hold is refused, not stored as
    a year PostgreSQL can write and no read can load); values read back are always aware
    UTC datetimes. PostgreSQL reads a stored time outside :data:`~outboxer.times.EARLIEST`
    to :data:`~outboxer.times.LATEST` (a row of an older outboxer, or written by hand) as
    :data:`~outboxer.times.BELOW` or :data:`~outboxer.times.ABOVE`, which every session's
    time zone and Python can hold: see :class:`_ReadableTime`.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"outboxer stores aware datetimes only, got naive {value!r}")
        if value.tzinfo is not timezone.utc:
            try:
                value = value.astimezone(timezone.utc)
            except (OverflowError, ValueError) as exc:
                raise ValueError(
                    f"{value.isoformat()} cannot be stored: it is outside the years 1 to "
                    "9999 once in UTC"
                ) from exc
        if dialect.name == "postgresql":
            return value
        return value.replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def column_expression(self, colexpr: Any) -> Any:
        return _ReadableTime(colexpr, type_=self)


class _ReadableTime(FunctionElement[datetime]):
    """A :class:`UTCDateTime` in a SELECT's columns or a RETURNING: on PostgreSQL, a
    stored time before :data:`~outboxer.times.EARLIEST` reads as
    :data:`~outboxer.times.BELOW`, one after :data:`~outboxer.times.LATEST` as
    :data:`~outboxer.times.ABOVE`; other databases read the column as it is.

    psycopg cannot load a time before the year 1 or after 9999 *in the session's time
    zone* (``0001-12-31 10:00:00+00 BC``, ``infinity``): it raised ``DataError`` for the
    whole result, so one such row stopped every relay claim and every dead-letter list.
    The relay dead-letters a row whose occurred-at reads outside the range
    (:func:`outboxer.store.relay.claimed_from_row`). Three comparisons per value, in the
    database."""

    name = "outboxer_readable_time"
    inherit_cache = True

    def __init__(self, column: Any, type_: UTCDateTime) -> None:
        super().__init__(column)
        self.type = type_


@compiles(_ReadableTime)
def _as_stored(element: _ReadableTime, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@compiles(_ReadableTime, "postgresql")
def _readable_in_every_zone(element: _ReadableTime, compiler: Any, **kw: Any) -> str:
    value = compiler.process(element.clauses, **kw)
    return (
        f"CASE WHEN {value} < TIMESTAMPTZ '{EARLIEST.isoformat()}' "
        f"THEN TIMESTAMPTZ '{BELOW.isoformat()}' "
        f"WHEN {value} > TIMESTAMPTZ '{LATEST.isoformat()}' "
        f"THEN TIMESTAMPTZ '{ABOVE.isoformat()}' ELSE {value} END"
    )


def _big_id() -> Any:
    # SQLite only auto-increments an INTEGER PRIMARY KEY.
    return BigInteger().with_variant(Integer, "sqlite")


def _long_bytes() -> Any:
    # MariaDB's BLOB stops at 64 KiB; payloads may be larger.
    return LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


class DedupKey(TypeDecorator[str]):
    """An inbox dedup key: text that compares exactly, trailing spaces included.

    PostgreSQL and SQLite compare ``VARCHAR`` exactly. On MariaDB/MySQL the key is stored
    as ``VARBINARY(1020)`` (255 characters of UTF-8), because ``utf8mb4_bin`` is a PAD
    SPACE collation there; values are still ``str`` in Python.
    """

    impl = String(255)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(1020))
        return dialect.type_descriptor(String(255))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, str) and dialect.name in ("mysql", "mariadb"):
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("utf-8")
        return value


def _long_text() -> Any:
    return Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


metadata = MetaData()

# MariaDB/MySQL: binary collation, so keys compare exactly as on PostgreSQL and SQLite
# (a case-insensitive collation would make inbox keys "ABC" and "abc" collide).
MYSQL_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

outbox = Table(
    "outboxer_outbox",
    metadata,
    Column("id", _big_id(), primary_key=True, autoincrement=True),
    Column("message_id", Uuid(), nullable=False),
    Column("message_type", String(255), nullable=False),
    Column("destination", String(255), nullable=False),
    Column("message_key", String(255), nullable=True),
    Column("payload", _long_bytes(), nullable=False),
    Column("headers", _long_text(), nullable=True),
    Column("content_type", String(100), nullable=False, server_default=CONTENT_TYPE_JSON),
    # NULL: the message is the root of its conversation (correlation id = its own id).
    Column("correlation_id", String(255), nullable=True),
    Column("causation_id", String(255), nullable=True),
    Column("traceparent", String(64), nullable=True),
    Column("tracestate", String(512), nullable=True),
    Column("target_handler", String(255), nullable=True),
    Column("handler_attempt", Integer, nullable=False, server_default="1"),
    Column("occurred_at", UTCDateTime(), nullable=False),
    # Earliest send time: now for ordinary messages, later for delay= and for backoff.
    Column("available_at", UTCDateTime(), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", _long_text(), nullable=True),
    Column("first_failed_at", UTCDateTime(), nullable=True),
    # The lease: which relay claimed the row, and until when.
    Column("locked_by", String(64), nullable=True),
    Column("locked_until", UTCDateTime(), nullable=True),
    # Every row here is pending: sent rows are deleted, or moved to outboxer_sent under
    # relay retention. So the indexes hold pending rows only, and their order serves the
    # claims directly.
    # Claims: pending rows by due time.
    Index("ix_outboxer_outbox_pending", "available_at", "id"),
    # Per-key order: the earliest pending row of a key, and its followers.
    Index("ix_outboxer_outbox_key", "message_key", "id"),
    **MYSQL_TABLE_OPTIONS,
)

sent = Table(
    "outboxer_sent",
    metadata,
    # The outbox row's id: the order in which the messages were committed.
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    ),
    Column("message_id", Uuid(), nullable=False),
    Column("message_type", String(255), nullable=False),
    Column("destination", String(255), nullable=False),
    Column("message_key", String(255), nullable=True),
    Column("payload", _long_bytes(), nullable=False),
    Column("headers", _long_text(), nullable=True),
    Column("content_type", String(100), nullable=False),
    Column("correlation_id", String(255), nullable=True),
    Column("causation_id", String(255), nullable=True),
    Column("traceparent", String(64), nullable=True),
    Column("tracestate", String(512), nullable=True),
    Column("target_handler", String(255), nullable=True),
    Column("occurred_at", UTCDateTime(), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("sent_at", UTCDateTime(), nullable=False),
    Index("ix_outboxer_sent_sent_at", "sent_at"),
    Index("ix_outboxer_sent_message_id", "message_id"),
    **MYSQL_TABLE_OPTIONS,
)
"""Sent messages kept for ``retention`` seconds (relay option), then pruned."""

relays = Table(
    "outboxer_relay",
    metadata,
    # A running relay: its lease tokens start with this id. It holds a database lock named
    # after the id for as long as it lives, so other relays know at once when it is gone.
    Column("relay_id", String(16), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("seen_at", UTCDateTime(), nullable=False),
    **MYSQL_TABLE_OPTIONS,
)
"""Running relays (see docs/relay.md, "A relay that dies")."""

schedules = Table(
    "outboxer_schedule",
    metadata,
    # A scheduled handler (consumer:handler): the number of the last tick a replica
    # claimed, when that run began (ran_at: claims compare it with the tick's start), and
    # the lease of the run in progress (see store.schedule).
    Column("name", String(255), primary_key=True),
    Column("last_tick", BigInteger, nullable=False),
    Column("locked_by", String(64), nullable=True),
    Column("locked_until", UTCDateTime(), nullable=True),
    Column("ran_at", UTCDateTime(), nullable=True),
    **MYSQL_TABLE_OPTIONS,
)
"""Scheduled handlers' ticks: one replica runs each (see docs/consumers.md, "Scheduled")."""

inbox = Table(
    "outboxer_inbox",
    metadata,
    Column("handler", String(255), nullable=False),
    # The message id, or the business key a handler deduplicates on (long keys hashed,
    # see store.inbox.stored_key). Binary on MariaDB/MySQL: their utf8mb4_bin is a PAD
    # SPACE collation, where 'order-42' and 'order-42 ' would be one key.
    Column("dedup_key", DedupKey(), nullable=False),
    Column("message_id", Uuid(), nullable=False),
    Column("message_type", String(255), nullable=False),
    Column("processed_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("handler", "dedup_key", name="pk_outboxer_inbox"),
    Index("ix_outboxer_inbox_processed_at", "processed_at"),
    **MYSQL_TABLE_OPTIONS,
)

dead_letter = Table(
    "outboxer_dead_letter",
    metadata,
    Column("id", _big_id(), primary_key=True, autoincrement=True),
    # relay: could not be sent; handler: a handler gave up; consumer: could not be decoded.
    Column("origin", String(16), nullable=False),
    Column("message_id", Uuid(), nullable=True),
    Column("message_type", String(255), nullable=True),
    Column("destination", String(255), nullable=True),
    Column("message_key", String(255), nullable=True),
    Column("consumer", String(255), nullable=True),
    Column("handler", String(255), nullable=True),
    Column("payload", _long_bytes(), nullable=False),
    Column("headers", _long_text(), nullable=True),
    Column("content_type", String(100), nullable=True),
    Column("correlation_id", String(255), nullable=True),
    Column("causation_id", String(255), nullable=True),
    Column("traceparent", String(64), nullable=True),
    Column("tracestate", String(512), nullable=True),
    Column("occurred_at", UTCDateTime(), nullable=True),
    Column("error_type", String(255), nullable=False),
    Column("error_message", _long_text(), nullable=False),
    Column("traceback", _long_text(), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("first_failed_at", UTCDateTime(), nullable=False),
    Column("last_failed_at", UTCDateTime(), nullable=False),
    # Kept after a replay only when asked (history); list() hides replayed rows.
    Column("replayed_at", UTCDateTime(), nullable=True),
    Index("ix_outboxer_dead_letter_failed", "last_failed_at"),
    Index("ix_outboxer_dead_letter_handler", "handler", "last_failed_at"),
    # SQLite: AUTOINCREMENT, or the id of the newest letter, once deleted, is given to the
    # next one, and `outboxer dead-letter replay ID` would act on a letter never looked at.
    sqlite_autoincrement=True,
    **MYSQL_TABLE_OPTIONS,
)


OUTBOX_AUTOVACUUM = (
    "ALTER TABLE outboxer_outbox SET (autovacuum_vacuum_scale_factor = 0, "
    "autovacuum_vacuum_threshold = 10000, autovacuum_analyze_scale_factor = 0, "
    "autovacuum_analyze_threshold = 10000)"
)
"""PostgreSQL: vacuum the outbox after every 10,000 dead rows, not a fraction of the table.

Every sent message leaves a dead row (deleted, or updated under retention) whose index
entries stay until VACUUM removes them; with the default scale factor a busy outbox
would carry hundreds of thousands of them and every claim would step over them.
"""

OUTBOX_FILLFACTOR = "ALTER TABLE outboxer_outbox SET (fillfactor = 50)"
"""PostgreSQL: fill the outbox's pages half, so that a claim's lease is a HOT update.

A claim rewrites ``locked_by`` and ``locked_until`` of every row it takes. Neither is
indexed, so PostgreSQL can write the new row version on the same page without touching
the table's three indexes, if the page has room: this leaves it. PostgreSQL then spends less
CPU per relayed message (docs/benchmarks.md).
"""

for _ddl in (OUTBOX_AUTOVACUUM, OUTBOX_FILLFACTOR):
    event.listen(
        outbox,
        "after_create",
        DDL(_ddl).execute_if(dialect="postgresql"),  # type: ignore[no-untyped-call]
    )


def create_all(bind: Engine | Connection) -> None:
    """Create the outboxer tables if they do not exist (for quick starts and tests).

    Production deployments use the migrations: ``outboxer db upgrade --db URL``.
    """
    metadata.create_all(bind)


VERSION_TABLE = "outboxer_alembic_version"
"""Where outboxer's migrations record their revision (never the application's table)."""


def drop_all(bind: Engine | Connection) -> None:
    """Drop the outboxer tables and the record of outboxer's migrations, so that
    ``outboxer db upgrade`` makes them again (with the record left behind, it said "up to
    date" about tables that were gone)."""
    metadata.drop_all(bind)
    dialect = bind.dialect
    # PostgreSQL: in the schema the migrations create in, never another schema's on the path.
    where = dialect.default_schema_name if dialect.name == "postgresql" else None
    Table(VERSION_TABLE, MetaData(), Column("version_num", String(32)), schema=where).drop(
        bind, checkfirst=True
    )
