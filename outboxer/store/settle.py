"""SQL for settling a sent batch: delete (or keep) what was sent, back off what failed,
move the hopeless to the dead-letter table, hand the rest back; and prune kept rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from sqlalchemy import BigInteger, any_, bindparam, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from ..message import Envelope
from ..tables import outbox
from ..tables import sent as sent_table
from .claims import autocommit
from .clock import clock_params, db_now_plus, later, now
from .dead_letters import NewDeadLetter, insert_dead_letters
from .relay import DeadLetterRow, RetryRow

__all__ = ["prune_sent", "release", "settle"]

_KEPT_COLUMNS = (
    "id",
    "message_id",
    "message_type",
    "destination",
    "message_key",
    "payload",
    "headers",
    "content_type",
    "correlation_id",
    "causation_id",
    "traceparent",
    "tracestate",
    "target_handler",
    "occurred_at",
    "attempts",
)
"""What retention keeps of a sent row in ``outboxer_sent`` (plus ``sent_at``)."""


def settle(
    connection: Connection,
    *,
    owner: str,
    sent: Sequence[int] = (),
    retry: Sequence[RetryRow] = (),
    dead: Sequence[DeadLetterRow] = (),
    release_ids: Sequence[int] = (),
    keep_sent: bool = False,
) -> None:
    """Record a batch's results in one transaction.

    Sent rows are deleted (or, with ``keep_sent``, moved to ``outboxer_sent`` for retention);
    retried rows get an attempt, their error and a later due time; dead rows move to the
    dead-letter table; released rows are handed back untouched.
    """
    name = connection.dialect.name
    sql = _statements(name)
    if name == "postgresql" and sent and not (retry or dead or release_ids or keep_sent):
        # The common case, one DELETE: atomic alone, no transaction round trips.
        with autocommit(connection):
            connection.execute(sql.delete, {"ids": list(sent)})
        return
    with connection.begin():
        if sent:
            if keep_sent:
                connection.execute(sql.keep, {"ids": list(sent), **clock_params(name)})
                if sql.keep_moves_only:
                    connection.execute(sql.delete, {"ids": list(sent)})
            else:
                connection.execute(sql.delete, {"ids": list(sent)})
        if retry:
            connection.execute(
                sql.retry,
                [
                    {
                        "row_id": r.id,
                        "owner": owner,
                        "error": r.error,
                        **clock_params(name, delay=r.delay),
                    }
                    for r in retry
                ],
            )
        if dead:
            insert_dead_letters(
                connection,
                [
                    NewDeadLetter(
                        origin="relay",
                        envelope=_with_trace(d.claimed.envelope, d.trace),
                        error_type=d.error_type,
                        error_message=d.error,
                        attempts=d.attempts,
                        handler=d.claimed.envelope.handler,
                        first_failed_at=d.claimed.first_failed_at,
                    )
                    for d in dead
                ],
            )
            connection.execute(sql.delete, {"ids": [d.claimed.id for d in dead]})
        if release_ids:
            connection.execute(sql.release, {"ids": list(release_ids), "owner": owner})


def release(connection: Connection, *, owner: str, ids: Sequence[int]) -> None:
    """Hand leased rows back without counting an attempt (shutdown, broker outage)."""
    if ids:
        with connection.begin():
            connection.execute(
                _statements(connection.dialect.name).release, {"ids": list(ids), "owner": owner}
            )


def renew(connection: Connection, *, owners: Sequence[str], lease: float) -> None:
    """Extend the leases of the batches ``owners`` (tokens) by ``lease`` seconds from now:
    batches on the wire for longer than their lease (a broker that holds its confirms,
    blocked by a resource alarm) must not be taken and sent again by another relay."""
    if owners:
        name = connection.dialect.name
        with connection.begin():
            connection.execute(
                update(outbox)
                .where(outbox.c.locked_by.in_(list(owners)))
                .values(locked_until=later(name, None, lease))
            )


def prune_sent(connection: Connection, *, older_than: float, limit: int = 1000) -> int:
    """Delete up to ``limit`` kept rows sent more than ``older_than`` seconds ago."""
    dialect = connection.dialect
    old = sent_table.c.sent_at < db_now_plus(dialect, -older_than)
    with connection.begin():
        if dialect.name in ("mysql", "mariadb"):
            stmt = delete(sent_table).where(old).with_dialect_options(mysql_limit=limit)
        else:
            oldest = select(sent_table.c.id).where(old).order_by(sent_table.c.sent_at).limit(limit)
            stmt = delete(sent_table).where(sent_table.c.id.in_(oldest))
        return connection.execute(stmt).rowcount or 0


# The statements, built once per dialect --------------------------------------------------


@dataclass(frozen=True)
class _Statements:
    delete: Any
    keep: Any
    keep_moves_only: bool
    """True when ``keep`` copies the rows and ``delete`` must follow (no DML in CTEs)."""
    retry: Any
    release: Any


@cache
def _statements(name: str) -> _Statements:
    current = now(name)

    def by_ids(stmt: Any) -> Any:
        if name == "postgresql":
            return stmt.where(outbox.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger))))
        return stmt.where(outbox.c.id.in_(bindparam("ids", expanding=True)))

    return _Statements(
        delete=by_ids(delete(outbox)),
        keep=_keep(name, by_ids, current),
        keep_moves_only=name != "postgresql",
        retry=update(outbox)
        .where(outbox.c.id == bindparam("row_id"), outbox.c.locked_by == bindparam("owner"))
        .values(
            attempts=outbox.c.attempts + 1,
            last_error=bindparam("error"),
            first_failed_at=func.coalesce(outbox.c.first_failed_at, current),
            available_at=later(name, "delay"),
            locked_by=None,
            locked_until=None,
        ),
        release=by_ids(update(outbox))
        .where(outbox.c.locked_by == bindparam("owner"))
        .values(locked_by=None, locked_until=None),
    )


def _keep(name: str, by_ids: Any, current: Any) -> Any:
    """Retention: copy sent rows to ``outboxer_sent`` (PostgreSQL: move, in one statement)."""
    names = list(_KEPT_COLUMNS)
    if name == "postgresql":
        moved = by_ids(delete(outbox)).returning(*(outbox.c[n] for n in names)).cte("moved")
        rows = select(*(moved.c[n] for n in names), current)
    else:
        rows = by_ids(select(*(outbox.c[n] for n in names), current))
    return insert(sent_table).from_select([*names, "sent_at"], rows)


def _with_trace(envelope: Envelope, trace: Mapping[str, str] | None) -> Envelope:
    if not trace:
        return envelope
    return replace(
        envelope, traceparent=trace.get("traceparent"), tracestate=trace.get("tracestate")
    )
