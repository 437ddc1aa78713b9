"""Create outboxer_schedule: the ticks of scheduled handlers, so one replica runs each.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from outboxer.migration_steps import Steps
from outboxer.tables import MYSQL_TABLE_OPTIONS, UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

step = Steps(revision)  # a rerun keeps what a killed run of it made (migration_steps)


def upgrade() -> None:
    step.create_table(
        "outboxer_schedule",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("last_tick", sa.BigInteger(), nullable=False),
        sa.Column("locked_by", sa.String(64), nullable=True),
        sa.Column("locked_until", UTCDateTime(), nullable=True),
        sa.Column("ran_at", UTCDateTime(), nullable=True),
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("outboxer_schedule")
