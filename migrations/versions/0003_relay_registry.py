"""Create outboxer_relay: running relays, so a dead relay's leases are taken over at once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from outboxer.migration_steps import Steps
from outboxer.tables import MYSQL_TABLE_OPTIONS, UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

step = Steps(revision)  # a rerun keeps what a killed run of it made (migration_steps)


def upgrade() -> None:
    step.create_table(
        "outboxer_relay",
        sa.Column("relay_id", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        **MYSQL_TABLE_OPTIONS,
    )


def downgrade() -> None:
    op.drop_table("outboxer_relay")
