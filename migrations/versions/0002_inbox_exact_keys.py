"""Inbox dedup keys compare exactly on MariaDB/MySQL: VARBINARY instead of utf8mb4_bin.

``utf8mb4_bin`` is a PAD SPACE collation: ``'order-42'`` and ``'order-42 '`` were one key,
so a distinct message was skipped as a duplicate. A binary column compares bytes. Other
databases are unchanged.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from outboxer.migration_steps import Steps

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

step = Steps(revision)  # a rerun after a killed run of it: an altered column is kept


def upgrade() -> None:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        step.alter_column_type(
            "outboxer_inbox",
            "dedup_key",
            existing_type=sa.String(255),
            type_=mysql.VARBINARY(1020),
            nullable=False,
        )


def downgrade() -> None:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        op.alter_column(
            "outboxer_inbox",
            "dedup_key",
            existing_type=mysql.VARBINARY(1020),
            type_=sa.String(255),
            existing_nullable=False,
        )
