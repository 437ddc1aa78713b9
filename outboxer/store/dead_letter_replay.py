"""SQL for replaying dead letters: claiming one letter for one replay, and walking the
letters of a filter in batches, bounded when the walk starts (replay-all, purge).

Every function runs in the caller's transaction.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Connection

from ..tables import dead_letter
from .clock import db_now
from .dead_letters import DeadLetterFilter

__all__ = ["claim_for_replay", "ids_matching", "newest_matching"]


def claim_for_replay(connection: Connection, dead_letter_id: int, *, keep: bool) -> bool:
    """Take ``dead_letter_id`` out of the waiting letters: delete it, or with ``keep`` mark it
    replayed. False when another transaction did first (the caller then sends nothing).

    The write itself is the claim: PostgreSQL and MariaDB hold the row lock already
    (``get_dead_letter(for_update=True)``), but SQLite reads without a lock, so two replays
    of one letter may both have read it; only one of them changes the row.
    """
    waiting = (dead_letter.c.id == dead_letter_id) & dead_letter.c.replayed_at.is_(None)
    if keep:
        statement = (
            update(dead_letter).where(waiting).values(replayed_at=db_now(connection.dialect))
        )
        result = connection.execute(statement)
    else:
        result = connection.execute(delete(dead_letter).where(waiting))
    return result.rowcount == 1


def newest_matching(connection: Connection, where: DeadLetterFilter) -> int:
    """The largest id matching ``where`` now (0 when none): a bulk command stops there, so
    the letters written while it runs (its own replays failing again) are not in it."""
    newest = connection.execute(
        select(func.max(dead_letter.c.id)).where(*where.conditions())
    ).scalar()
    return int(newest or 0)


def ids_matching(
    connection: Connection, where: DeadLetterFilter, *, after_id: int, up_to_id: int, limit: int
) -> list[int]:
    """Ids in ascending order after ``after_id``, up to ``up_to_id``: for walking a filter
    in small batches."""
    return list(
        connection.execute(
            select(dead_letter.c.id)
            .where(*where.conditions(), dead_letter.c.id > after_id, dead_letter.c.id <= up_to_id)
            .order_by(dead_letter.c.id)
            .limit(limit)
        ).scalars()
    )
