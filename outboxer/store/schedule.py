"""SQL for scheduled handlers: one row per scheduled handler, claimed once per tick.

A tick is a slot of the schedule on the database clock: tick ``n`` of a handler run every
``every`` seconds starts at ``n * every`` seconds after the Unix epoch. The replica whose
conditional ``UPDATE`` claims the current tick runs it; every other replica's update of
that tick matches no row. A tick is claimed when the last run began (``ran_at``, the
database clock) before the tick did: comparing times, not tick numbers, a schedule whose
``every`` changed between deploys runs at the first tick of its new interval that begins
after its last run (every minute, then every hour: at the next full hour), where tick
numbers of the new interval could stay below the stored one forever. ``last_tick`` still
holds the claimed tick's number, as older outboxers wrote and compare it: replicas of both
kinds, with the same ``every``, run each tick once between them (an older one claims
when ``last_tick`` is below the tick's number, and a claim of either kind sets both).
The same update takes a lease
(``locked_by``/``locked_until``), renewed while the run lasts and given back when it ends,
so a run longer than the interval is not overlapped by the next tick, and a replica that
died in a run holds the schedule only until the lease expires.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..tables import schedules
from .clock import clock_params, later, now, read_db_now

__all__ = ["claim_tick", "ensure_schedule", "release_tick", "renew_lease"]


def ensure_schedule(connection: Connection, name: str) -> None:
    """Create the row of scheduled handler ``name`` if it does not exist (any replica may
    race to create it; the loser's insert is ignored). Commits."""
    with connection.begin():
        exists = connection.execute(
            select(schedules.c.name).where(schedules.c.name == name)
        ).first()
    if exists is not None:
        return
    try:
        with connection.begin():
            connection.execute(insert(schedules).values(name=name, last_tick=-1))
    except IntegrityError:  # another replica created it meanwhile
        pass


def claim_tick(
    connection: Connection, *, name: str, every: float, owner: str, lease: float
) -> int | None:
    """Claim the current tick of ``name`` for ``owner`` (a lease of ``lease`` seconds);
    the tick's number, or None when another replica has it or a run still holds the lease.
    Commits."""
    dialect = connection.dialect.name
    with connection.begin():
        current = read_db_now(connection)
        tick = math.floor(current.timestamp() / every)
        began = datetime.fromtimestamp(tick * every, timezone.utc)
        params = clock_params(dialect, lease=lease)
        claimed = connection.execute(
            update(schedules)
            .where(
                schedules.c.name == name,
                or_(
                    schedules.c.ran_at.is_(None),
                    schedules.c.ran_at < bindparam("began", began, type_=schedules.c.ran_at.type),
                ),
                or_(schedules.c.locked_until.is_(None), schedules.c.locked_until < now(dialect)),
            )
            .values(
                last_tick=tick,
                locked_by=owner,
                locked_until=later(dialect, "lease"),
                ran_at=now(dialect),
            ),
            params,
        )
    return tick if claimed.rowcount == 1 else None


def release_tick(connection: Connection, *, name: str, owner: str) -> None:
    """Give the lease back after a run. Commits."""
    with connection.begin():
        connection.execute(
            update(schedules)
            .where(and_(schedules.c.name == name, schedules.c.locked_by == owner))
            .values(locked_by=None, locked_until=None)
        )


def renew_lease(connection: Connection, *, name: str, owner: str, lease: float) -> None:
    """Extend ``owner``'s lease on ``name`` (if it holds one) to ``lease`` seconds from now.
    Commits."""
    dialect = connection.dialect.name
    with connection.begin():
        connection.execute(
            update(schedules)
            .where(and_(schedules.c.name == name, schedules.c.locked_by == owner))
            .values(locked_until=later(dialect, "lease")),
            clock_params(dialect, lease=lease),
        )
