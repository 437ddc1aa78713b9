"""SQL for relay liveness: the registry of running relays, and the lock each one holds.

A relay registers in ``outboxer_relay`` and takes a lock that lives exactly as long as its
database session: a session-level advisory lock on PostgreSQL, a named lock (``GET_LOCK``)
on MariaDB/MySQL. When the relay process dies, its connection closes and the server drops
the lock at once, so any other relay can tell, with one cheap query, that the rows the
dead relay leased are free (:mod:`outboxer.store.leases`). SQLite runs one relay: every
other registered relay counts as dead.

These functions take a connection outside a transaction and commit their own writes.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.engine import Connection

from ..tables import relays
from .clock import db_now, db_now_plus

__all__ = [
    "dead_relays",
    "deregister",
    "forget",
    "heartbeat",
    "lock",
    "register",
    "registered",
]

_PG_NAMESPACE = 0x6F627831
"""First key of outboxer's two-key advisory locks ('obx1'); the second comes from the id."""


def _pg_key(relay_id: str) -> int:
    return int(relay_id[:8], 16) & 0x7FFFFFFF


_MYSQL_LOCK_NAME = "CONCAT('outboxer:', MD5(CONCAT(DATABASE(), ':', {})))"
"""Named locks are server-wide: the database's name keeps two databases apart."""


def lock(connection: Connection, relay_id: str) -> bool:
    """Take ``relay_id``'s liveness lock on this connection's session; False if taken."""
    name = connection.dialect.name
    if name == "postgresql":
        got = connection.execute(
            text("SELECT pg_try_advisory_lock(:ns, :key)"),
            {"ns": _PG_NAMESPACE, "key": _pg_key(relay_id)},
        ).scalar_one()
    elif name in ("mysql", "mariadb"):
        got = connection.execute(
            text(f"SELECT GET_LOCK({_MYSQL_LOCK_NAME.format(':id')}, 0)"), {"id": relay_id}
        ).scalar_one()
    else:
        got = True
    connection.commit()
    return bool(got)


def register(connection: Connection, relay_id: str, name: str) -> None:
    with connection.begin():
        now = db_now(connection.dialect)
        connection.execute(
            insert(relays).values(relay_id=relay_id, name=name[:255], started_at=now, seen_at=now)
        )


def heartbeat(connection: Connection, relay_id: str) -> None:
    with connection.begin():
        connection.execute(
            update(relays)
            .where(relays.c.relay_id == relay_id)
            .values(seen_at=db_now(connection.dialect))
        )


def deregister(connection: Connection, relay_id: str) -> None:
    forget(connection, [relay_id])


def forget(connection: Connection, relay_ids: list[str]) -> None:
    """Drop registry rows (of relays gone long enough that none of their leases is left)."""
    if relay_ids:
        with connection.begin():
            connection.execute(delete(relays).where(relays.c.relay_id.in_(relay_ids)))


def registered(connection: Connection) -> list[str]:
    """The ids of every registered relay, alive or not."""
    with connection.begin():
        return list(connection.execute(select(relays.c.relay_id)).scalars())


def dead_relays(connection: Connection, me: str) -> dict[str, datetime]:
    """Registered relays other than ``me`` that hold no liveness lock, with when each was
    last seen alive (its last heartbeat)."""
    name = connection.dialect.name
    with connection.begin():
        registered = {
            row.relay_id: row.seen_at
            for row in connection.execute(select(relays.c.relay_id, relays.c.seen_at))
            if row.relay_id != me
        }
        if not registered or name not in ("postgresql", "mysql", "mariadb"):
            return registered
        if name == "postgresql":
            held = set(
                connection.execute(
                    text(
                        "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' "
                        "AND objsubid = 2 AND granted AND classid = CAST(:ns AS oid) "
                        "AND database = (SELECT oid FROM pg_database "
                        "WHERE datname = current_database())"
                    ),
                    {"ns": _PG_NAMESPACE},
                ).scalars()
            )
            return {r: seen for r, seen in registered.items() if _pg_key(r) not in held}
        dead = {}
        for relay_id, seen in registered.items():
            holder = connection.execute(
                text(f"SELECT IS_USED_LOCK({_MYSQL_LOCK_NAME.format(':id')})"), {"id": relay_id}
            ).scalar_one()
            if holder is None:
                dead[relay_id] = seen
        return dead


def seen_before(connection: Connection, seconds: float) -> datetime:
    """The database time ``seconds`` ago (to tell how long a dead relay has been gone)."""
    with connection.begin():
        moment: datetime = connection.execute(
            select(db_now_plus(connection.dialect, -seconds))
        ).scalar_one()
    return moment
