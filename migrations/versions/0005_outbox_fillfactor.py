"""PostgreSQL: the outbox's pages are filled half, so that a claim's lease is a HOT update.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29

Only pages written from now on are filled half; the outbox's rows are short-lived, so the
whole table follows within a backlog's lifetime. The ALTER takes a SHARE UPDATE EXCLUSIVE
lock: publishers and relays go on meanwhile.
"""

from __future__ import annotations

from alembic import op

from outboxer.tables import OUTBOX_FILLFACTOR

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(OUTBOX_FILLFACTOR)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE outboxer_outbox RESET (fillfactor)")
