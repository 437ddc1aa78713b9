"""SQLite: dead-letter ids are never reused (AUTOINCREMENT).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30

SQLite gives a plain INTEGER PRIMARY KEY the largest id plus one: once the newest dead
letter is deleted (replayed, purged), the next one takes its id, and an operator's
`outboxer dead-letter replay ID` acts on another letter. AUTOINCREMENT never reuses an id.
SQLite cannot change a table's key in place: the table is rebuilt (batch mode), its rows,
ids and indexes kept. PostgreSQL's and MariaDB's sequences never reuse ids: nothing to do.
"""

from __future__ import annotations

from alembic import op

from outboxer.migration_steps import Steps

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

step = Steps(revision)  # a killed run's leftover copy of the table is dropped first


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)


def _rebuild(*, autoincrement: bool) -> None:
    """SQLite: the dead-letter table made again, with or without AUTOINCREMENT."""
    if op.get_bind().dialect.name == "sqlite":
        step.drop_leftover_copy("outboxer_dead_letter")
        with op.batch_alter_table(
            "outboxer_dead_letter",
            recreate="always",
            table_kwargs={"sqlite_autoincrement": autoincrement},
        ):
            pass
