"""Create outboxer_outbox, outboxer_inbox and outboxer_dead_letter.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from outboxer.migration_steps import Steps
from outboxer.tables import MYSQL_TABLE_OPTIONS, OUTBOX_AUTOVACUUM, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

step = Steps(revision)  # a rerun keeps what a killed run of it made (migration_steps)


def _big_id() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _long_bytes() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


def _long_text() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    step.create_table(
        "outboxer_outbox",
        sa.Column("id", _big_id(), primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("message_type", sa.String(255), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("message_key", sa.String(255), nullable=True),
        sa.Column("payload", _long_bytes(), nullable=False),
        sa.Column("headers", _long_text(), nullable=True),
        sa.Column(
            "content_type", sa.String(100), nullable=False, server_default="application/json"
        ),
        sa.Column("correlation_id", sa.String(255), nullable=True),
        sa.Column("causation_id", sa.String(255), nullable=True),
        sa.Column("traceparent", sa.String(64), nullable=True),
        sa.Column("tracestate", sa.String(512), nullable=True),
        sa.Column("target_handler", sa.String(255), nullable=True),
        sa.Column("handler_attempt", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("available_at", UTCDateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", _long_text(), nullable=True),
        sa.Column("first_failed_at", UTCDateTime(), nullable=True),
        sa.Column("locked_by", sa.String(64), nullable=True),
        sa.Column("locked_until", UTCDateTime(), nullable=True),
        **MYSQL_TABLE_OPTIONS,
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(OUTBOX_AUTOVACUUM)
    step.create_index("ix_outboxer_outbox_pending", "outboxer_outbox", ["available_at", "id"])
    step.create_index("ix_outboxer_outbox_key", "outboxer_outbox", ["message_key", "id"])

    step.create_table(
        "outboxer_sent",
        sa.Column("id", _big_id(), primary_key=True, autoincrement=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("message_type", sa.String(255), nullable=False),
        sa.Column("destination", sa.String(255), nullable=False),
        sa.Column("message_key", sa.String(255), nullable=True),
        sa.Column("payload", _long_bytes(), nullable=False),
        sa.Column("headers", _long_text(), nullable=True),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("correlation_id", sa.String(255), nullable=True),
        sa.Column("causation_id", sa.String(255), nullable=True),
        sa.Column("traceparent", sa.String(64), nullable=True),
        sa.Column("tracestate", sa.String(512), nullable=True),
        sa.Column("target_handler", sa.String(255), nullable=True),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=False),
        **MYSQL_TABLE_OPTIONS,
    )
    step.create_index("ix_outboxer_sent_sent_at", "outboxer_sent", ["sent_at"])
    step.create_index("ix_outboxer_sent_message_id", "outboxer_sent", ["message_id"])

    step.create_table(
        "outboxer_inbox",
        sa.Column("handler", sa.String(255), nullable=False),
        sa.Column("dedup_key", sa.String(255), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("message_type", sa.String(255), nullable=False),
        sa.Column("processed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("handler", "dedup_key", name="pk_outboxer_inbox"),
        **MYSQL_TABLE_OPTIONS,
    )
    step.create_index("ix_outboxer_inbox_processed_at", "outboxer_inbox", ["processed_at"])

    step.create_table(
        "outboxer_dead_letter",
        sa.Column("id", _big_id(), primary_key=True, autoincrement=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=True),
        sa.Column("message_type", sa.String(255), nullable=True),
        sa.Column("destination", sa.String(255), nullable=True),
        sa.Column("message_key", sa.String(255), nullable=True),
        sa.Column("consumer", sa.String(255), nullable=True),
        sa.Column("handler", sa.String(255), nullable=True),
        sa.Column("payload", _long_bytes(), nullable=False),
        sa.Column("headers", _long_text(), nullable=True),
        sa.Column("content_type", sa.String(100), nullable=True),
        sa.Column("correlation_id", sa.String(255), nullable=True),
        sa.Column("causation_id", sa.String(255), nullable=True),
        sa.Column("traceparent", sa.String(64), nullable=True),
        sa.Column("tracestate", sa.String(512), nullable=True),
        sa.Column("occurred_at", UTCDateTime(), nullable=True),
        sa.Column("error_type", sa.String(255), nullable=False),
        sa.Column("error_message", _long_text(), nullable=False),
        sa.Column("traceback", _long_text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", UTCDateTime(), nullable=False),
        sa.Column("last_failed_at", UTCDateTime(), nullable=False),
        sa.Column("replayed_at", UTCDateTime(), nullable=True),
        **MYSQL_TABLE_OPTIONS,
    )
    step.create_index("ix_outboxer_dead_letter_failed", "outboxer_dead_letter", ["last_failed_at"])
    step.create_index(
        "ix_outboxer_dead_letter_handler", "outboxer_dead_letter", ["handler", "last_failed_at"]
    )


def downgrade() -> None:
    op.drop_table("outboxer_sent")
    op.drop_table("outboxer_dead_letter")
    op.drop_table("outboxer_inbox")
    op.drop_table("outboxer_outbox")
